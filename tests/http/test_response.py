"""The API's answers as bytes on the wire: what an HTTP client of any kind relies on.

The gateway writes its envelope answers itself (gateway.http.response), so these tests read the raw
bytes off a loopback socket: status line, the headers aiohttp would send, Content-Length,
keep-alive and close for HTTP/1.1 and 1.0.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import socket
import time
from urllib.parse import urlsplit

import pytest
from aiohttp.test_utils import make_mocked_request

from gateway.core.envelope import CONTENT_TYPE
from gateway.devtools.sample_images import make_png
import gateway.http.response as response_module
from gateway.http.response import EnvelopeResponse
from tests.support import TEAM_KEYS, Gateway

BOUNDARY = "rawsocketboundary42"


def _body(key: str, image: bytes) -> bytes:
    fields = {"apikey": key, "type": "objects", "max_labels": "10", "min_confidence": "80"}
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
                 'filename="a.png"\r\nContent-Type: image/png\r\n\r\n'.encode())
    return b"".join(parts) + image + f"\r\n--{BOUNDARY}--\r\n".encode()


def _request(gw: Gateway, body: bytes, version: str = "1.1", extra: str = "") -> bytes:
    host = urlsplit(gw.base).netloc
    return (f"POST /api/v2/ HTTP/{version}\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


class Answer:
    def __init__(self, status_line: str, headers: dict[str, str], body: bytes) -> None:
        self.status_line, self.headers, self.body = status_line, headers, body


def _read_answer(sock: socket.socket, buf: bytearray) -> Answer:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a whole head: {bytes(buf)!r}"
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(": ")
        assert name.lower() not in headers, f"header {name} sent twice"
        headers[name.lower()] = value
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        rest += chunk
    buf[:] = rest[length:]
    return Answer(status_line, headers, rest[:length])


def _closed(sock: socket.socket, expected: bool) -> bool:
    """Whether the gateway closed the connection (waiting long only when that is expected)."""
    sock.settimeout(5 if expected else 0.3)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


def _exchange(gw: Gateway, *requests: bytes, close_expected: bool) -> list[Answer]:
    host, port = urlsplit(gw.base).hostname, urlsplit(gw.base).port
    assert host is not None and port is not None
    with socket.create_connection((host, port), timeout=10) as sock:
        buf = bytearray()
        answers = []
        for raw in requests:
            sock.sendall(raw)
            answers.append(_read_answer(sock, buf))
        assert not buf, "bytes after the last answer"
        assert _closed(sock, close_expected) == close_expected
    return answers


@pytest.fixture(params=["written here", "web.Response"])
def writer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways an answer is written: the module's own writer, and the public web.Response it
    falls back to where aiohttp lacks the private parts it uses (the same bytes must result)."""
    monkeypatch.setattr(response_module, "FAST", request.param == "written here")
    return str(request.param)


def test_the_installed_aiohttp_has_what_the_fast_writer_uses() -> None:
    """pyproject.toml's aiohttp range is one where answers are written here; a release that
    drops a private part would silently take the slower path: this says so first."""
    assert response_module.FAST


async def test_keep_alive_answers_carry_what_http_clients_need(gateway: Gateway, writer: str) -> None:
    body = _body(TEAM_KEYS["search"], make_png(4242))
    miss, hit, refused = await asyncio.to_thread(
        _exchange, gateway, _request(gateway, body), _request(gateway, body),
        _request(gateway, _body("not-a-key", make_png(4242))), close_expected=False)
    for answer in (miss, hit, refused):
        h = answer.headers
        assert h["content-type"] == "application/json; charset=utf-8"
        assert h["x-content-type-options"] == "nosniff"
        assert h["server"] == "imagerecognize-gateway"  # no versions to fingerprint
        sent = email.utils.parsedate_to_datetime(h["date"]).timestamp()
        assert abs(sent - time.time()) < 5
        assert "connection" not in h  # HTTP/1.1 keeps the connection open by default
    assert miss.status_line == hit.status_line == "HTTP/1.1 200 OK"
    assert json.loads(miss.body)["data"] == json.loads(hit.body)["data"]
    assert "fwd=miss" in miss.headers["cache-status"] and "; hit;" in hit.headers["cache-status"]
    assert hit.headers["x-content-hash"] == miss.headers["x-content-hash"]
    assert refused.status_line == "HTTP/1.1 401 Unauthorized"
    assert json.loads(refused.body)["status"] == 401


async def test_connection_close_is_answered_and_honoured(gateway: Gateway, writer: str) -> None:
    body = _body(TEAM_KEYS["search"], make_png(4243))
    (answer,) = await asyncio.to_thread(
        _exchange, gateway, _request(gateway, body, extra="Connection: close\r\n"),
        close_expected=True)
    assert answer.status_line == "HTTP/1.1 200 OK"
    assert answer.headers["connection"] == "close"
    assert json.loads(answer.body)["status"] == 200


@pytest.mark.parametrize("keep_alive", [False, True])
async def test_http_1_0_gets_a_1_0_answer(gateway: Gateway, keep_alive: bool,
                                          writer: str) -> None:
    body = _body(TEAM_KEYS["search"], make_png(4244))
    extra = "Connection: keep-alive\r\n" if keep_alive else ""
    raws = [_request(gateway, body, "1.0", extra)] * (2 if keep_alive else 1)
    answers = await asyncio.to_thread(_exchange, gateway, *raws, close_expected=not keep_alive)
    for answer in answers:
        assert answer.status_line == "HTTP/1.0 200 OK"
        assert answer.headers.get("connection") == ("keep-alive" if keep_alive else None)
        assert json.loads(answer.body)["status"] == 200


async def test_a_header_value_with_a_line_break_is_never_written() -> None:
    request = make_mocked_request("POST", "/api/v2/")
    answer = EnvelopeResponse(b"{}", 200, {"Warning": "110 x\r\nSet-Cookie: a=b"},
                              content_type=CONTENT_TYPE)
    with pytest.raises(ValueError, match="Newline or carriage return"):
        await answer.prepare(request)
    assert not request.transport.write.called  # type: ignore[union-attr]
