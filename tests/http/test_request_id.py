"""Request ids: a client's sane ``X-Request-Id`` is kept, anything else replaced by a uuid4;
every answer (errors, aiohttp's own 404, health and admin answers) echoes it, and the access
line names it with the client's address, the method and the path."""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import socket
import uuid

import aiohttp
import pytest

from gateway.devtools.sample_images import make_png
from gateway.obs.logs import AccessLog
from tests.support import TEAM_KEYS, Gateway, GatewayFactory, objects_form


def form(key: str, image: bytes) -> aiohttp.FormData:
    data, files = objects_form(key, image)
    out = aiohttp.FormData()
    for name, value in data.items():
        out.add_field(name, value)
    out.add_field("file", files["file"], filename="i.png", content_type="image/png")
    return out


def made(rid: str) -> bool:
    return len(rid) == 32 and uuid.UUID(hex=rid).version == 4 and uuid.UUID(hex=rid).hex == rid


async def test_a_sane_request_id_is_echoed_on_every_kind_of_answer(
    gateway: Gateway, client: aiohttp.ClientSession
) -> None:
    image = make_png(7001)
    answers = []
    for rid, call in [
        ("miss-1", client.post(gateway.url, data=form(TEAM_KEYS["search"], image),
                               headers={"X-Request-Id": "miss-1"})),
        ("hit 2 ~!", client.post(gateway.url, data=form(TEAM_KEYS["search"], image),
                                 headers={"X-Request-Id": "hit 2 ~!"})),
        ("bad-key", client.post(gateway.url, data=form("nobody's key", image),
                                headers={"X-Request-Id": "bad-key"})),
        ("no-data", client.get(gateway.url, headers={"X-Request-Id": "no-data"})),
        ("nowhere", client.get(gateway.base + "/nowhere", headers={"X-Request-Id": "nowhere"})),
        ("health", client.get(gateway.base + "/healthz", headers={"X-Request-Id": "health"})),
        ("admin", client.get(gateway.base + "/admin/usage", headers={"X-Request-Id": "admin"})),
        ("x" * 128, client.get(gateway.base + "/readyz", headers={"X-Request-Id": "x" * 128})),
    ]:
        async with call as r:
            answers.append((r.status, r.headers.get("X-Request-Id"), rid))
    assert [status for status, _, _ in answers] == [200, 200, 401, 300, 404, 200, 404, 200]
    assert [echoed for _, echoed, _ in answers] == [rid for _, _, rid in answers]


async def test_without_a_request_id_each_answer_gets_its_own_uuid4(
    gateway: Gateway, client: aiohttp.ClientSession
) -> None:
    ids = []
    for _ in range(3):
        async with client.post(gateway.url, data=form(TEAM_KEYS["ads"], make_png(7002))) as r:
            assert r.status == 200
            ids.append(r.headers["X-Request-Id"])
    async with client.post(gateway.url, data=form("wrong", make_png(7002))) as r:
        assert r.status == 401
        ids.append(r.headers["X-Request-Id"])
    assert all(made(rid) for rid in ids) and len(set(ids)) == 4


def raw_get(base: str, header: bytes) -> tuple[int, dict[str, str]]:
    """A GET with one X-Request-Id header line sent as the bytes given (no client tidies it)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /api/v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"X-Request-Id: " + header + b"\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), headers


@pytest.mark.parametrize("header", [
    pytest.param(b"y" * 129, id="129-characters"),
    pytest.param("caf\u00e9".encode(), id="not-ascii"),
    pytest.param(b"a\tb", id="tab"),
    pytest.param(b"", id="empty"),
])
async def test_an_unusable_request_id_is_replaced_not_echoed(
    gateway: Gateway, header: bytes
) -> None:
    status, headers = await asyncio.to_thread(raw_get, gateway.base, header)
    assert status == 300  # the envelope's "no data", as before: the id changes nothing else
    assert made(headers["X-Request-Id"])


async def test_the_access_line_names_the_request_id_client_method_and_path(
    gateway_factory: GatewayFactory, client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await gateway_factory()
    caplog.set_level(logging.INFO, logger="gateway.access")
    async with client.post(gw.url, data=form(TEAM_KEYS["search"], make_png(7003)),
                           headers={"X-Request-Id": "trace-7003"}) as r:
        assert r.status == 200
    async with client.get(gw.base + "/api/v2", params={"apikey": TEAM_KEYS["search"],
                                                         "type": "cache", "hash": "0" * 32}) as r:
        made_id = r.headers["X-Request-Id"]
    records = [rec for rec in caplog.records if rec.name == "gateway.access"]
    got = [(rec.request_id, rec.client, rec.method, rec.path, rec.status)  # type: ignore[attr-defined]
           for rec in records]
    assert got == [("trace-7003", "127.0.0.1", "POST", "/api/v2/", 200),
                   (made_id, "127.0.0.1", "GET", "/api/v2", 200)]
    assert TEAM_KEYS["search"] not in caplog.text  # the query string (and its key) is not logged


def test_a_request_id_with_spaces_quotes_and_equals_keeps_the_text_line_splittable() -> None:
    written: list[bytes] = []
    log = AccessLog("text", written.append)
    rid = 'a b="c" d=e'
    log.write({"team": "search", "status": 200, "request_id": rid, "client": "::1",
               "method": "POST", "path": "/api/v2/"})
    log.close()
    line = b"".join(written).decode().rstrip("\n")
    fields = dict(word.split("=", 1) for word in shlex.split(line.split(": request ", 1)[1]))
    assert fields == {"team": "search", "status": "200", "request_id": rid, "client": "::1",
                      "method": "POST", "path": "/api/v2/"}
    assert re.search(r' request_id="a b=\\"c\\" d=e" client=::1 ', line)


async def test_a_page_may_send_a_request_id_and_read_the_one_answered(
    gateway_factory: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    page = "https://intranet.example.com"
    gw = await gateway_factory(server={"cors_origins": [page]})
    asked = {"Origin": page, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "Content-Type, X-Request-Id"}
    async with client.options(gw.url, headers=asked) as r:
        assert r.status == 204
    async with client.post(gw.url, data=form(TEAM_KEYS["search"], make_png(7004)),
                           headers={"Origin": page, "X-Request-Id": "page-7004"}) as r:
        exposed = {h.strip().lower() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
        assert r.status == 200 and r.headers["X-Request-Id"] == "page-7004"
        assert "x-request-id" in exposed
