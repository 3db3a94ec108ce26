"""Fuzzing the whole /api/v2/ request path through a real gateway on a loopback socket.

Hypothesis drives a blocking HTTP client in a worker thread while the gateway and the
simulator run on the test's event loop, so one gateway serves every example of a test.
Whatever arrives, the answer is the envelope with a status the design allows (never a 500),
an error made no upstream call and charged nothing, and no answer names the upstream key.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import logging
import os
import string
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus, urlencode

import pytest
import xxhash
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from urllib3 import encode_multipart_formdata

from gateway.devtools.sample_images import make_jpeg, make_png, make_png_of_size
from tests.support import TEAM_KEYS, UPSTREAM_KEY, Gateway, GatewayFactory, Sim

SEARCH = TEAM_KEYS["search"]
ENVELOPE_STATUSES = {200, 300, 400, 401, 402, 412, 413, 415, 420, 429, 430, 502, 503, 504}
# What the upstream itself may answer about a forwarded input that passed every local check
# (the gateway checks magic bytes only: a PNG signature followed by a broken IHDR goes out).
UPSTREAM_VERDICTS = {412, 413, 415, 420, 430}
PARAMS = {"objects": (("max_labels", 1, 2**31 - 1), ("min_confidence", 0, 100)),
          "nsfw": (("nsfw_min_confidence", 0, 100),), "celebrities": (), "detect_faces": (),
          "detect_text": ()}
VALID_PARAMS = {"max_labels": "10", "min_confidence": "80", "nsfw_min_confidence": "50"}
# No shrinking: every example is a real HTTP exchange, and shrinking a failure through the
# network takes longer than finding it (the failing example is printed as found).
FUZZ = settings(deadline=None, database=None,
                max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes


@dataclass(frozen=True)
class Snapshot:
    calls: int
    used: dict[str, int]


class Probe:
    """A blocking client for a worker thread, checking every answer against the contract."""

    def __init__(self, gw: Gateway, sim: Sim, loop: asyncio.AbstractEventLoop) -> None:
        self.gw, self.sim, self.loop = gw, sim, loop
        self.port = int(gw.runner.addresses[0][1])
        self.answers = 0

    def snapshot(self) -> Snapshot:
        async def used() -> dict[str, int]:
            period = self.gw.state.ledger.period()
            return {team: await self.gw.state.store.used(team, period) for team in TEAM_KEYS}

        return Snapshot(self.sim.state.calls,
                        asyncio.run_coroutine_threadsafe(used(), self.loop).result(10))

    def send(self, method: str, target: str, body: bytes | None = None,
             headers: dict[str, str] | None = None, chunk: int | None = None) -> Answer:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        try:
            payload: Any = body
            if chunk is not None and body is not None:
                payload = (body[i : i + chunk] for i in range(0, len(body), chunk))
            conn.request(method, target, body=payload, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()},
                          data)
        finally:
            conn.close()

    def exchange(self, method: str, target: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None,
                 chunk: int | None = None) -> tuple[Answer, dict[str, Any]]:
        """Send one request and check the answer's contract; returns the envelope."""
        before = self.snapshot()
        answer = self.send(method, target, body, headers, chunk)
        return answer, self.check(answer, before)

    def check(self, answer: Answer, before: Snapshot) -> dict[str, Any]:
        after = self.snapshot()
        self.answers += 1
        shown = f"{answer.status} {answer.body[:300]!r}"
        assert answer.status in ENVELOPE_STATUSES, shown
        envelope = json.loads(answer.body)
        assert isinstance(envelope, dict) and envelope.get("status") == answer.status, shown
        secret = UPSTREAM_KEY.encode()
        assert secret not in answer.body, shown
        assert not any(UPSTREAM_KEY in v for v in answer.headers.values()), answer.headers
        cache_status = answer.headers.get("cache-status")
        charged = sum(after.used.values()) - sum(before.used.values())
        upstream_calls = after.calls - before.calls
        if answer.status == 200:
            assert list(envelope) == ["status", "message", "data"], shown
            assert isinstance(envelope["data"], dict), shown
            if cache_status is not None and "fwd=" in cache_status:
                assert (charged, upstream_calls) == (1, 1), (shown, cache_status)
            else:  # a hit, a coalesced follower or a type=cache listing: free
                assert (charged, upstream_calls) == (0, 0), (shown, cache_status)
            return envelope
        assert list(envelope) == ["status", "status_message", "data"], shown
        assert envelope["data"] is None and isinstance(envelope["status_message"], str), shown
        assert cache_status is None, (shown, cache_status)
        assert after.used == before.used, (shown, before, after)
        if upstream_calls:
            verdict = self.sim.state.history[-1]["status"]
            assert upstream_calls == 1 and answer.status in UPSTREAM_VERDICTS, shown
            assert verdict == answer.status, (shown, verdict)
        return envelope


@pytest.fixture
async def probe(gateway_factory: GatewayFactory, sim: Sim) -> Probe:
    # Quotas no run of examples exhausts (FUZZ_EXAMPLES may be large); tiny still runs out.
    gw = await gateway_factory(teams={
        "search": {"keys": [SEARCH], "quota": 1_000_000},
        "ads": {"keys": [TEAM_KEYS["ads"]], "quota": 1_000_000},
        "tiny": {"keys": [TEAM_KEYS["tiny"]], "quota": 3},
    })
    return Probe(gw, sim, asyncio.get_running_loop())


def served_500(gw: Gateway) -> float:
    return sum(sample.value for metric in gw.state.metrics.registry.collect()
               for sample in metric.samples
               if sample.name == "gateway_requests_total" and sample.labels["status"] == "500")


def unexpected_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("gateway")
            and r.levelno >= logging.ERROR and "unexpected" in r.getMessage()]


async def in_thread(test: Callable[[], None], probe: Probe,
                    caplog: pytest.LogCaptureFixture) -> None:
    """Run a Hypothesis test off the loop, then check the gateway lived through it."""
    caplog.set_level(logging.ERROR)
    await asyncio.to_thread(test)
    assert probe.answers > 0
    assert served_500(probe.gw) == 0 and unexpected_errors(caplog) == []
    image = make_png(424242)
    body, content_type = multipart(valid_fields("objects"), image)
    answer = await asyncio.to_thread(probe.send, "POST", "/api/v2/", body,
                                     {"Content-Type": content_type})
    assert answer.status == 200, answer


# -- building requests ---------------------------------------------------------------------
def valid_fields(type_: str, key: str = SEARCH) -> list[tuple[str, str]]:
    return [("apikey", key), ("type", type_),
            *((name, VALID_PARAMS[name]) for name, _, _ in PARAMS.get(type_, ()))]


def multipart(fields: list[tuple[str, str]], image: bytes | None, *, file_at: int = -1,
              boundary: str | None = None) -> tuple[bytes, str]:
    """The body as requests (urllib3) encodes it; the file part at index ``file_at``."""
    parts: list[tuple[str, Any]] = list(fields)
    if image is not None:
        parts.insert(file_at % (len(parts) + 1), ("file", ("image.png", image, "image/png")))
    body, content_type = encode_multipart_formdata(parts, boundary=boundary)
    return body, content_type


def image_of(seed: int) -> bytes:
    return make_jpeg(seed) if seed % 3 == 0 else make_png(seed)


images = st.integers(0, 10**6).map(image_of)
# A few images repeat across examples, so hits are fuzzed too.
some_images = st.one_of(st.integers(0, 5).map(image_of), images)
types = st.sampled_from(["objects", "objects", "nsfw", "celebrities", "detect_faces", "cache"])
keys = st.sampled_from([SEARCH, SEARCH, TEAM_KEYS["ads"], TEAM_KEYS["tiny"], "", "nope"])
boundaries = st.text(string.ascii_letters + string.digits + "'()+_,-./:=? ", min_size=1,
                     max_size=80)
whitespace = st.text(" \t\r\n\x0b\x0c\x1c\u00a0\u2003\u3000", max_size=3)
weird_numbers = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.integers(2**31 - 3, 2**70).map(str),
    st.integers(4290, 6000).map(lambda n: "9" * n),  # past int()'s 4300-digit limit
    st.integers(4290, 6000).map(lambda n: "0" * n + "7"),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", " ", "\t10\n", " 010 ", "+5", "-0", "1e3", "0x10", "1_0", "\u0661\u0660",
                     "\uff11\uff10", "\u00b2", "10\x00", "NaN", "None", "[]", "8 0", "0" * 40]),
    st.builds(lambda a, n, b: a + str(n) + b, whitespace, st.integers(0, 150), whitespace),
    st.text(max_size=30),
)
cache_controls = st.sampled_from([None, "no-cache", "no-store", "only-if-cached", "max-age=0",
                                  "no-cache, no-store", "NO-CACHE", "max-age=abc", ",,,",
                                  "private, only-if-cached", "x" * 3000, "\u00e9t\u00e9"])


def header_safe(value: str) -> str:
    """What http.client can put in a header line: Latin-1, no line breaks."""
    return value.encode("latin-1", "replace").decode("latin-1").replace("\r", "").replace(
        "\n", "")


# -- mutations of a valid multipart body -----------------------------------------------------
offsets = st.integers(0, 2**20)
mutations = st.one_of(
    st.tuples(st.just("flip"), offsets, st.integers(1, 255)),
    st.tuples(st.just("insert"), offsets, st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("insert-delimiter"), offsets, st.sampled_from(["", "--", "\r\n", "\n"])),
    st.tuples(st.just("delete"), offsets, st.integers(1, 200)),
    st.tuples(st.just("truncate"), offsets, st.just(0)),
    st.tuples(st.sampled_from(["duplicate", "drop", "swap"]), offsets, offsets),
    st.tuples(st.just("long-header"), offsets, st.integers(100, 6000)),
    st.tuples(st.just("bare-lf"), st.just(0), st.just(0)),
)
VALID_CONTENT_TYPES = ("keep", "quoted", "upper", "extra-params")
content_types = st.sampled_from([
    "keep", "keep", "other-boundary", "quoted", "upper", "extra-params", "no-boundary",
    "empty-boundary", "mixed", "text/plain", "none", "long-boundary", "json", "urlencoded",
    "unicode-boundary", "twice",
])


def mutate(body: bytes, delim: bytes, op: tuple[str, int, Any]) -> bytes:
    kind, at, arg = op
    n = len(body)
    if kind == "bare-lf":
        return body.replace(b"\r\n", b"\n")
    if n == 0:
        return body
    i = at % n
    if kind == "flip":
        return body[:i] + bytes([body[i] ^ arg]) + body[i + 1 :]
    if kind == "insert":
        return body[:i] + arg + body[i:]
    if kind == "insert-delimiter":
        return body[:i] + arg.encode() + delim + body[i:]
    if kind == "delete":
        return body[:i] + body[i + arg :]
    if kind == "truncate":
        return body[:i]
    pieces = body.split(delim)  # ['', part, ..., '--\r\n']
    if len(pieces) < 3:
        return body
    head, parts, tail = pieces[0], pieces[1:-1], pieces[-1]
    j = at % len(parts)
    if kind == "duplicate":
        parts.insert(j, parts[j])
    elif kind == "drop":
        del parts[j]
    elif kind == "swap":
        k = arg % len(parts)
        parts[j], parts[k] = parts[k], parts[j]
    else:  # long-header: one huge header line in a part's head
        parts[j] = parts[j][:2] + b"X-Padding: " + b"a" * arg + b"\r\n" + parts[j][2:]
    return delim.join([head, *parts, tail])


def content_type_for(variant: str, boundary: str, other: str) -> str | None:
    return {
        "keep": f"multipart/form-data; boundary={boundary}",
        "other-boundary": f"multipart/form-data; boundary={other}",
        "quoted": f'multipart/form-data; boundary="{boundary}"',
        "upper": f"MULTIPART/Form-Data;  BOUNDARY={boundary}",
        "extra-params": f"multipart/form-data; charset=utf-8; boundary={boundary}; x=\"y;z\"",
        "no-boundary": "multipart/form-data",
        "empty-boundary": "multipart/form-data; boundary=",
        "mixed": f"multipart/mixed; boundary={boundary}",
        "text/plain": "text/plain",
        "none": None,
        "long-boundary": "multipart/form-data; boundary=" + "b" * 300,
        "json": "application/json",
        "urlencoded": "application/x-www-form-urlencoded",
        "unicode-boundary": f"multipart/form-data; boundary={boundary}\u00e9",
        "twice": f"multipart/form-data; boundary={other}; boundary={boundary}",
    }[variant]


# -- the fuzz tests --------------------------------------------------------------------------
async def test_mutated_multipart_bodies(probe: Probe, caplog: pytest.LogCaptureFixture) -> None:
    @FUZZ
    @given(type_=types, key=keys, image=some_images, file_at=st.integers(0, 6),
           ops=st.lists(mutations, max_size=3), variant=content_types, other=boundaries,
           chunk=st.one_of(st.none(), st.integers(1, 3000)), cache_control=cache_controls)
    def run(type_: str, key: str, image: bytes, file_at: int, ops: list[tuple[str, int, Any]],
            variant: str, other: str, chunk: int | None, cache_control: str | None) -> None:
        body, content_type = multipart(valid_fields(type_, key), image, file_at=file_at)
        boundary = content_type.split("boundary=", 1)[1]
        for op in ops:
            body = mutate(body, b"--" + boundary.encode(), op)
        headers = {}
        if (ct := content_type_for(variant, boundary, other)) is not None:
            headers["Content-Type"] = header_safe(ct)
        if cache_control is not None:
            headers["Cache-Control"] = header_safe(cache_control)
        answer, _ = probe.exchange("POST", "/api/v2/", body, headers, chunk)
        if (not ops and variant in VALID_CONTENT_TYPES and key in (SEARCH, TEAM_KEYS["ads"])
                and type_ != "cache" and "only-if-cached" not in (cache_control or "")):
            assert answer.status == 200, (answer, headers)
            assert answer.headers["x-content-hash"] == xxhash.xxh3_128_hexdigest(image)

    await in_thread(run, probe, caplog)


async def test_random_urlencoded_bodies(probe: Probe, caplog: pytest.LogCaptureFixture) -> None:
    @FUZZ
    @given(type_=types, key=keys, image=st.one_of(st.none(), some_images),
           extra=st.lists(st.tuples(st.text(max_size=12), st.text(max_size=20)), max_size=5),
           junk=st.sampled_from(["", "&", "&&=&", "%", "%zz", "%%41", "=x", "file", "file=",
                                 "a=%C3%28", "%u00e9=1", "+%2B+", "&file=%89PN"]),
           quote_via=st.sampled_from([quote, quote_plus]),
           content_type=st.sampled_from([
               "application/x-www-form-urlencoded", "APPLICATION/X-WWW-FORM-URLENCODED",
               "application/x-www-form-urlencoded; charset=utf-8", None]),
           chunk=st.one_of(st.none(), st.integers(1, 2000)), data=st.data())
    def run(type_: str, key: str, image: bytes | None, extra: list[tuple[str, str]], junk: str,
            quote_via: Callable[..., str], content_type: str | None, chunk: int | None,
            data: st.DataObject) -> None:
        pairs: list[tuple[str, Any]] = [*valid_fields(type_, key), *extra]
        if image is not None:
            pairs.append(("file", image))
        order = data.draw(st.permutations(range(len(pairs))))
        body = urlencode([pairs[i] for i in order], quote_via=quote_via).encode()
        body += junk.encode()
        headers = {"Content-Type": content_type} if content_type else {}
        probe.exchange("POST", "/api/v2/", body, headers, chunk)

    await in_thread(run, probe, caplog)


query_text = st.text(string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/?%[]{}|^`\"<>\\",
                     max_size=60)
pct_bytes = st.binary(max_size=12).map(lambda b: "".join(f"%{c:02X}" for c in b))


async def test_random_query_strings_on_get(probe: Probe, caplog: pytest.LogCaptureFixture) -> None:
    stored = make_png(7)
    body, content_type = multipart(valid_fields("objects"), stored)
    assert (await asyncio.to_thread(probe.send, "POST", "/api/v2/", body,
                                    {"Content-Type": content_type})).status == 200
    known = xxhash.xxh3_128_hexdigest(stored)

    @FUZZ
    @given(method=st.sampled_from(["GET"] * 6 + ["PUT", "DELETE", "PATCH", "OPTIONS"]),
           key=keys, type_=st.sampled_from(["cache", "cache", "objects", "CACHE", "", "x"]),
           hash_=st.one_of(st.none(), st.just(known), st.just(known.upper()),
                           st.text("0123456789abcdefABCDEF", max_size=40), st.text(max_size=8)),
           extra=st.lists(st.one_of(query_text, pct_bytes), max_size=4),
           path=st.sampled_from(["/api/v2/", "/api/v2"]), data=st.data())
    def run(method: str, key: str, type_: str, hash_: str | None, extra: list[str], path: str,
            data: st.DataObject) -> None:
        pairs = [f"apikey={quote(key)}", f"type={quote(type_)}", *extra]
        if hash_ is not None:
            pairs.append(f"hash={quote(hash_)}")
        order = data.draw(st.permutations(range(len(pairs))))
        answer, envelope = probe.exchange(method, f"{path}?{'&'.join(pairs[i] for i in order)}")
        if answer.status == 200:
            assert envelope["data"]["type"] == "cache"
            assert isinstance(envelope["data"]["results"], list)

    await in_thread(run, probe, caplog)


def expected_param_error(type_: str, fields: dict[str, str]) -> str | None:
    """The parameter a 430 must name (DESIGN: ints parsed, " 010" is 10), or None."""
    for name, low, high in PARAMS[type_]:
        text = fields.get(name, "").strip()
        if not (text and text.isascii() and text.isdigit()):
            return name
        digits = text.lstrip("0") or "0"
        if len(digits) > 12 or not low <= int(digits) <= high:
            return name
    return None


async def test_random_parameter_values_and_field_names(
        probe: Probe, caplog: pytest.LogCaptureFixture) -> None:
    names = st.one_of(st.sampled_from(["max_labels", "min_confidence", "nsfw_min_confidence",
                                       "APIKEY", "apikey ", "Type", "hash", "file[]", ""]),
                      st.text(max_size=15)).filter(lambda n: n != "file")

    @FUZZ
    @given(type_=st.sampled_from(["objects", "objects", "nsfw", "detect_text"]),
           key=st.sampled_from([SEARCH, TEAM_KEYS["ads"]]), image=some_images,
           values=st.fixed_dictionaries({}, optional={
               "max_labels": weird_numbers, "min_confidence": weird_numbers,
               "nsfw_min_confidence": weird_numbers}),
           extra=st.lists(st.tuples(names, st.one_of(weird_numbers, st.text(max_size=20))),
                          max_size=4),
           urlencoded=st.booleans(),
           cache_control=st.sampled_from([None, "no-cache", "no-store", "max-age=0"]),
           data=st.data())
    def run(type_: str, key: str, image: bytes, values: dict[str, str],
            extra: list[tuple[str, str]], urlencoded: bool, cache_control: str | None,
            data: st.DataObject) -> None:
        pairs = [("apikey", key), ("type", type_), *values.items(), *extra]
        order = data.draw(st.permutations(range(len(pairs))))
        pairs = [pairs[i] for i in order]
        fields: dict[str, str] = {}
        for name, value in pairs:
            fields.setdefault(name, value)
        headers = {"Cache-Control": cache_control} if cache_control else {}
        if urlencoded:
            body = urlencode([*pairs, ("file", image)]).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        else:
            body, headers["Content-Type"] = multipart(pairs, image)
        answer, envelope = probe.exchange("POST", "/api/v2/", body, headers)
        if fields.get("apikey") != key or fields.get("type") != type_:
            return  # a random name shadowed the key or the type: the generic checks suffice
        bad = expected_param_error(type_, fields)
        if bad is None:
            assert answer.status == 200, (answer, fields)
        else:
            assert answer.status == 430 and bad in envelope["status_message"], (answer, bad)

    await in_thread(run, probe, caplog)


@pytest.mark.parametrize("value", [
    pytest.param("9" * 4301, id="4301-nines"),
    pytest.param("0" * 5000 + "7", id="leading-zeros"),
])
async def test_a_parameter_too_long_for_int_is_a_430_not_a_500(
        probe: Probe, value: str) -> None:
    for name in ("max_labels", "min_confidence"):
        fields = dict(valid_fields("objects"))
        fields[name] = value
        body, content_type = multipart(list(fields.items()), make_png(9))
        answer, envelope = await asyncio.to_thread(
            probe.exchange, "POST", "/api/v2/", body, {"Content-Type": content_type})
        expected = 200 if value.lstrip("0") == "7" else 430  # 7 is in both ranges
        assert answer.status == expected, answer
        if expected == 430:
            assert name in envelope["status_message"]


# -- raw sockets -------------------------------------------------------------------------------
async def talk(port: int, data: bytes, *, hang_up: str | None = None, pause: float = 0.0,
               wait_s: float = 2.0) -> bytes:
    """Send ``data`` and read one answer (to EOF, or as long as it says it is).

    ``hang_up="full"`` closes without reading; ``"half"`` shuts down the sending side first
    (aiohttp then drops the connection, so the answer may never come). A request the gateway
    is still waiting on after ``wait_s`` is half-closed, and whatever comes in a second more
    is the answer.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if pause:
            await asyncio.sleep(pause)
        if hang_up == "full":
            return b""
        if hang_up == "half":
            writer.write_eof()
        raw = await _read_answer(reader, wait_s)
        if not raw and hang_up is None:
            writer.write_eof()
            raw = await _read_answer(reader, 1.0)
        return raw
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


async def _read_answer(reader: asyncio.StreamReader, wait_s: float) -> bytes:
    raw = b""
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except (TimeoutError, ConnectionError):
            break
        if not chunk:
            break
        raw += chunk
        head, blank, rest = raw.partition(b"\r\n\r\n")
        if blank:
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if length is not None and len(rest) >= length:
                break
    return raw


def status_of(raw: bytes) -> int | None:
    if not raw.startswith(b"HTTP/"):
        return None
    return int(raw.split(b" ", 2)[1])


def envelope_of(raw: bytes) -> dict[str, Any]:
    envelope: dict[str, Any] = json.loads(raw.partition(b"\r\n\r\n")[2])
    return envelope


async def still_answers(gw: Gateway) -> None:
    port = int(gw.runner.addresses[0][1])
    request = (b"GET /api/v2/?apikey=" + SEARCH.encode() + b"&type=cache&hash=" + b"0" * 32
               + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = await talk(port, request)
    assert status_of(raw) == 200 and envelope_of(raw)["data"]["results"] == [], raw[:200]


def request_head(method: str, length: int | None = None, *, chunked: bool = False,
                 content_type: str = "application/x-www-form-urlencoded", extra: str = "") -> bytes:
    lines = [f"{method} /api/v2/ HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def chunked(body: bytes, size: int, *, extension: str = "", trailer: str = "") -> bytes:
    out = [b"%x%s\r\n%s\r\n" % (len(body[i : i + size]), extension.encode(), body[i : i + size])
           for i in range(0, len(body), size)]
    return b"".join(out) + b"0\r\n" + trailer.encode() + b"\r\n"


MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"\r\n\r\n\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /api/v2/\r\n\r\n",
    b"GET /api/v2/ HTTP/1.1 trailing\r\nHost: x\r\n\r\n",
    b"POST /api/v2/ HTTP/2.0\r\nHost: x\r\n\r\n",
    b"POST /api/v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /api/v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\nabc",
    b"POST /api/v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"POST /api/v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n"
    b"\r\n0\r\n\r\n",
    b"POST /api/v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"POST /api/v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nabc\r\n0\r\n\r\n",
    b"POST /api/v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"ffffffffffffffffff\r\nabc\r\n",
    b"GET /api/v2/ HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET /api/v2/ HTTP/1.1\r\nHost: x\r\n Folded: value\r\n\r\n",
    b"GET /api/v2/ HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    b"GET /api/v2/?apikey=\xff\xfe&type=cache HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://elsewhere.example/api/v2/?type=cache HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)),
    b"GET /api/v2/?" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /api/v2/ HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=\xff\xfe"
    b"\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST /api/v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
]


async def test_malformed_http_requests_never_get_a_500(
        probe: Probe, sim: Sim, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    for data in MALFORMED:
        raw = await talk(probe.port, data, wait_s=0.5)
        status = status_of(raw)
        assert status is None or status < 500, (data[:80], raw[:300])
        if raw.startswith(b"HTTP/") and b"nosniff" in raw.partition(b"\r\n\r\n")[0]:
            assert envelope_of(raw)["status"] == status
    await still_answers(probe.gw)
    assert sim.state.calls == 0 and served_500(probe.gw) == 0
    assert unexpected_errors(caplog) == []


async def test_random_request_heads_never_get_a_500(
        probe: Probe, sim: Sim, caplog: pytest.LogCaptureFixture) -> None:
    tokens = st.sampled_from(["GET", "POST", "PUT", "HEAD", "get", "", " ", "/api/v2/", "/",
                              "HTTP/1.1", "HTTP/1.0", "HTTP/9", "\r\n", "\n", ":", "?", "%",
                              "Content-Length: 3", "Transfer-Encoding: chunked", "Host: x",
                              "Content-Type: multipart/form-data; boundary=b", "\x00", "\xff"])

    loop = asyncio.get_running_loop()

    @FUZZ
    @given(head=st.one_of(st.binary(max_size=200),
                          st.lists(tokens, max_size=12).map(lambda t: " ".join(t).encode(
                              "latin-1"))),
           end=st.sampled_from([b"\r\n\r\n", b"\r\n\r\nabc"]))
    def run(head: bytes, end: bytes) -> None:
        raw = asyncio.run_coroutine_threadsafe(
            talk(probe.port, head + end, wait_s=0.5), loop).result(10)
        status = status_of(raw)
        probe.answers += 1
        assert status is None or status < 500, (head, raw[:300])

    await asyncio.to_thread(run)
    await still_answers(probe.gw)
    assert sim.state.calls == 0 and served_500(probe.gw) == 0
    assert unexpected_errors(caplog) == []


async def test_oversized_headers_are_refused_and_the_gateway_lives_on(probe: Probe) -> None:
    huge_value = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"
    huge_name = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X" * 40000 + b": 1\r\n\r\n"
    many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: %s\r\n" % (i, b"v" * 60) for i in range(3000)) + b"\r\n"
    for data in (huge_value, huge_name, many):
        raw = await talk(probe.port, data)
        assert status_of(raw) in (None, 400, 413, 431), raw[:200]
        await still_answers(probe.gw)
    # A big Cache-Control within aiohttp's limits reaches the handler and is harmless.
    body, content_type = multipart(valid_fields("objects"), make_png(11))
    answer, _ = await asyncio.to_thread(
        probe.exchange, "POST", "/api/v2/", body,
        {"Content-Type": content_type, "Cache-Control": "no-store, " + "x" * 15000})
    assert answer.status == 200


def incomplete(case: str, image: bytes) -> bytes:
    """A request whose body stops before its declared end, or breaks its chunked framing,
    after a whole multipart body (the client then hangs up)."""
    body, content_type = multipart(valid_fields("objects"), image)
    if case == "urlencoded":
        encoded = urlencode([*valid_fields("objects"), ("file", image)]).encode()
        return request_head("POST", len(encoded) + 500) + encoded
    if case.startswith("chunk"):
        framed = {
            "chunked-without-last-chunk": chunked(body, 50)[:-5],
            "chunk-shorter-than-declared": b"%x\r\n%s\r\n" % (len(body) + 10, body),
            "chunk-without-crlf": b"%x\r\n%s" % (len(body), body) + b"XX0\r\n\r\n",
        }[case]
        return request_head("POST", chunked=True, content_type=content_type) + framed
    declared, sent = {
        "multipart-1000-short": (len(body) + 1000, body),
        "multipart-1-short": (len(body) + 1, body),
        "multipart-half-sent": (len(body), body[: len(body) // 2]),
        # Over the in-memory limit: the streamed parser is done at the close delimiter.
        "multipart-streamed": (5 * 1024 * 1024, body),
    }[case]
    return request_head("POST", declared, content_type=content_type) + sent


@pytest.mark.parametrize("case", ["multipart-1000-short", "multipart-1-short",
                                  "multipart-half-sent", "urlencoded", "multipart-streamed",
                                  "chunked-without-last-chunk", "chunk-shorter-than-declared",
                                  "chunk-without-crlf"])
async def test_an_incomplete_body_then_a_hang_up_is_not_forwarded_nor_charged(
        probe: Probe, sim: Sim, caplog: pytest.LogCaptureFixture, case: str) -> None:
    """RFC 9112 6.3: a message cut short of its Content-Length (or of its last chunk) is
    incomplete, whatever the multipart inside it says: no upstream call, no charge."""
    caplog.set_level(logging.ERROR)
    for n, hang_up in enumerate(("half", "full")):
        raw = await talk(probe.port, incomplete(case, make_png(2100 + n)), hang_up=hang_up,
                         pause=0.05)
        assert status_of(raw) in (None, 300, 400), (hang_up, raw[:300])
    await asyncio.sleep(0.3)  # let the gateway see every hang-up
    assert sim.state.calls == 0
    assert await probe.gw.state.store.used("search", probe.gw.state.ledger.period()) == 0
    assert served_500(probe.gw) == 0 and unexpected_errors(caplog) == []
    assert not any(name.startswith("upload-") for name in
                   os.listdir(probe.gw.state.spool_dir or "."))
    body, content_type = multipart(valid_fields("objects"), make_png(2100))
    answer, _ = await asyncio.to_thread(
        probe.exchange, "POST", "/api/v2/", body, {"Content-Type": content_type})
    assert answer.status == 200 and "fwd=miss" in answer.headers["cache-status"]


async def test_declared_oversize_is_refused_before_the_body_arrives(
        probe: Probe, sim: Sim) -> None:
    head = request_head("POST", 60 * 1024 * 1024,
                        content_type="multipart/form-data; boundary=b")
    raw = await talk(probe.port, head + b"--b\r\n", wait_s=5)
    assert status_of(raw) == 413 and envelope_of(raw)["status"] == 413
    assert sim.state.calls == 0


async def test_compressed_bodies_and_a_decompression_bomb(
        probe: Probe, sim: Sim, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    body, content_type = multipart(valid_fields("objects"), make_png(41))
    for encoding in ("gzip", "deflate", "br", "zstd", "x-unknown", "gzip, gzip"):
        data = zlib.compress(body) if encoding == "deflate" else gzip.compress(body)
        extra = f"Content-Encoding: {encoding}\r\nConnection: close\r\n"
        for request in (request_head("POST", len(data), content_type=content_type, extra=extra)
                        + data,
                        request_head("POST", chunked=True, content_type=content_type, extra=extra)
                        + chunked(data, 1000)):
            raw = await talk(probe.port, request)
            assert status_of(raw) in (200, 300, 400), (encoding, raw[:300])
    calls = sim.state.calls
    # 60 MB of zeros in the file part, 60 kB on the wire: refused at 50 MB, spool removed.
    head = (b"--b\r\nContent-Disposition: form-data; name=\"apikey\"\r\n\r\n" + SEARCH.encode()
            + b"\r\n--b\r\nContent-Disposition: form-data; name=\"type\"\r\n\r\nobjects\r\n--b\r\n"
            b"Content-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n"
            + make_png(42))
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = packer.compress(head) + b"".join(packer.compress(bytes(1 << 20)) for _ in range(60))
    bomb += packer.flush()
    started = time.monotonic()
    raw = await talk(probe.port, request_head(
        "POST", chunked=True, content_type="multipart/form-data; boundary=b",
        extra="Content-Encoding: gzip\r\nConnection: close\r\n") + chunked(bomb, 65536),
        wait_s=20)
    assert status_of(raw) == 413 and envelope_of(raw)["status"] == 413, raw[:300]
    assert time.monotonic() - started < 10
    assert sim.state.calls == calls and served_500(probe.gw) == 0
    assert not any(name.startswith("upload-") for name in
                   os.listdir(probe.gw.state.spool_dir or "."))
    assert unexpected_errors(caplog) == []


def read_http_answer(raw: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


async def test_chunked_bodies(probe: Probe, sim: Sim, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    port = probe.port
    image = make_png(31)
    body, content_type = multipart(valid_fields("objects"), image)
    head = request_head("POST", chunked=True, content_type=content_type,
                        extra="Connection: close\r\n")
    expected_hash = xxhash.xxh3_128_hexdigest(image)
    seen = []
    for size, extension, trailer in ((1, "", ""), (7, ";name=value", ""),
                                     (64, "", "X-Trailer: 1\r\n"), (len(body), "", "")):
        raw = await talk(port, head + chunked(body, size, extension=extension, trailer=trailer))
        status, headers, envelope = read_http_answer(raw)
        assert status == 200 and headers["x-content-hash"] == expected_hash, raw[:300]
        seen.append(headers["cache-status"])
        assert envelope["data"]["type"] == "objects"
    assert "fwd=miss" in seen[0] and all("; hit" in s for s in seen[1:]), seen
    assert sim.state.calls == 1

    # Urlencoded, chunked.
    encoded = urlencode([*valid_fields("objects"), ("file", make_png(32))]).encode()
    raw = await talk(port, request_head("POST", chunked=True, extra="Connection: close\r\n")
                     + chunked(encoded, 100))
    assert read_http_answer(raw)[0] == 200

    # Over the in-memory limit: streamed and spooled to disk, the same hash as sent.
    big = make_png_of_size(3 * 1024 * 1024 // 2, 33)
    big_body, big_type = multipart(valid_fields("objects"), big)
    raw = await talk(port, request_head("POST", chunked=True, content_type=big_type,
                                        extra="Connection: close\r\n")
                     + chunked(big_body, 65536), wait_s=20)
    status, headers, _ = read_http_answer(raw)
    assert status == 200 and headers["x-content-hash"] == xxhash.xxh3_128_hexdigest(big)

    calls = sim.state.calls
    charged = await probe.gw.state.store.used("search", probe.gw.state.ledger.period())
    fresh, fresh_type = multipart(valid_fields("objects"), make_png(34))
    broken = [
        b"zz\r\n" + fresh,  # not a chunk size
        b"-5\r\n" + fresh,  # a negative one
        b"%x\r\n%s\r\n" % (len(fresh) // 2, fresh),  # a chunk longer than it says
    ]
    for data in broken:
        raw = await talk(port, request_head("POST", chunked=True, content_type=fresh_type) + data,
                         wait_s=0.5)
        assert status_of(raw) in (None, 300, 400), raw[:300]
    await asyncio.sleep(0.2)
    assert sim.state.calls == calls
    assert await probe.gw.state.store.used("search", probe.gw.state.ledger.period()) == charged
    assert served_500(probe.gw) == 0 and unexpected_errors(caplog) == []
    await still_answers(probe.gw)
