"""The /api/v2/ endpoint end to end: real sockets, the simulator as upstream."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path

import aiohttp
import pytest
import requests
import xxhash

from gateway.devtools.sample_images import make_jpeg, make_png
from tests.support import (
    TEAM_KEYS,
    UPSTREAM_KEY,
    Gateway,
    GatewayFactory,
    Sim,
    eventually,
    objects_form,
    post_requests,
)

SEARCH, ADS, TINY = TEAM_KEYS["search"], TEAM_KEYS["ads"], TEAM_KEYS["tiny"]


async def used(gw: Gateway, team: str) -> int:
    return await gw.state.store.used(team, gw.state.ledger.period())


async def test_seed_python_example_through_the_gateway(gateway: Gateway, sim: Sim) -> None:
    image = make_jpeg(1)
    # The seed's example, changed only in URL and key.
    d = {"apikey": SEARCH, "type": "objects", "max_labels": 10, "min_confidence": 80}
    r = await post_requests(gateway.url, data=d, files={"file": image})
    assert r.status_code == 200
    body = json.loads(r.text)
    assert list(body) == ["status", "message", "data"]
    assert body["status"] == 200 and body["message"] == "Success"
    data = body["data"]
    assert data["error"] == 0 and data["type"] == "objects"
    assert data["quota"] == 999  # the team's remaining sub-quota, not the account's
    assert list(data)[-1] == "quota"
    assert r.headers["Cache-Status"] == "imagerecognize-gateway; fwd=miss; stored"
    assert r.headers["X-Content-Hash"] == xxhash.xxh3_128_hexdigest(image)
    assert sim.state.calls == 1
    direct = sim.state.history[-1]
    assert direct["fields"] == {"type": "objects", "max_labels": "10", "min_confidence": "80"}
    assert await used(gateway, "search") == 1


async def test_programs_get_json_and_browsers_get_text(gateway: Gateway,
                                                       client: aiohttp.ClientSession) -> None:
    """A strict client's resp.json() works; a page (it sends Origin) gets text/plain, which the
    seed's jQuery example needs. Errors the same."""
    form = {"apikey": SEARCH, "type": "celebrities"}
    for origin, expected in ((None, "application/json"), ("http://intranet.test", "text/plain")):
        headers = {"Origin": origin} if origin else {}
        for image in (make_png(30), b"GIF89a"):
            data = aiohttp.FormData({**form})
            data.add_field("file", image, filename="x.png")
            async with client.post(gateway.url, data=data, headers=headers) as r:
                assert r.content_type == expected
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                if origin is None:
                    assert (await r.json())["status"] == r.status  # no content_type=None
                else:
                    assert json.loads(await r.text())["status"] == r.status


async def test_same_image_from_another_team_is_a_free_hit(gateway: Gateway, sim: Sim) -> None:
    image = make_png(2)
    first = await post_requests(gateway.url, *objects_form(SEARCH, image))
    assert first.status_code == 200
    # Another team, another filename, another field order, another boundary, urlencoded ints
    # with whitespace: the same image and parameters.
    body = (
        b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"other.png\"\r\n"
        b"Content-Type: image/png\r\n\r\n"
    ) + image + (
        "\r\n--XyZ\r\nContent-Disposition: form-data; name=\"min_confidence\"\r\n\r\n80"
        "\r\n--XyZ\r\nContent-Disposition: form-data; name=\"type\"\r\n\r\nobjects"
        "\r\n--XyZ\r\nContent-Disposition: form-data; name=\"max_labels\"\r\n\r\n 010 "
        f"\r\n--XyZ\r\nContent-Disposition: form-data; name=\"apikey\"\r\n\r\n{ADS}"
        "\r\n--XyZ--\r\n"
    ).encode()
    second = await asyncio.to_thread(
        requests.post, gateway.url, data=body,
        headers={"Content-Type": "multipart/form-data; boundary=XyZ"}, timeout=10)
    assert second.status_code == 200, second.text
    assert second.headers["Cache-Status"].startswith("imagerecognize-gateway; hit; ttl=")
    assert second.headers["X-Content-Hash"] == first.headers["X-Content-Hash"]
    assert second.json()["data"]["objects"] == first.json()["data"]["objects"]
    assert second.json()["data"]["quota"] == 1000  # ads was not charged
    assert sim.state.calls == 1
    assert await used(gateway, "ads") == 0


async def test_parameters_that_a_type_ignores_do_not_change_the_key(
        gateway: Gateway, sim: Sim) -> None:
    image = make_png(3)
    a = await post_requests(gateway.url, {"apikey": SEARCH, "type": "celebrities"}, {"file": image})
    b = await post_requests(gateway.url, {"apikey": SEARCH, "type": "celebrities",
                                          "max_labels": "3", "min_confidence": "1"}, {"file": image})
    c = await post_requests(gateway.url, *objects_form(SEARCH, image, max_labels="3"))
    assert [a.status_code, b.status_code, c.status_code] == [200, 200, 200]
    assert "hit" in b.headers["Cache-Status"]
    assert "fwd=miss" in c.headers["Cache-Status"]  # different type: its own entry
    assert sim.state.calls == 2


BAD_INPUTS = [
    pytest.param({}, None, 300, "Invalid request, no data received", id="no-data"),
    pytest.param({"type": "objects"}, b"png", 400, "APIkey missing", id="key-missing"),
    pytest.param({"apikey": "", "type": "objects"}, b"png", 400, "APIkey missing", id="key-empty"),
    pytest.param({"apikey": "nope", "type": "objects"}, b"png", 401, "APIkey invalid",
                 id="key-unknown"),
    pytest.param({"apikey": UPSTREAM_KEY, "type": "objects"}, b"png", 401, "APIkey invalid",
                 id="upstream-key-is-not-a-team-key"),
    pytest.param({"apikey": SEARCH, "type": "faces"}, b"png", 420, "Invalid type", id="bad-type"),
    pytest.param({"apikey": SEARCH}, b"png", 420, "Invalid type", id="type-missing"),
    pytest.param({"apikey": SEARCH, "type": "celebrities"}, None, 412, "Invalid file",
                 id="file-missing"),
    pytest.param({"apikey": SEARCH, "type": "celebrities"}, b"", 412, "Invalid file",
                 id="file-empty"),
    pytest.param({"apikey": SEARCH, "type": "celebrities"}, b"GIF89a....", 415,
                 "Invalid file format", id="gif"),
    pytest.param({"apikey": SEARCH, "type": "objects", "min_confidence": "80"}, b"png", 430,
                 "max_labels", id="max-labels-missing"),
    pytest.param({"apikey": SEARCH, "type": "objects", "max_labels": "0", "min_confidence": "80"},
                 b"png", 430, "max_labels", id="max-labels-zero"),
    pytest.param({"apikey": SEARCH, "type": "objects", "max_labels": "ten",
                  "min_confidence": "80"}, b"png", 430, "max_labels", id="max-labels-text"),
    pytest.param({"apikey": SEARCH, "type": "objects", "max_labels": "5",
                  "min_confidence": "101"}, b"png", 430, "min_confidence", id="confidence-101"),
    pytest.param({"apikey": SEARCH, "type": "objects", "max_labels": "5",
                  "min_confidence": "-1"}, b"png", 430, "min_confidence", id="confidence-neg"),
    pytest.param({"apikey": SEARCH, "type": "nsfw"}, b"png", 430, "nsfw_min_confidence",
                 id="nsfw-missing"),
    pytest.param({"apikey": SEARCH, "type": "nsfw", "nsfw_min_confidence": "2.5"}, b"png", 430,
                 "nsfw_min_confidence", id="nsfw-float"),
]


@pytest.mark.parametrize(("data", "file", "status", "message"), BAD_INPUTS)
async def test_bad_input_is_answered_locally_with_the_upstream_envelope(
        gateway: Gateway, sim: Sim, caplog: pytest.LogCaptureFixture,
        data: dict[str, str], file: bytes | None, status: int, message: str) -> None:
    caplog.set_level(logging.DEBUG)
    if file == b"png":
        file = make_png(4)
    r = await post_requests(gateway.url, data=data,
                            files={"file": ("x.bin", file)} if file is not None else None)
    assert r.status_code == status
    body = r.json()
    assert body["status"] == status and body["data"] is None
    assert message in body["status_message"]
    assert set(body) == {"status", "status_message", "data"}
    assert "Cache-Status" not in r.headers
    assert sim.state.calls == 0
    assert await used(gateway, "search") == 0
    assert UPSTREAM_KEY not in r.text and UPSTREAM_KEY not in caplog.text


MALFORMED = [
    pytest.param(b"--abc\r\nContent-Disposition: form-data; name=\"apikey\"\r\n\r\nk",
                 "multipart/form-data; boundary=abc", id="truncated"),
    pytest.param(b"garbage", "multipart/form-data", id="no-boundary"),
    pytest.param(b"\x00\x01\x02", "multipart/form-data; boundary=zz", id="binary-junk"),
    pytest.param(b"{}", "application/json", id="json"),
]


@pytest.mark.parametrize(("body", "content_type"), MALFORMED)
async def test_malformed_bodies_get_a_clean_4xx(gateway: Gateway, sim: Sim, body: bytes,
                                                content_type: str) -> None:
    r = await asyncio.to_thread(requests.post, gateway.url, data=body,
                                headers={"Content-Type": content_type}, timeout=10)
    assert 300 <= r.status_code < 500
    assert r.json()["data"] is None and r.json()["status"] == r.status_code
    assert sim.state.calls == 0


async def test_oversized_upload_is_refused_without_reading_it_all(gateway: Gateway,
                                                                  sim: Sim) -> None:
    big = make_png(5) + b"\x00" * (50 * 1024 * 1024 + 1)
    r = await post_requests(gateway.url, *objects_form(SEARCH, big))
    assert r.status_code == 413
    assert r.json()["status_message"] == "Image size too large"
    assert sim.state.calls == 0


async def test_urlencoded_form_is_accepted(gateway: Gateway, sim: Sim) -> None:
    from urllib.parse import quote_from_bytes

    image = make_png(6)
    body = (f"apikey={SEARCH}&type=detect_text&file=" + quote_from_bytes(image)).encode()
    r = await asyncio.to_thread(
        requests.post, gateway.url, data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["X-Content-Hash"] == xxhash.xxh3_128_hexdigest(image)


async def test_url_without_trailing_slash_is_served(gateway: Gateway) -> None:
    r = await post_requests(gateway.url.rstrip("/"), *objects_form(SEARCH, make_png(7)))
    assert r.status_code == 200


# The same bad request, once to the simulator (the upstream, with the account key) and once
# to the gateway (with a team key): the gateway must answer it as upstream would, byte for
# byte, without asking upstream. (method, fields, file; "KEY" is replaced by each side's key.)
PARITY = [
    pytest.param("GET", {"apikey": "KEY", "type": "objects"}, None, id="get-objects"),
    pytest.param("GET", {"type": "objects"}, None, id="get-objects-no-key"),
    pytest.param("GET", {"apikey": "wrong", "type": "objects"}, None, id="get-objects-bad-key"),
    pytest.param("GET", {"apikey": "KEY"}, None, id="get-no-type"),
    pytest.param("POST", {"apikey": "KEY", "type": "objects"}, "png", id="max-labels-missing"),
    pytest.param("POST", {"apikey": "KEY", "type": "objects", "max_labels": "0",
                          "min_confidence": "5"}, "png", id="max-labels-zero"),
    pytest.param("POST", {"apikey": "KEY", "type": "objects", "max_labels": "3"}, "png",
                 id="min-confidence-missing"),
    pytest.param("POST", {"apikey": "KEY", "type": "objects", "max_labels": "3",
                          "min_confidence": "101"}, "png", id="min-confidence-101"),
    pytest.param("POST", {"apikey": "KEY", "type": "nsfw", "nsfw_min_confidence": "x"}, "png",
                 id="nsfw-text"),
    pytest.param("POST", {"apikey": "KEY", "type": "celebrities"},
                 b"\x89PNG\r\n\x1a\n\x00\x00\x00\x00", id="png-signature-only"),
    pytest.param("POST", {"apikey": "KEY", "type": "celebrities"},
                 b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, id="png-without-ihdr"),
    pytest.param("POST", {"apikey": "KEY", "type": "celebrities"}, b"\xff\xd8\xff",
                 id="jpeg-3-bytes"),
    pytest.param("POST", {"apikey": "KEY", "type": "celebrities"}, b"GIF89a", id="gif"),
]


@pytest.mark.parametrize(("method", "fields", "file"), PARITY)
async def test_bad_input_gets_the_same_answer_as_upstream_gives(
        gateway: Gateway, sim: Sim, method: str, fields: dict[str, str],
        file: bytes | str | None) -> None:
    image = make_png(40) if file == "png" else file

    def send(url: str, key: str) -> requests.Response:
        data = {k: key if v == "KEY" else v for k, v in fields.items()}
        if method == "GET":
            return requests.get(url, params=data, timeout=10)
        return requests.post(url, data=data, files={"file": image}, timeout=10)

    direct = await asyncio.to_thread(send, sim.url, UPSTREAM_KEY)
    calls = sim.state.calls
    via = await asyncio.to_thread(send, gateway.url, SEARCH)
    assert direct.json()["status"] != 200
    assert (via.status_code, via.text) == (direct.status_code, direct.text)
    assert sim.state.calls == calls  # answered by the gateway itself
    assert await used(gateway, "search") == 0


async def test_get_is_only_for_type_cache(gateway: Gateway, sim: Sim) -> None:
    r = await asyncio.to_thread(requests.get, gateway.url,
                                params={"apikey": SEARCH, "type": "objects"}, timeout=10)
    assert r.status_code == 300
    assert sim.state.calls == 0


async def test_type_cache_by_file_and_by_hash(gateway: Gateway, sim: Sim) -> None:
    image = make_jpeg(8)
    miss = await post_requests(gateway.url, {"apikey": SEARCH, "type": "cache"}, {"file": image})
    assert miss.status_code == 200
    assert miss.json()["data"]["error"] == "no cached results"
    assert miss.json()["data"]["results"] == []
    first = await post_requests(gateway.url, *objects_form(SEARCH, image))
    await post_requests(gateway.url, {"apikey": SEARCH, "type": "nsfw",
                                      "nsfw_min_confidence": "5"}, {"file": image})
    calls = sim.state.calls
    content_hash = first.headers["X-Content-Hash"]
    by_get = await asyncio.to_thread(requests.get, gateway.url, timeout=10, params={
        "apikey": ADS, "type": "cache", "hash": content_hash})
    by_file = await post_requests(gateway.url, {"apikey": ADS, "type": "cache"}, {"file": image})
    for r in (by_get, by_file):
        assert r.status_code == 200
        data = r.json()["data"]
        assert data["error"] == 0 and data["quota"] == 1000
        results = {res["type"]: res for res in data["results"]}
        assert set(results) == {"objects", "nsfw"}
        assert results["objects"]["params"] == {"max_labels": 10, "min_confidence": 80}
        assert results["objects"]["data"]["objects"] == first.json()["data"]["objects"]
        assert results["objects"]["cached_at"].endswith("Z")
    assert sim.state.calls == calls  # never calls upstream
    bad = await asyncio.to_thread(requests.get, gateway.url, timeout=10, params={
        "apikey": ADS, "type": "cache", "hash": "../etc"})
    assert bad.status_code == 430 and "hash" in bad.json()["status_message"]


async def test_quota_is_per_team_and_402_when_spent(gateway: Gateway, sim: Sim) -> None:
    quotas = []
    for seed in range(3):
        r = await post_requests(gateway.url, *objects_form(TINY, make_png(100 + seed)))
        assert r.status_code == 200
        quotas.append(r.json()["data"]["quota"])
    assert quotas == [2, 1, 0]
    over = await post_requests(gateway.url, *objects_form(TINY, make_png(200)))
    assert over.status_code == 402
    assert over.json() == {"status": 402, "status_message": "Quota limit reached", "data": None}
    assert sim.state.calls == 3
    # A hit is free, even at zero.
    hit = await post_requests(gateway.url, *objects_form(TINY, make_png(100)))
    assert hit.status_code == 200 and hit.json()["data"]["quota"] == 0
    # Other teams are unaffected.
    other = await post_requests(gateway.url, *objects_form(SEARCH, make_png(200)))
    assert other.status_code == 200


async def test_concurrent_unique_uploads_never_overspend(gateway_factory: GatewayFactory,
                                                         sim: Sim) -> None:
    gw = await gateway_factory(teams={"t": {"keys": ["k"], "quota": 20}})
    results = await asyncio.gather(*(post_requests(gw.url, *objects_form("k", make_png(1000 + i)))
                                     for i in range(60)))
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) == 20 and codes.count(402) == 40
    assert sim.state.calls == 20
    assert await used(gw, "t") == 20


async def test_identical_concurrent_uploads_coalesce(gateway: Gateway, sim: Sim) -> None:
    sim.state.latency_ms = 300
    image = make_png(9)
    results = await asyncio.gather(*(post_requests(gateway.url, *objects_form(SEARCH, image))
                                     for _ in range(30)))
    assert [r.status_code for r in results] == [200] * 30
    assert sim.state.calls == 1
    assert len({json.dumps(r.json()["data"]["objects"]) for r in results}) == 1
    statuses = [r.headers["Cache-Status"] for r in results]
    assert sum("fwd=miss" in s for s in statuses) == 1
    assert all("fwd=miss" in s or "detail=coalesced" in s or "; hit;" in s for s in statuses)
    assert await used(gateway, "search") == 1


@pytest.mark.parametrize("fault", ["500", "timeout", "reset", "garbage"])
async def test_upstream_faults_after_sending_keep_the_charge_and_are_not_cached(
        gateway_factory: GatewayFactory, sim: Sim, fault: str) -> None:
    # Each reached the upstream, which may have billed it: the charge follows the bill.
    gw = await gateway_factory(upstream={"timeout_s": 1})
    sim.state.fault, sim.state.fault_count = fault, 1
    image = make_png(10)
    r = await post_requests(gw.url, *objects_form(SEARCH, image))
    assert r.status_code == (504 if fault == "timeout" else 502)
    body = r.json()
    assert body["status"] == r.status_code and body["data"] is None
    assert UPSTREAM_KEY not in r.text
    assert await used(gw, "search") == 1
    usage = {u.team: u for u in await gw.state.store.usage(gw.state.ledger.period())}
    assert usage["search"].undelivered == 1
    # Not cached: the next request goes upstream and succeeds.
    again = await post_requests(gw.url, *objects_form(SEARCH, image))
    assert again.status_code == 200
    assert "fwd=miss" in again.headers["Cache-Status"]
    assert await used(gw, "search") == 2
    assert sim.state.calls == 2


async def test_an_upstream_that_cannot_be_reached_is_refunded(
        gateway_factory: GatewayFactory) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gw = await gateway_factory(upstream={"url": f"http://127.0.0.1:{port}/api/v2/"})
    r = await post_requests(gw.url, *objects_form(SEARCH, make_png(13)))
    assert r.status_code == 502 and r.json()["status"] == 502
    assert await used(gw, "search") == 0
    usage = await gw.state.store.usage(gw.state.ledger.period())
    assert all(u.undelivered == 0 for u in usage)


async def test_upstream_account_exhausted_is_relayed_as_402(gateway: Gateway, sim: Sim) -> None:
    sim.state.quota = 0
    r = await post_requests(gateway.url, *objects_form(SEARCH, make_png(11)))
    assert r.status_code == 402
    assert r.json()["status_message"] == "Quota limit reached"
    assert await used(gateway, "search") == 0


async def test_upstream_refusing_our_key_is_a_502_naming_no_secret(
        gateway_factory: GatewayFactory, sim: Sim, caplog: pytest.LogCaptureFixture) -> None:
    sim.state.api_key = "rotated-key"
    gw = await gateway_factory()
    r = await post_requests(gw.url, *objects_form(SEARCH, make_png(12)))
    assert r.status_code == 502
    assert UPSTREAM_KEY not in r.text and UPSTREAM_KEY not in caplog.text
    assert await used(gw, "search") == 0


async def test_cache_control_directives(gateway: Gateway, sim: Sim) -> None:
    image = make_png(13)
    only = await post_requests(gateway.url, *objects_form(SEARCH, image),
                               headers={"Cache-Control": "only-if-cached"})
    assert only.status_code == 504 and "Cache-Status" not in only.headers
    nostore = await post_requests(gateway.url, *objects_form(SEARCH, image),
                                  headers={"Cache-Control": "no-store"})
    assert nostore.status_code == 200
    assert nostore.headers["Cache-Status"] == "imagerecognize-gateway; fwd=request"
    first = await post_requests(gateway.url, *objects_form(SEARCH, image))
    assert "fwd=miss" in first.headers["Cache-Status"]  # no-store wrote nothing
    refresh = await post_requests(gateway.url, *objects_form(SEARCH, image),
                                  headers={"Cache-Control": "no-cache"})
    assert refresh.headers["Cache-Status"] == "imagerecognize-gateway; fwd=request; stored"
    cached = await post_requests(gateway.url, *objects_form(SEARCH, image),
                                 headers={"Cache-Control": "only-if-cached"})
    assert cached.status_code == 200 and "; hit;" in cached.headers["Cache-Status"]
    # only-if-cached with a directive that forbids answering from the store: nothing may be
    # served and nothing forwarded (RFC 9111 5.2.1.7), even though the entry is there.
    for both in ("no-cache, only-if-cached", "only-if-cached, no-store"):
        r = await post_requests(gateway.url, *objects_form(SEARCH, image),
                                headers={"Cache-Control": both})
        assert r.status_code == 504 and r.json()["status"] == 504
    assert sim.state.calls == 3
    assert await used(gateway, "search") == 3


async def test_results_are_not_shared_when_switched_off(gateway_factory: GatewayFactory,
                                                        sim: Sim) -> None:
    gw = await gateway_factory(cache={"share_across_teams": False})
    image = make_png(14)
    a = await post_requests(gw.url, *objects_form(SEARCH, image))
    b = await post_requests(gw.url, *objects_form(ADS, image))
    c = await post_requests(gw.url, *objects_form(ADS, image))
    assert "fwd=miss" in a.headers["Cache-Status"] and "fwd=miss" in b.headers["Cache-Status"]
    assert "; hit;" in c.headers["Cache-Status"]
    assert sim.state.calls == 2


async def test_health_endpoints(gateway: Gateway) -> None:
    assert (await asyncio.to_thread(requests.get, gateway.base + "/healthz")).status_code == 200
    ready = await asyncio.to_thread(requests.get, gateway.base + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


async def test_purges_reach_the_in_memory_tier(gateway: Gateway, sim: Sim, tmp_path) -> None:
    from gateway.store.sqlite import SQLiteStore

    image = make_png(15)
    first = await post_requests(gateway.url, *objects_form(SEARCH, image))
    content_hash = first.headers["X-Content-Hash"]
    assert "; hit;" in (await post_requests(gateway.url, *objects_form(SEARCH, image))
                        ).headers["Cache-Status"]
    # A purge by this process is seen at once.
    await gateway.state.store.purge(content_hash=content_hash)
    again = await post_requests(gateway.url, *objects_form(SEARCH, image))
    assert "fwd=miss" in again.headers["Cache-Status"]
    # A purge by another process (the admin CLI, another worker) within a flush interval.
    other = SQLiteStore(str(tmp_path / "gateway.db"))
    await other.open()
    assert await other.purge(content_hash=content_hash) == 1
    await other.close()

    async def missed() -> bool:  # hits until this process reads the purge (free to repeat)
        after = await post_requests(gateway.url, *objects_form(SEARCH, image))
        return "fwd=miss" in after.headers["Cache-Status"]

    await eventually(missed, timeout=5, every=0.05, what="the other process's purge")
    assert sim.state.calls == 3


async def test_reload_names_only_the_settings_that_need_a_restart(
        gateway: Gateway, sim: Sim, tmp_path) -> None:
    """Compared with what the process started with, not with the previous reload: a value
    read per request (max_inflight) applies at once; the port does not, until restart."""
    from tests.support import make_config

    db = tmp_path / "gateway.db"
    assert gateway.state.apply_config(make_config(sim.url, db, server={"max_inflight": 1})) == []
    assert gateway.state.config.server.max_inflight == 1
    assert gateway.state.apply_config(make_config(sim.url, db, server={"port": 9999})) == [
        "server.port"]
    assert gateway.state.apply_config(make_config(sim.url, db)) == []  # back as started


async def test_rate_limited_requests_are_counted_under_their_type(
        gateway_factory: GatewayFactory, sim: Sim) -> None:
    gw = await gateway_factory(teams={"search": {"keys": [SEARCH], "quota": 100,
                                                 "rate_per_s": 0.01, "burst": 1}})
    codes = [(await post_requests(gw.url, *objects_form(SEARCH, make_png(70 + i)))).status_code
             for i in range(2)]
    assert codes == [200, 429]
    sample = gw.state.metrics.registry.get_sample_value(
        "gateway_requests_total",
        {"team": "search", "type": "objects", "status": "429", "cache": "none"})
    assert sample == 1


RESTARTED_VALUES = {"host": "127.0.0.2", "port": 9999, "workers": 2,
                    "cors_origins": ["http://app.example"], "drain_timeout_s": 5.0,
                    "access_log_buffer_kb": 64, "access_log_flush_ms": 500,
                    "event_loop": "asyncio", "keepalive_timeout_s": 10.0}


def test_the_server_keys_a_reload_cannot_apply_are_the_ones_operators_md_lists() -> None:
    """Marked once, on ServerConfig's fields; the operators' guide names the same keys."""
    import re

    from gateway.http.state import RESTART_ONLY_SERVER_KEYS

    text = (Path(__file__).resolve().parents[2] / "docs" / "operators.md").read_text()
    listed = text.split("these `[server]` keys", 1)[1].split("apply at once", 1)[0]
    named = set(re.findall(r"`(\w+)`", listed.split("The other", 1)[0]))
    assert named == set(RESTART_ONLY_SERVER_KEYS) == set(RESTARTED_VALUES)


@pytest.mark.parametrize("key", sorted(RESTARTED_VALUES))
async def test_a_reload_names_each_server_key_read_only_at_start(
        gateway: Gateway, sim: Sim, tmp_path, key: str) -> None:
    from tests.support import make_config

    changed = make_config(sim.url, tmp_path / "gateway.db", server={key: RESTARTED_VALUES[key]})
    assert gateway.state.apply_config(changed) == [f"server.{key}"]


async def test_one_reload_reaches_the_handlers_the_ledger_and_the_cache_at_once(
        gateway: Gateway, sim: Sim, tmp_path) -> None:
    """The quota period (read by the ledger), cache sharing (read by the service) and team keys
    (read by the handler) all follow one reload."""
    from tests.support import make_config

    image = make_png(31)
    assert (await post_requests(gateway.url, *objects_form(SEARCH, image))).status_code == 200
    assert "; hit;" in (await post_requests(gateway.url, *objects_form(ADS, image))
                        ).headers["Cache-Status"]
    reloaded = make_config(sim.url, tmp_path / "gateway.db", quota={"period": "total"},
                           cache={"share_across_teams": False, "audit_rate": 0})
    assert gateway.state.apply_config(reloaded) == []
    apart = await post_requests(gateway.url, *objects_form(ADS, make_png(31)))
    assert "fwd=miss" in apart.headers["Cache-Status"]   # no longer shared across teams
    assert sim.state.calls == 2
    usage = {u.team: u for u in await gateway.state.store.usage("total")}
    assert usage["ads"].charged == 1                    # charged under the new period
    assert gateway.state.ledger.config is gateway.state.service.config is gateway.state.config
