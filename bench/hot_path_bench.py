"""Per-request steps of a cache hit: what the gateway does now against what it did before.

    python bench/hot_path_bench.py           # 100,000 calls each
    python bench/hot_path_bench.py --quick   # CI smoke: 500 calls, judges nothing

Microseconds per call, one process, uvloop when installed, side by side in one run:

    body deadline   asyncio.timeout() around an await, against gateway.http.deadlines.Deadlines
    team key        sha256 of the key and a dict lookup, against the remembered accepted key
    parameters      parsing and validating max_labels/min_confidence and their key text,
                    against the memoised parse (gateway.core.cache_key.analysis_params)
    answer          web.Response prepared and written, against
                    gateway.http.response.EnvelopeResponse
                    (both to a transport that drops the bytes: the socket write is not counted)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_writer import StreamWriter
from aiohttp.test_utils import make_mocked_request

from gateway.core.cache_key import _parse, analysis_params
from gateway.core.envelope import CONTENT_TYPE, HEADERS
from gateway.http.deadlines import Deadlines
from gateway.http.response import EnvelopeResponse

FIELDS = {"apikey": "team-key-0123456789", "type": "objects", "max_labels": "10",
          "min_confidence": "80"}
BODY = b'{"status":200,"message":"Success","data":{"labels":[],"quota":41}}'
ANSWER_HEADERS = {"Cache-Status": "imagerecognize-gateway; hit; ttl=86000",
                  "X-Content-Hash": "0123456789abcdef0123456789abcdef"}


class _Transport:
    """Takes the bytes and drops them: the socket write is not what is compared."""

    def write(self, data: bytes) -> None:
        pass

    def writelines(self, data: list[bytes]) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class _Protocol:
    _paused = False
    ssl_context = None
    peername = None
    sockname = None

    def __init__(self, transport: _Transport) -> None:
        self.transport = transport


async def per_call(step: Callable[[], Awaitable[Any]], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        await step()
    return 1e6 * (time.perf_counter() - t0) / n


async def measure(n: int) -> list[tuple[str, float, float]]:
    async def nothing() -> None:
        pass

    async def empty() -> None:
        await nothing()

    base = await per_call(empty, n)

    async def with_timeout() -> None:
        async with asyncio.timeout(30):
            await nothing()

    deadlines = Deadlines()

    async def with_deadline() -> None:
        await deadlines.within(nothing(), 30)

    rows = [("body deadline", await per_call(with_timeout, n) - base,
             await per_call(with_deadline, n) - base)]

    teams = {"sha256:" + hashlib.sha256(FIELDS["apikey"].encode()).hexdigest(): "search"}
    remembered = {FIELDS["apikey"]: "search"}

    async def key_by_hash() -> None:
        key = FIELDS["apikey"]
        assert teams.get("sha256:" + hashlib.sha256(key.encode()).hexdigest())

    async def key_remembered() -> None:
        assert remembered.get(FIELDS["apikey"])

    rows.append(("team key", await per_call(key_by_hash, n) - base,
                 await per_call(key_remembered, n) - base))

    raw = (FIELDS["max_labels"], FIELDS["min_confidence"])

    async def params_uncached() -> None:
        _parse.__wrapped__("objects", raw).text  # noqa: B018  (what every request did before)

    async def params_memo() -> None:
        analysis_params("objects", FIELDS).text  # noqa: B018

    _parse.cache_clear()
    rows.append(("parameters", await per_call(params_uncached, n) - base,
                 await per_call(params_memo, n) - base))

    transport = _Transport()
    protocol = _Protocol(transport)
    writer = StreamWriter(protocol, asyncio.get_running_loop())  # type: ignore[arg-type]
    request = make_mocked_request("POST", "/api/v2/", app=web.Application(), writer=writer,
                                  transport=transport, protocol=protocol)

    async def aiohttp_answer() -> None:
        answer = web.Response(body=BODY, status=200, content_type="application/json",
                              charset="utf-8", headers={**HEADERS, **ANSWER_HEADERS})
        await answer.prepare(request)
        await answer.write_eof()

    async def envelope_answer() -> None:
        answer = EnvelopeResponse(BODY, 200, dict(ANSWER_HEADERS), content_type=CONTENT_TYPE)
        await answer.prepare(request)
        await answer.write_eof()

    rows.append(("answer", await per_call(aiohttp_answer, max(1, n // 4)) - base,
                 await per_call(envelope_answer, max(1, n // 4)) - base))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="500 calls, for CI")
    args = parser.parse_args()
    n = 500 if args.quick else args.calls
    try:
        import uvloop
    except ImportError:
        loop_name, rows = "asyncio", asyncio.run(measure(n))
    else:
        loop_name, rows = "uvloop", uvloop.run(measure(n))
    print(f"{n} calls each ({loop_name}), us per call")
    print(f"{'step':<14} {'before':>8} {'now':>8}")
    for name, before, now in rows:
        print(f"{name:<14} {before:>8.2f} {now:>8.2f}")


if __name__ == "__main__":
    main()
