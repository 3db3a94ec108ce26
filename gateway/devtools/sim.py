"""A faithful simulator of the upstream ImageRecognize v2 API, for tests and ``gateway demo``.

It follows ``seed/imagerecognize-api-v2.txt`` and nothing else: it is an independent reference,
so it imports no other ``gateway`` module. Results are deterministic functions of the image
bytes and the type. Fault switches (``/_sim/control``) make it fail the ways a real upstream
can: 500/503 pages, hangs, resets, non-JSON bodies and trickled responses; and the ways a
hostile one could: a redirect elsewhere (``redirect``), a success nested too deep to re-encode
(``deep``), an error message echoing the request, key included (``echo``).

``objects`` follows the seed's model: the candidates with confidence >= ``min_confidence``,
highest first, at most ``max_labels``. ``/_sim/control {"model": "cap-first"}`` breaks it the
way an engine might: it takes the first ``max_labels`` candidates in detection order, then
filters and sorts them, so a smaller ``max_labels`` is no longer a prefix of a larger one's
answer (the gateway's cache audit must catch that).

Long because: it is an independent reference of the whole seed API (every type, status and
fault switch) and by design imports no other gateway module, so it shares no code.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json
import random
import re
import signal
import socket
import struct
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MAX_FILE_BYTES = 50 * 1024 * 1024
TYPES = ("objects", "celebrities", "detect_faces", "detect_text", "nsfw", "cache")
FAULTS = (
    "none",
    "500",
    "timeout",
    "reset",
    "garbage",
    "trickle",
    "503",
    "redirect",
    "deep",
    "echo",
)
MODELS = ("seed", "cap-first")
DEEP_NESTING = 100_000
HISTORY_LEN = 100
TRICKLE_INTERVAL_S = 0.05
HANG_S = 3600.0
# Above MAX_FILE_BYTES so an oversized file still gets the envelope's 413, not aiohttp's own.
_CLIENT_MAX_SIZE = MAX_FILE_BYTES + 16 * 1024 * 1024
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_INT = re.compile(r"\s*([0-9]+)\s*", re.ASCII)

_VOCABULARY: dict[str, tuple[str, ...]] = {
    "objects": (
        "Car", "Pedestrian", "Dog", "Cat", "Tree", "Bicycle", "Person", "Building",
        "Traffic Light", "Bus", "Bird", "Chair", "Bottle", "Laptop", "Boat", "Horse",
        "Cup", "Umbrella", "Clock", "Bench",
    ),
    "celebrities": (
        "Ada Quillfeather", "Bram Holloway", "Cleo Marchetti", "Dax Okonkwo", "Elin Varga",
        "Fitz Calloway", "Greta Sundqvist", "Hugo Brandtner", "Ines Moreau", "Jonah Pike",
        "Kira Tanabe", "Lars Eriksund", "Mina Castellano", "Nico Fairweather", "Odette Lune",
    ),
    "detect_text": (
        "STOP", "EXIT", "OPEN", "SALE", "Main St", "Welcome", "No Parking", "Coffee", "24h",
        "Pharmacy", "Hotel", "Taxi", "Bus Stop", "One Way", "Platform 9", "Fire Exit",
    ),
    "nsfw": (
        "Explicit Nudity", "Suggestive", "Violence", "Visually Disturbing", "Rude Gestures",
        "Drugs", "Tobacco", "Alcohol", "Gambling", "Hate Symbols",
    ),
}  # fmt: skip
_STATS = "calls successes calls_by_type quota fault fault_count latency_ms model history".split()
_EMOTIONS = ("HAPPY", "CALM", "SURPRISED", "SAD", "ANGRY", "CONFUSED")


@dataclass
class SimState:
    """The simulator's live counters and fault switches (mutable)."""

    api_key: str
    quota: int
    latency_ms: float = 0.0
    fault: str = "none"
    fault_count: int = -1
    model: str = "seed"  # or "cap-first": objects answers that break the seed's model
    calls: int = 0
    calls_by_type: dict[str, int] = field(default_factory=dict)
    successes: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # What type=cache answers: this account's earlier successful results.
    results: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def stats(self) -> dict[str, Any]:
        return {name: copy.copy(getattr(self, name)) for name in _STATS}

    def take_fault(self) -> str:
        """The fault for this request, counting down a limited fault."""
        fault = self.fault
        if fault != "none" and self.fault_count >= 0:
            if self.fault_count == 0:
                fault = "none"
            else:
                self.fault_count -= 1
            if self.fault_count == 0:
                self.fault, self.fault_count = "none", -1
        return fault

    def reset(self) -> None:
        self.calls = self.successes = 0
        self.calls_by_type.clear()
        self.history.clear()
        self.results.clear()
        self.fault, self.fault_count = "none", -1
        self.model = "seed"


SIM_STATE = web.AppKey("sim_state", SimState)
_STOPPING = web.AppKey("sim_stopping", asyncio.Event)


class _Rejected(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Form:
    fields: dict[str, str]
    file: bytes | None = None


# -- /api/v2/ -------------------------------------------------------------------------------


async def _read_form(request: web.Request) -> _Form:
    if request.method == "GET":
        return _Form({k: request.query.getone(k) for k in request.query})
    if request.method != "POST":
        return _Form({})
    items: list[tuple[str, Any]]
    try:
        if request.content_type in ("", "application/x-www-form-urlencoded"):
            # Parsed here, not by request.post(), so a percent-encoded file keeps its bytes.
            raw = (await request.read()).decode("latin-1")
            pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True, encoding="latin-1")
            items = [(name, value.encode("latin-1")) for name, value in pairs]
        else:
            items = list((await request.post()).items())
    except web.HTTPRequestEntityTooLarge:
        raise _Rejected(413, "Image size too large") from None
    except (ValueError, LookupError, RuntimeError, AssertionError):  # malformed body
        raise _Rejected(300, "Invalid request, no data received") from None
    form = _Form({})
    for name, value in reversed(items):  # the first occurrence of a name wins
        if isinstance(value, web.FileField):
            data = value.file.read()
        else:
            data = value.encode("utf-8", "replace") if isinstance(value, str) else bytes(value)
        if name == "file":
            form.file = data
        else:
            form.fields[name] = data.decode("utf-8", "replace")
    return form


def _int_param(fields: dict[str, str], name: str, low: int, high: int | None, rule: str) -> int:
    match = _INT.fullmatch(fields.get(name, ""))
    if match is None:
        raise _Rejected(430, f"Invalid parameter {name}: {rule}")
    digits = match[1].lstrip("0") or "0"
    # Clamp absurdly long numbers instead of tripping int()'s digit limit.
    value = int(digits) if len(digits) <= 18 else 10**18
    if value < low or (high is not None and value > high):
        raise _Rejected(430, f"Invalid parameter {name}: {rule}")
    return value


def _check_params(kind: str, fields: dict[str, str]) -> dict[str, int]:
    percent = "must be an integer between 0 and 100"
    if kind == "objects":
        return {
            "max_labels": _int_param(fields, "max_labels", 1, None, "must be an integer > 0"),
            "min_confidence": _int_param(fields, "min_confidence", 0, 100, percent),
        }
    if kind == "nsfw":
        return {"nsfw_min_confidence": _int_param(fields, "nsfw_min_confidence", 0, 100, percent)}
    return {}


def _check_image(image: bytes | None) -> bytes:
    if not image:
        raise _Rejected(412, "Invalid file")
    if len(image) > MAX_FILE_BYTES:
        raise _Rejected(413, "Image size too large")
    if image.startswith(_PNG_SIGNATURE):
        # The signature must be followed by a complete 13-byte IHDR chunk.
        if len(image) < 33 or image[8:16] != struct.pack(">I", 13) + b"IHDR":
            raise _Rejected(412, "Invalid file")
    elif image.startswith(_JPEG_MAGIC):
        if len(image) < 4:
            raise _Rejected(412, "Invalid file")
    else:
        raise _Rejected(415, "Invalid file format")
    return image


def _box(rng: random.Random) -> dict[str, float]:
    # Whole hundredths, so every value has two decimals and the box stays inside the image.
    x, y = rng.randint(0, 95), rng.randint(0, 95)
    w, h = rng.randint(1, 100 - x), rng.randint(1, 100 - y)
    return {"x": x / 100, "y": y / 100, "width": w / 100, "height": h / 100}


def recognize(image: bytes, kind: str) -> list[dict[str, Any]]:
    """Every candidate the simulated engine sees in ``image``, best first (before filtering)."""
    return sorted(_detect(image, kind), key=lambda item: -item["confidence"])


def _detect(image: bytes, kind: str) -> list[dict[str, Any]]:
    """Every candidate, in detection order."""
    rng = random.Random(hashlib.sha256(image + kind.encode()).digest())
    count = rng.randint(3, 15)
    names = ["Face"] * count if kind == "detect_faces" else list(_VOCABULARY[kind])
    names = rng.sample(names, min(count, len(names)))
    found: list[dict[str, Any]] = []
    for name in names:
        boxes = rng.randint(1, 3) if kind == "objects" else 1
        item: dict[str, Any] = {
            "name": name,
            "confidence": rng.randint(3000, 9999) / 100,
            "coordinates": [_box(rng) for _ in range(boxes)],
        }
        if kind == "detect_faces":
            low = rng.randint(1, 70)
            emotions = [
                {"type": emotion, "confidence": rng.randint(100, 9999) / 100}
                for emotion in rng.sample(_EMOTIONS, 2)
            ]
            item["emotions"] = sorted(emotions, key=lambda e: -e["confidence"])
            item["age_range"] = {"low": low, "high": low + rng.randint(4, 12)}
        found.append(item)
    return found


def _analyse(
    image: bytes, kind: str, params: dict[str, int], model: str = "seed"
) -> list[dict[str, Any]]:
    if kind == "objects" and model == "cap-first":
        first = _detect(image, kind)[: params["max_labels"]]
        kept = [o for o in first if o["confidence"] >= params["min_confidence"]]
        return sorted(kept, key=lambda item: -item["confidence"])
    found = recognize(image, kind)
    if kind == "objects":
        kept = [o for o in found if o["confidence"] >= params["min_confidence"]]
        return kept[: params["max_labels"]]
    if kind == "nsfw":
        return [o for o in found if o["confidence"] >= params["nsfw_min_confidence"]]
    return found


def _process(state: SimState, request: web.Request, form: _Form, *, charge: bool) -> dict[str, Any]:
    """The upstream's success envelope for this request; raises _Rejected for its errors."""
    no_data = _Rejected(300, "Invalid request, no data received")
    fields = form.fields
    if request.path != "/api/v2/" or request.method not in ("GET", "POST"):
        raise no_data
    if not fields and form.file is None:
        raise no_data
    if request.method == "GET" and fields.get("type") != "cache":
        raise no_data
    apikey = fields.get("apikey", "")
    if not apikey:
        raise _Rejected(400, "APIkey missing")
    if not hmac.compare_digest(apikey.encode(), state.api_key.encode()):
        raise _Rejected(401, "APIkey invalid")
    kind = fields.get("type", "")
    if kind not in TYPES:
        raise _Rejected(420, "Invalid type")
    if kind == "cache":
        results = state.results
        if form.file:
            wanted = hashlib.sha256(form.file).hexdigest()
            results = [r for r in results if r["file_sha256"] == wanted]
        data = {"error": 0, "type": "cache", "results": results, "quota": state.quota}
        return {"status": 200, "message": "Success", "data": data}
    image = _check_image(form.file)
    params = _check_params(kind, fields)
    if state.quota <= 0:
        raise _Rejected(402, "Quota limit reached")
    objects = _analyse(image, kind, params, state.model)
    if charge:
        state.quota -= 1
        state.successes += 1
        state.calls_by_type[kind] = state.calls_by_type.get(kind, 0) + 1
        state.results.append(
            {
                "type": kind,
                "params": params,
                "file_sha256": hashlib.sha256(image).hexdigest(),
                "objects": objects,
                "created_at": int(time.time()),
            }
        )
        del state.results[:-HISTORY_LEN]
    data = {"error": 0, "type": kind, "objects": objects, "quota": state.quota}
    return {"status": 200, "message": "Success", "data": data}


def _encode(envelope: dict[str, Any]) -> bytes:
    return json.dumps(envelope, separators=(",", ":")).encode()


def _abort(request: web.Request) -> None:
    """Drop the connection with a TCP reset, never answering."""
    if (transport := request.transport) is not None:
        if (sock := transport.get_extra_info("socket")) is not None:
            # Linger 0: closing sends RST, so the client sees a reset, not a clean EOF.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()


async def _trickle(request: web.Request, status: int, body: bytes) -> web.StreamResponse:
    response = web.StreamResponse(status=status)
    response.content_type = "text/plain"
    response.content_length = len(body)
    stopping = request.app[_STOPPING]
    try:
        await response.prepare(request)
        for i in range(len(body)):
            if stopping.is_set():
                _abort(request)
                return response
            await response.write(body[i : i + 1])
            await asyncio.sleep(TRICKLE_INTERVAL_S)
        await response.write_eof()
    except ConnectionError:  # the client hung up mid-trickle
        pass
    return response


async def _api(request: web.Request) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    state.calls += 1
    early: _Rejected | None = None
    try:
        form = await _read_form(request)
    except _Rejected as exc:
        form, early = _Form({}), exc
    fault = state.take_fault()
    if state.latency_ms > 0:
        await asyncio.sleep(state.latency_ms / 1000)

    entry: dict[str, Any] = {
        "type": form.fields.get("type"),
        "fields": {k: v for k, v in form.fields.items() if k != "apikey"},
        "file_size": len(form.file or b""),
        "file_sha256": hashlib.sha256(form.file).hexdigest() if form.file is not None else None,
        "status": None,
        "fault": fault,
    }
    state.history.append(entry)
    del state.history[:-HISTORY_LEN]

    if fault in ("500", "503"):
        entry["status"] = int(fault)
        reason = "Internal Server Error" if fault == "500" else "Service Unavailable"
        return web.Response(status=int(fault), text=reason)
    if fault == "garbage":
        entry["status"] = 200
        return web.Response(text="<html>not json</html>", content_type="text/html")
    if fault == "redirect":  # anything re-POSTed there would carry the key
        entry["status"] = 307
        raise web.HTTPTemporaryRedirect("/_sim/elsewhere")
    if fault == "deep":
        entry["status"] = 200
        nested = "[" * DEEP_NESTING + "]" * DEEP_NESTING
        return web.Response(text=f'{{"status":200,"message":"Success","data":{{"x":{nested}}}}}')
    if fault == "echo":
        entry["status"] = 430
        echo = "&".join(f"{k}={v}" for k, v in form.fields.items())
        message = f"Invalid parameter in request:\r\n{echo}"
        echoed = {"status": 430, "status_message": message, "data": None}
        return web.Response(status=430, body=_encode(echoed), content_type="text/plain")
    if fault in ("timeout", "reset"):
        if fault == "timeout":
            try:
                await asyncio.wait_for(request.app[_STOPPING].wait(), HANG_S)
            except TimeoutError:
                pass
        _abort(request)
        return web.Response()  # never sent: the transport is gone

    try:
        if early is not None:
            raise early
        envelope = _process(state, request, form, charge=fault == "none")
    except _Rejected as exc:
        envelope = {"status": exc.status, "status_message": exc.message, "data": None}
    entry["status"] = envelope["status"]
    if fault == "trickle":
        return await _trickle(request, envelope["status"], _encode(envelope))
    return web.Response(
        status=envelope["status"], body=_encode(envelope), content_type="text/plain"
    )


# -- control endpoints ----------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_CONTROLS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "latency_ms": (lambda v: (_is_int(v) or isinstance(v, float)) and v >= 0, "a number >= 0"),
    "quota": (_is_int, "an integer"),
    "fault": (lambda v: v in FAULTS, "one of " + ", ".join(FAULTS)),
    "fault_count": (lambda v: _is_int(v) and v >= -1, "an integer >= -1 (-1: until changed)"),
    "model": (lambda v: v in MODELS, "one of " + ", ".join(MODELS)),
}


def _apply_control(state: SimState, body: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(body, dict):
        raise _Rejected(400, "body must be a JSON object")
    for key, value in body.items():
        if key not in allowed:
            raise _Rejected(400, f"unknown key {key!r}; allowed: {', '.join(allowed)}")
        check, rule = _CONTROLS[key]
        if not check(value):
            raise _Rejected(400, f"{key} must be {rule}")
    if "fault" in body:  # a new fault lasts until changed unless a count comes with it
        body.setdefault("fault_count", -1)
    for key, value in body.items():
        setattr(state, key, float(value) if key == "latency_ms" else value)


async def _control_request(request: web.Request, allowed: tuple[str, ...]) -> web.Response:
    state = request.app[SIM_STATE]
    try:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise _Rejected(400, "body must be JSON") from None
        if request.path == "/_sim/reset":
            state.reset()
        _apply_control(state, body, allowed)
    except _Rejected as exc:
        return web.json_response({"error": exc.message}, status=exc.status)
    return web.json_response(state.stats())


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM_STATE].stats())


async def _control(request: web.Request) -> web.Response:
    return await _control_request(
        request, ("latency_ms", "fault", "fault_count", "quota", "model")
    )


async def _reset(request: web.Request) -> web.Response:
    return await _control_request(request, ("latency_ms", "quota"))


# -- running --------------------------------------------------------------------------------


async def _release_hung_requests(app: web.Application) -> None:
    app[_STOPPING].set()


def create_sim_app(*, api_key: str, quota: int, latency_ms: float = 0.0) -> web.Application:
    app = web.Application(client_max_size=_CLIENT_MAX_SIZE)
    app[SIM_STATE] = SimState(api_key=api_key, quota=quota, latency_ms=latency_ms)
    app[_STOPPING] = asyncio.Event()
    app.on_shutdown.append(_release_hung_requests)
    for path in ("/api/v2/", "/api/v2"):
        app.router.add_route("*", path, _api)
    app.router.add_get("/_sim/stats", _stats)
    app.router.add_post("/_sim/control", _control)
    app.router.add_post("/_sim/reset", _reset)
    return app


async def start_sim(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str,
    quota: int,
    latency_ms: float = 0.0,
) -> tuple[web.AppRunner, int, SimState]:
    """Start the simulator on ``host:port`` (0: a free port); stop it with ``runner.cleanup()``."""
    app = create_sim_app(api_key=api_key, quota=quota, latency_ms=latency_ms)
    runner = web.AppRunner(app, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound: int = runner.addresses[0][1]
    return runner, bound, app[SIM_STATE]


async def _serve(host: str, port: int, api_key: str, quota: int, latency_ms: float) -> None:
    runner, bound, _ = await start_sim(
        host=host, port=port, api_key=api_key, quota=quota, latency_ms=latency_ms
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    shown = f"[{host}]" if ":" in host else host
    print(f"simulator listening on http://{shown}:{bound}/api/v2/", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def serve_sim(*, host: str, port: int, api_key: str, quota: int, latency_ms: float = 0.0) -> None:
    """Run the simulator until SIGINT or SIGTERM (``gateway sim``)."""
    asyncio.run(_serve(host, port, api_key, quota, latency_ms))
