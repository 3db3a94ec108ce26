"""The upstream simulator, as a client sees it: real sockets on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests

from gateway.devtools import sim as sim_module
from gateway.devtools.sample_images import make_jpeg, make_png, make_png_of_size
from gateway.devtools.sim import MAX_FILE_BYTES, SimState, recognize, start_sim

KEY = "test-upstream-key"
QUOTA = 5


@dataclass
class Sim:
    url: str  # the API endpoint, with its trailing slash
    base: str
    state: SimState


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    runner, port, state = await start_sim(api_key=KEY, quota=QUOTA)
    base = f"http://127.0.0.1:{port}"
    try:
        yield Sim(url=f"{base}/api/v2/", base=base, state=state)
    finally:
        await runner.cleanup()


async def post(url: str, data: Any = None, files: Any = None, **kw: Any) -> requests.Response:
    return await asyncio.to_thread(requests.post, url, data=data, files=files, timeout=10, **kw)


async def get(url: str, **params: str) -> requests.Response:
    return await asyncio.to_thread(requests.get, url, params=params, timeout=10)


def objects_form(**extra: Any) -> dict[str, Any]:
    return {"apikey": KEY, "type": "objects", "max_labels": 10, "min_confidence": 0, **extra}


def error(status: int, message: str) -> dict[str, Any]:
    return {"status": status, "status_message": message, "data": None}


# -- the seed's own example and the success envelope ------------------------------------------


async def test_seed_python_example_succeeds_and_counts_quota_down(sim: Sim) -> None:
    f = {"file": make_jpeg(1)}
    d = {"apikey": KEY, "type": "objects", "max_labels": 10, "min_confidence": 80}

    for remaining in (QUOTA - 1, QUOTA - 2):
        r = await post(sim.url, data=d, files=f)
        assert r.status_code == 200
        body = json.loads(r.text)
        assert list(body) == ["status", "message", "data"]
        assert body["status"] == 200 and body["message"] == "Success"
        data = body["data"]
        assert list(data) == ["error", "type", "objects", "quota"]
        assert (data["error"], data["type"], data["quota"]) == (0, "objects", remaining)
        assert len(data["objects"]) <= 10
        for item in data["objects"]:
            assert isinstance(item["name"], str) and item["confidence"] >= 80
            assert item["confidence"] == round(item["confidence"], 2)
            for box in item["coordinates"]:
                assert set(box) == {"x", "y", "width", "height"}
                assert all(0 <= v <= 1 and v == round(v, 2) for v in box.values())
                assert box["x"] + box["width"] <= 1 and box["y"] + box["height"] <= 1
    assert sim.state.quota == QUOTA - 2
    assert (sim.state.calls, sim.state.successes) == (2, 2)
    assert sim.state.calls_by_type == {"objects": 2}


@pytest.mark.parametrize("kind", ["celebrities", "detect_faces", "detect_text", "nsfw"])
async def test_every_type_answers_plausibly(sim: Sim, kind: str) -> None:
    form = {"apikey": KEY, "type": kind, "nsfw_min_confidence": "0"}
    r = await post(sim.url, data=form, files={"file": make_png(3)})
    assert r.status_code == 200
    data = r.json()["data"]
    assert data["type"] == kind and data["quota"] == QUOTA - 1
    assert 3 <= len(data["objects"]) <= 15
    confidences = [item["confidence"] for item in data["objects"]]
    assert confidences == sorted(confidences, reverse=True)
    if kind == "detect_faces":
        assert {item["name"] for item in data["objects"]} == {"Face"}
        assert all("emotions" in item and "age_range" in item for item in data["objects"])
    assert sim.state.calls_by_type == {kind: 1}


async def test_urlencoded_form_carries_the_file_bytes(sim: Sim) -> None:
    r = await post(sim.url, data={**objects_form(), "file": make_png(4)})
    assert r.status_code == 200, r.text
    assert sim.state.history[-1]["file_sha256"] == hashlib.sha256(make_png(4)).hexdigest()


# -- errors, exactly as the seed lists them ---------------------------------------------------

PNG, JPEG = make_png(1), make_jpeg(1)
NO_DATA = error(300, "Invalid request, no data received")
MAX_LABELS = error(430, "Invalid parameter max_labels: must be an integer > 0")
MIN_CONF = error(430, "Invalid parameter min_confidence: must be an integer between 0 and 100")
NSFW_CONF = error(
    430, "Invalid parameter nsfw_min_confidence: must be an integer between 0 and 100"
)
INVALID_FILE = error(412, "Invalid file")


def _without(key: str, **extra: Any) -> dict[str, Any]:
    return {k: v for k, v in objects_form(**extra).items() if k != key}


E400, E401 = error(400, "APIkey missing"), error(401, "APIkey invalid")
E415, E420 = error(415, "Invalid file format"), error(420, "Invalid type")
OBJECTS, F = objects_form(), {"file": PNG}

ERROR_CASES = [
    pytest.param({}, None, NO_DATA, id="300-no-fields"),
    pytest.param(_without("apikey"), F, E400, id="400"),
    pytest.param(objects_form(apikey=""), F, E400, id="400-empty"),
    pytest.param(objects_form(apikey="nope"), F, E401, id="401"),
    pytest.param(objects_form(apikey=KEY.upper()), F, E401, id="401-case"),
    pytest.param(_without("type"), F, E420, id="420-missing"),
    pytest.param(objects_form(type="faces"), F, E420, id="420"),
    pytest.param(objects_form(type="Objects"), F, E420, id="420-case"),
    pytest.param(OBJECTS, None, INVALID_FILE, id="412-no-file"),
    pytest.param(OBJECTS, {"file": b""}, INVALID_FILE, id="412-empty-file"),
    pytest.param(OBJECTS, {"file": b"GIF89a" + bytes(40)}, E415, id="415-gif"),
    pytest.param(OBJECTS, {"file": b"plain text"}, E415, id="415-text"),
    pytest.param(OBJECTS, {"file": PNG[:8] + PNG[33:]}, INVALID_FILE, id="412-png-no-ihdr"),
    pytest.param(OBJECTS, {"file": PNG[:20]}, INVALID_FILE, id="412-png-cut-ihdr"),
    pytest.param(OBJECTS, {"file": JPEG[:3]}, INVALID_FILE, id="412-jpeg-3-bytes"),
    pytest.param(_without("max_labels"), F, MAX_LABELS, id="430-max-labels-missing"),
    pytest.param(objects_form(max_labels="0"), F, MAX_LABELS, id="430-max-labels-0"),
    pytest.param(objects_form(max_labels="-3"), F, MAX_LABELS, id="430-max-labels-neg"),
    pytest.param(objects_form(max_labels="1.5"), F, MAX_LABELS, id="430-max-labels-float"),
    pytest.param(objects_form(max_labels="+2"), F, MAX_LABELS, id="430-max-labels-plus"),
    pytest.param(objects_form(max_labels=""), F, MAX_LABELS, id="430-max-labels-empty"),
    pytest.param(_without("min_confidence"), F, MIN_CONF, id="430-min-conf-missing"),
    pytest.param(objects_form(min_confidence="101"), F, MIN_CONF, id="430-min-conf-101"),
    pytest.param(objects_form(min_confidence="high"), F, MIN_CONF, id="430-min-conf-word"),
    pytest.param({"apikey": KEY, "type": "nsfw"}, F, NSFW_CONF, id="430-nsfw-missing"),
    pytest.param(
        {"apikey": KEY, "type": "nsfw", "nsfw_min_confidence": "200"}, F, NSFW_CONF,
        id="430-nsfw-200",
    ),
    # The order of the checks: the first failing one answers.
    pytest.param(objects_form(apikey="nope", type="x"), None, E401, id="401-before-420"),
    pytest.param(objects_form(type="x"), None, E420, id="420-before-412"),
    pytest.param(_without("max_labels"), None, INVALID_FILE, id="412-before-430"),
    pytest.param(_without("max_labels"), {"file": b"BM"}, E415, id="415-before-430"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "files", "expected"), ERROR_CASES)
async def test_errors_use_the_seeds_codes_and_messages(
    sim: Sim, data: dict[str, Any], files: dict[str, bytes] | None, expected: dict[str, Any]
) -> None:
    r = await post(sim.url, data=data, files=files)
    assert r.status_code == expected["status"]
    assert r.json() == expected
    assert sim.state.quota == QUOTA and sim.state.successes == 0 and sim.state.calls == 1


@pytest.mark.parametrize(
    ("path", "method", "params"),
    [
        pytest.param("/api/v2", "POST", None, id="no-trailing-slash"),
        pytest.param("/api/v2/", "GET", {"apikey": KEY, "type": "objects"}, id="get-not-cache"),
        pytest.param("/api/v2/", "GET", {}, id="get-nothing"),
        pytest.param("/api/v2/", "PUT", None, id="put"),
    ],
)
async def test_no_data_received(
    sim: Sim, path: str, method: str, params: dict[str, str] | None
) -> None:
    def call() -> requests.Response:
        files = {"file": PNG} if method in ("POST", "PUT") else None
        data = objects_form() if files else None
        return requests.request(
            method, sim.base + path, params=params, data=data, files=files, timeout=10
        )

    r = await asyncio.to_thread(call)
    assert (r.status_code, r.json()) == (300, NO_DATA)


async def test_malformed_multipart_is_no_data(sim: Sim) -> None:
    headers = {"Content-Type": "multipart/form-data; boundary=xyz"}
    r = await post(sim.url, data=b"--abc\r\nnot a multipart body", headers=headers)
    assert (r.status_code, r.json()) == (300, NO_DATA)


async def test_file_size_limit_is_50_mib(sim: Sim) -> None:
    too_big = make_png_of_size(MAX_FILE_BYTES + 1, seed=1)
    r = await post(sim.url, data=objects_form(), files={"file": too_big})
    assert (r.status_code, r.json()) == (413, error(413, "Image size too large"))
    at_limit = make_png(1) + bytes(MAX_FILE_BYTES - len(make_png(1)))
    r = await post(sim.url, data=objects_form(), files={"file": at_limit})
    assert r.status_code == 200


async def test_quota_exhausted_is_402_after_validation(sim: Sim) -> None:
    sim.state.quota = 1
    assert (await post(sim.url, data=objects_form(), files={"file": PNG})).status_code == 200
    r = await post(sim.url, data=objects_form(), files={"file": PNG})
    assert (r.status_code, r.json()) == (402, error(402, "Quota limit reached"))
    r = await post(sim.url, data=objects_form(max_labels="0"), files={"file": PNG})
    assert r.json() == MAX_LABELS
    assert sim.state.quota == 0 and sim.state.successes == 1


# -- results ----------------------------------------------------------------------------------


async def test_results_are_deterministic_per_image_and_type(sim: Sim) -> None:
    async def objects(image: bytes, kind: str = "objects") -> list[dict[str, Any]]:
        form = {**objects_form(type=kind), "nsfw_min_confidence": 0}
        r = await post(sim.url, data=form, files={"file": image})
        result: list[dict[str, Any]] = r.json()["data"]["objects"]
        return result

    sim.state.quota = 100
    first = await objects(make_png(7))
    assert await objects(make_png(7)) == first
    assert first == recognize(make_png(7), "objects")
    assert await objects(make_png(8)) != first
    assert await objects(make_png(7), "nsfw") != first
    assert await objects(make_jpeg(7)) == await objects(make_jpeg(7))


def _image_with_spread() -> tuple[bytes, list[dict[str, Any]]]:
    """An image whose candidates straddle 80% confidence, with at least 3 above it."""
    for seed in range(1000):
        found = recognize(make_png(seed), "objects")
        if sum(o["confidence"] >= 80 for o in found) >= 3 and found[-1]["confidence"] < 80:
            return make_png(seed), found
    raise AssertionError("no suitable image")


async def test_min_confidence_filters_and_max_labels_truncates(sim: Sim) -> None:
    image, found = _image_with_spread()

    async def names(max_labels: int, min_confidence: int) -> list[str]:
        form = objects_form(max_labels=max_labels, min_confidence=min_confidence)
        r = await post(sim.url, data=form, files={"file": image})
        return [o["name"] for o in r.json()["data"]["objects"]]

    everything = [o["name"] for o in found]
    confident = [o["name"] for o in found if o["confidence"] >= 80]
    assert await names(100, 0) == everything
    assert await names(100, 80) == confident
    assert await names(2, 80) == confident[:2]
    assert await names(1, 0) == everything[:1]
    assert await names(5, 100) == []


async def test_nsfw_min_confidence_filters(sim: Sim) -> None:
    image = make_jpeg(5)
    found = recognize(image, "nsfw")
    form = {"apikey": KEY, "type": "nsfw", "nsfw_min_confidence": " 70 "}
    r = await post(sim.url, data=form, files={"file": image})
    assert r.json()["data"]["objects"] == [o for o in found if o["confidence"] >= 70]


async def test_cache_type_lists_earlier_results_free_of_charge(sim: Sim) -> None:
    await post(sim.url, data=objects_form(), files={"file": make_png(1)})
    await post(sim.url, data=objects_form(), files={"file": make_png(2)})

    r = await get(sim.url, apikey=KEY, type="cache")
    assert r.status_code == 200
    data = r.json()["data"]
    assert (data["error"], data["type"], data["quota"]) == (0, "cache", QUOTA - 2)
    assert [entry["type"] for entry in data["results"]] == ["objects", "objects"]

    r = await post(sim.url, data={"apikey": KEY, "type": "cache"}, files={"file": make_png(2)})
    [entry] = r.json()["data"]["results"]
    assert entry["file_sha256"] == hashlib.sha256(make_png(2)).hexdigest()

    r = await get(sim.url, apikey="nope", type="cache")
    assert (r.status_code, r.json()) == (401, error(401, "APIkey invalid"))
    assert sim.state.quota == QUOTA - 2 and sim.state.successes == 2


# -- faults -----------------------------------------------------------------------------------


async def test_fault_500_and_503_are_plain_text_and_not_charged(sim: Sim) -> None:
    for fault, text in (("500", "Internal Server Error"), ("503", "Service Unavailable")):
        sim.state.fault = fault
        r = await post(sim.url, data=objects_form(), files={"file": PNG})
        assert (r.status_code, r.text) == (int(fault), text)
        assert r.headers["Content-Type"].startswith("text/plain")
    assert sim.state.quota == QUOTA and sim.state.successes == 0 and sim.state.calls == 2


async def test_fault_garbage_is_html_with_status_200(sim: Sim) -> None:
    sim.state.fault = "garbage"
    r = await post(sim.url, data=objects_form(), files={"file": PNG})
    assert (r.status_code, r.text) == (200, "<html>not json</html>")
    assert r.headers["Content-Type"].startswith("text/html")
    assert sim.state.quota == QUOTA


async def test_fault_reset_drops_the_connection(sim: Sim) -> None:
    sim.state.fault = "reset"
    with pytest.raises(requests.ConnectionError):
        await post(sim.url, data=objects_form(), files={"file": PNG})
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.post(sim.url, data=objects_form()) as resp:
                await resp.read()
    assert sim.state.quota == QUOTA and sim.state.calls == 2


async def test_fault_timeout_never_answers(sim: Sim) -> None:
    sim.state.fault = "timeout"
    timeout = aiohttp.ClientTimeout(total=0.3)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with pytest.raises(TimeoutError):
            async with session.post(sim.url, data=objects_form()) as resp:
                await resp.read()
    assert sim.state.calls == 1 and sim.state.history[-1]["status"] is None
    # The fixture's cleanup must not wait for the hung request: this test stays fast.


async def test_fault_trickle_sends_one_byte_every_50_ms(sim: Sim) -> None:
    sim.state.fault = "trickle"
    async with aiohttp.ClientSession() as session:
        async with session.post(sim.url, data=objects_form()) as resp:
            assert resp.status == 412  # the envelope for this request, trickled
            length = int(resp.headers["Content-Length"])
            received = b""
            deadline = time.monotonic() + 0.4
            while time.monotonic() < deadline:
                try:
                    chunk = await asyncio.wait_for(resp.content.read(1), 0.1)
                except TimeoutError:
                    continue
                received += chunk
    assert 3 <= len(received) <= 12 < length
    assert received == b'{"status":412'[: len(received)]


async def test_fault_trickle_delivers_a_whole_uncharged_success(
    sim: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sim_module, "TRICKLE_INTERVAL_S", 0.001)
    sim.state.fault = "trickle"
    r = await post(sim.url, data=objects_form(max_labels=1), files={"file": PNG})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    body = r.json()
    assert body["message"] == "Success" and body["data"]["quota"] == QUOTA
    assert body["data"]["objects"] == recognize(PNG, "objects")[:1]
    assert sim.state.quota == QUOTA and sim.state.successes == 0


async def test_fault_count_limits_a_fault_then_it_clears(sim: Sim) -> None:
    sim.state.fault, sim.state.fault_count = "500", 2
    statuses = []
    for _ in range(3):
        r = await post(sim.url, data=objects_form(), files={"file": PNG})
        statuses.append(r.status_code)
    assert statuses == [500, 500, 200]
    assert (sim.state.fault, sim.state.fault_count) == ("none", -1)
    assert sim.state.quota == QUOTA - 1


async def test_latency_delays_every_answer(sim: Sim) -> None:
    sim.state.latency_ms = 200
    started = time.monotonic()
    r = await post(sim.url, data={})
    assert r.status_code == 300 and time.monotonic() - started >= 0.2


# -- state and control endpoints --------------------------------------------------------------


async def test_history_records_requests_without_the_key(sim: Sim) -> None:
    await post(sim.url, data=objects_form(), files={"file": PNG})
    await post(sim.url, data=objects_form(apikey="nope"))
    ok, bad = sim.state.history
    assert ok == {
        "type": "objects",
        "fields": {"type": "objects", "max_labels": "10", "min_confidence": "0"},
        "file_size": len(PNG),
        "file_sha256": hashlib.sha256(PNG).hexdigest(),
        "status": 200,
        "fault": "none",
    }
    assert (bad["status"], bad["file_size"], bad["file_sha256"]) == (401, 0, None)

    async with aiohttp.ClientSession() as session:
        for _ in range(110):
            async with session.post(sim.url, data={"type": "objects"}) as resp:
                await resp.read()
    assert len(sim.state.history) == 100 and sim.state.calls == 112


async def test_control_endpoints(sim: Sim) -> None:
    async with aiohttp.ClientSession() as session:

        async def control(path: str, body: Any = None) -> tuple[int, Any]:
            async with session.post(sim.base + path, json=body) as resp:
                return resp.status, await resp.json()

        status, stats = await control("/_sim/control", {"fault": "503", "fault_count": 1})
        assert status == 200 and (stats["fault"], stats["fault_count"]) == ("503", 1)
        async with session.post(sim.url, data=objects_form()) as resp:
            assert resp.status == 503
        async with session.post(sim.url, data=objects_form()) as resp:
            assert resp.status == 412  # the fault is used up: a normal answer again

        status, stats = await control("/_sim/control", {"latency_ms": 5, "quota": 42})
        assert (stats["latency_ms"], stats["quota"]) == (5.0, 42)
        for bad in ({"fault": "melt"}, {"quota": "1"}, {"latency_ms": -1}, {"calls": 0}, [1]):
            status, answer = await control("/_sim/control", bad)
            assert status == 400 and "error" in answer

        async with session.get(sim.base + "/_sim/stats") as resp:
            stats = await resp.json()
        assert stats["calls"] == 2 and stats["successes"] == 0 and stats["quota"] == 42
        assert set(stats) == {
            "calls", "successes", "calls_by_type", "quota", "fault", "fault_count",
            "latency_ms", "model", "history",
        }  # fmt: skip

        status, stats = await control("/_sim/reset")
        assert (stats["calls"], stats["history"], stats["quota"]) == (0, [], 42)
        status, stats = await control("/_sim/reset", {"quota": 7})
        assert stats["quota"] == 7 and sim.state.quota == 7
    assert sim.state.calls == 0  # control requests are never counted


# -- serve_sim, the blocking entry point ------------------------------------------------------


def test_serve_sim_prints_its_url_and_stops_on_sigterm() -> None:
    root = Path(__file__).resolve().parents[2]
    code = (
        "from gateway.devtools.sim import serve_sim; "
        "serve_sim(host='127.0.0.1', port=0, api_key='k', quota=3)"
    )
    env = {**os.environ, "PYTHONPATH": str(root)}
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=root
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        prefix, _, rest = line.rpartition(":")
        assert prefix == "simulator listening on http://127.0.0.1"
        assert rest.endswith("/api/v2/")
        url = f"http://127.0.0.1:{rest.removesuffix('/api/v2/')}"
        stats = requests.get(f"{url}/_sim/stats", timeout=5).json()
        assert stats["quota"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
