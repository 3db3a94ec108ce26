"""CORS for browser clients of /api/v2/ (``server.cors_origins``)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from gateway.devtools.sample_images import make_png
from tests.support import TEAM_KEYS, Gateway, GatewayFactory, objects_form

ALLOWED = "http://intranet.example:8000"
REFUSED = "http://evil.example"


@pytest.fixture
async def cors_gw(gateway_factory: GatewayFactory) -> Gateway:
    return await gateway_factory(server={"cors_origins": [ALLOWED, "https://other.example"]},
                                 admin={"public_status": True})


def preflight(origin: str, headers: str = "content-type") -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": headers}


def multipart(key: str, image: bytes, **extra: str) -> aiohttp.FormData:
    fields, files = objects_form(key, image, **extra)
    form = aiohttp.FormData()
    for name, value in fields.items():
        form.add_field(name, value)
    form.add_field("file", files["file"], filename="image.png", content_type="image/png")
    return form


async def post(client: aiohttp.ClientSession, gw: Gateway, origin: str | None,
               key: str, image: bytes) -> tuple[int, Any, dict[str, str]]:
    headers = {"Origin": origin} if origin else {}
    async with client.post(gw.url, data=multipart(key, image), headers=headers) as r:
        return r.status, await r.json(content_type=None), dict(r.headers)


def exposed(headers: dict[str, str]) -> set[str]:
    return {h.strip().lower() for h in headers["Access-Control-Expose-Headers"].split(",")}


@pytest.mark.parametrize("path", ["/api/v2/", "/api/v2"])
async def test_preflight_from_an_allowed_origin(
    cors_gw: Gateway, client: aiohttp.ClientSession, path: str
) -> None:
    asked = "Content-Type, Cache-Control"
    async with client.options(cors_gw.base + path, headers=preflight(ALLOWED, asked)) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == ALLOWED
        methods = {m.strip() for m in r.headers["Access-Control-Allow-Methods"].split(",")}
        assert {"GET", "POST"} <= methods
        allowed_headers = {h.strip().lower()
                           for h in r.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"content-type", "cache-control"} <= allowed_headers
        assert int(r.headers["Access-Control-Max-Age"]) > 0
        assert "Origin" in r.headers.getall("Vary")
        assert await r.read() == b""


@pytest.mark.parametrize("headers", [
    pytest.param(preflight(REFUSED), id="refused-origin"),
    pytest.param(preflight("null"), id="null-origin"),
    pytest.param(preflight(ALLOWED + "/"), id="not-exactly-the-origin"),
    pytest.param(preflight(ALLOWED, "content-type, x-api-secret"), id="unlisted-header"),
])
async def test_preflight_refused(
    cors_gw: Gateway, client: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    async with client.options(cors_gw.url, headers=headers) as r:
        assert r.status == 403
        assert "Access-Control-Allow-Origin" not in r.headers
        assert "Access-Control-Allow-Methods" not in r.headers


async def test_post_from_an_allowed_origin_exposes_the_gateway_headers(
    cors_gw: Gateway, client: aiohttp.ClientSession
) -> None:
    status, body, headers = await post(client, cors_gw, ALLOWED, TEAM_KEYS["search"],
                                       make_png(900))
    assert status == 200 and body["status"] == 200
    assert headers["Access-Control-Allow-Origin"] == ALLOWED
    assert {"cache-status", "x-content-hash", "ratelimit"} <= exposed(headers)
    assert "Origin" in headers["Vary"]
    assert "Cache-Status" in headers and "X-Content-Hash" in headers


@pytest.mark.parametrize("origin", [pytest.param(REFUSED, id="refused"),
                                    pytest.param(None, id="no-origin")])
async def test_post_from_elsewhere_gets_no_cors_headers(
    cors_gw: Gateway, client: aiohttp.ClientSession, origin: str | None
) -> None:
    status, body, headers = await post(client, cors_gw, origin, TEAM_KEYS["search"],
                                       make_png(901))
    # The answer is made (CORS is the browser's rule, not an auth check), but a browser
    # won't hand it to the page.
    assert status == 200 and body["status"] == 200
    assert "Access-Control-Allow-Origin" not in headers
    assert "Access-Control-Expose-Headers" not in headers


async def test_error_envelopes_carry_cors_headers_for_an_allowed_origin(
    cors_gw: Gateway, client: aiohttp.ClientSession
) -> None:
    tiny = TEAM_KEYS["tiny"]
    for seed in range(3):
        assert (await post(client, cors_gw, ALLOWED, tiny, make_png(910 + seed)))[0] == 200
    status, body, headers = await post(client, cors_gw, ALLOWED, tiny, make_png(920))
    assert status == 402
    assert body == {"status": 402, "status_message": "Quota limit reached", "data": None}
    assert headers["Access-Control-Allow-Origin"] == ALLOWED
    status, body, headers = await post(client, cors_gw, ALLOWED, "not-a-key", make_png(921))
    assert (status, body["status_message"]) == (401, "APIkey invalid")
    assert headers["Access-Control-Allow-Origin"] == ALLOWED

    status, _, headers = await post(client, cors_gw, REFUSED, tiny, make_png(922))
    assert status == 402 and "Access-Control-Allow-Origin" not in headers


async def test_no_cors_headers_without_cors_origins(
    gateway: Gateway, client: aiohttp.ClientSession
) -> None:
    async with client.options(gateway.url, headers=preflight(ALLOWED)) as r:
        assert "Access-Control-Allow-Origin" not in r.headers
    status, _, headers = await post(client, gateway, ALLOWED, TEAM_KEYS["search"], make_png(930))
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


async def test_other_paths_are_not_cors_enabled(
    cors_gw: Gateway, client: aiohttp.ClientSession
) -> None:
    for path in ("/metrics", "/status.json", "/healthz"):
        async with client.get(cors_gw.base + path, headers={"Origin": ALLOWED}) as r:
            assert r.status == 200
            assert "Access-Control-Allow-Origin" not in r.headers


async def test_a_wildcard_lets_every_origin_in(
    gateway_factory: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    # cors_origins = ["*"]: any page may call; the answer names that page's origin.
    gw = await gateway_factory(server={"cors_origins": ["*"]})
    async with client.options(gw.url, headers=preflight(REFUSED)) as r:
        assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == REFUSED
    status, body, headers = await post(client, gw, REFUSED, TEAM_KEYS["search"], make_png(990))
    assert status == 200 and body["status"] == 200
    assert headers["Access-Control-Allow-Origin"] == REFUSED
    assert "cache-status" in exposed(headers)
