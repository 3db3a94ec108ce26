"""A cache hit through the gateway's whole server stack, in one process and without sockets.

    python bench/inproc_bench.py              # 40,000 hits each, 100 KB upload
    python bench/inproc_bench.py --quick      # CI smoke: 200 hits, judges nothing
    python bench/inproc_bench.py --size 12400 --requests 50000
    python bench/inproc_bench.py --no-access-log   # server.access_log = false
    python bench/inproc_bench.py --stages   # also the gap after each of the handler's steps

The same raw HTTP request (bench/run.py's multipart body: the seed's fields, then a PNG) is
handed to a connection's ``data_received`` as uvloop would hand it over, and the answer's bytes
are taken from a transport that keeps them; the next request goes in when the answer is out.
Microseconds per request, the median of 40 rounds that alternate the two, side by side:

    floor      bench/floor.py's app (read the body, answer a small JSON), as bench/run.py's floor
    gateway    create_app() on the shipped [server] settings (access log on, its buffer
               dropped; the SQLite store in a temp dir); the simulator (loopback) answers the
               one miss that stores the result, then every request is a hit
    gap        gateway - floor, per round: its median and middle half (what the gateway adds
               to reading an upload)

What this leaves out, the socket reads and writes and the event loop's polling, costs both the
same; so gap / (floor + socket) is close to what bench/run.py's hit ratio measures, with the
noise of two processes, wrk and the kernel taken away: small changes show here first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import floor  # noqa: E402
import run  # noqa: E402  (bench/run.py: the body and the keys)

from gateway.config import parse_config  # noqa: E402
from gateway.core.cache_key import analysis_params  # noqa: E402
from gateway.core.service import Call  # noqa: E402
from gateway.devtools.sample_images import make_png_of_size  # noqa: E402
from gateway.devtools.sim import start_sim  # noqa: E402
from gateway.event_loop import use_event_loop  # noqa: E402
from gateway.http import api  # noqa: E402
from gateway.http.app import create_app  # noqa: E402
from gateway.http.form import Form  # noqa: E402
from gateway.http.http_errors import EnvelopeAppRunner  # noqa: E402
from gateway.http.state import STATE  # noqa: E402
from gateway.obs import logs  # noqa: E402

ROUNDS = 40


class Transport(asyncio.Transport):
    """Keeps what is written; ``answered`` is set once an answer's bytes are all out."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.answered: asyncio.Future[None] | None = None
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data
        head, sep, _ = bytes(self.out[:4096]).partition(b"\r\n\r\n")
        if sep:
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            if len(self.out) >= len(head) + 4 + length and self.answered is not None:
                self.answered.set_result(None)

    def writelines(self, lines: Any) -> None:
        self.write(b"".join(lines))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def raw_request(body: bytes, path: str = "/api/v2/") -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
            f"Content-Type: multipart/form-data; boundary={run.BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class Connection:
    """One keep-alive connection to a runner's server, fed whole requests."""

    def __init__(self, runner: web.AppRunner) -> None:
        server = runner.server
        assert server is not None
        self.transport = Transport()
        self.protocol = server()
        self.protocol.connection_made(self.transport)

    async def per_request(self, request: bytes, n: int) -> float:
        """Microseconds per request over n requests in a row."""
        transport, protocol = self.transport, self.protocol
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        for _ in range(n):
            transport.out.clear()
            transport.answered = loop.create_future()
            protocol.data_received(request)
            await transport.answered
        return (time.perf_counter() - start) / n * 1e6

    @property
    def answer(self) -> bytes:
        return bytes(self.transport.out)

    def close(self) -> None:
        self.protocol.connection_lost(None)


def gateway_app(tmp: str, upstream: str, *, access_log: bool = True) -> web.Application:
    raw = {
        "server": {"host": "127.0.0.1", "port": 8080, "drain_timeout_s": 5,
                   "access_log": access_log},
        "upstream": {"url": upstream, "api_key_env": "INPROC_KEY"},
        "storage": {"backend": "sqlite", "path": os.path.join(tmp, "gateway.db")},
        "cache": {"max_mb": 1000},
        "quota": {"period": "total"},
        "teams": {"bench": {"keys": [run.TEAM_KEY], "quota": run.HUGE_QUOTA}},
    }
    return create_app(parse_config(raw, env={"INPROC_KEY": run.UPSTREAM_KEY}))


# --stages: the API handler's steps, in its order, each route stopping after one more of them
# and answering the hit's own body (so every route writes the same answer). Built here from
# gateway.http.api's functions; keep them in handle_api's order.
STAGES = ("read", "parse", "checks", "hit")


def add_stages(app: web.Application, answer: dict[str, bytes]) -> None:
    state = app[STATE]

    def fixed(request: web.Request) -> web.StreamResponse:
        return api.respond(request, answer["body"], 200, {"X-Request-Id": request[api.REQUEST_ID]})

    async def checked(request: web.Request, form: Form) -> Call:
        team = api._authorize(form, state)
        type_ = api._type(form, team)
        await state.limiter.check(team)
        file = api._image(form)
        params = analysis_params(type_, form.fields)
        directives = api.parse_cache_control(request.headers.get("Cache-Control"))
        return Call(team, type_, params, file, directives)

    async def read(request: web.Request) -> web.StreamResponse:
        await request.read()
        return fixed(request)

    async def parse(request: web.Request) -> web.StreamResponse:
        (await api._read(request, state)).close()
        return fixed(request)

    async def checks(request: web.Request) -> web.StreamResponse:
        form = await api._read(request, state)
        try:
            await checked(request, form)
        finally:
            form.close()
        return fixed(request)

    async def hit(request: web.Request) -> web.StreamResponse:
        form = await api._read(request, state)
        try:
            found = await state.service.recognize(await checked(request, form))
        finally:
            form.close()
        return api.respond(request, found.body, 200, {
            "Cache-Status": api.cache_status(found), "X-Content-Hash": found.content_hash,
            "X-Request-Id": request[api.REQUEST_ID]})

    for name, handler in zip(STAGES, (read, parse, checks, hit), strict=True):
        app.router.add_post(f"/stage/{name}", handler)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200 hits")
    parser.add_argument("--size", type=int, default=100 * 1024, help="upload bytes (100 KB)")
    parser.add_argument("--requests", type=int, default=40_000, help="hits in all, each")
    parser.add_argument("--no-access-log", action="store_true",
                        help="the gateway with server.access_log = false (bench/run.py's tuned)")
    parser.add_argument("--stages", action="store_true",
                        help="also the gap after each of the handler's steps (read, parse, "
                             "checks, hit; the full handler is the gateway row)")
    args = parser.parse_args()
    n = 200 if args.quick else args.requests
    request = raw_request(run.multipart(make_png_of_size(args.size, 1000 + args.size)))
    logs.start_access_log(32, 1000)  # the shipped access log, its buffer dropped (below)
    assert logs._access is not None
    logs._access._sink = lambda data: None
    with tempfile.TemporaryDirectory(prefix="inproc-bench-") as tmp:
        # The simulator on loopback answers the one miss that stores the result.
        sim, port, sim_state = await start_sim(api_key=run.UPSTREAM_KEY, quota=run.HUGE_QUOTA)
        apps = {"floor": floor.app(),
                "gateway": gateway_app(tmp, f"http://127.0.0.1:{port}/api/v2/",
                                       access_log=not args.no_access_log)}
        hit_answer: dict[str, bytes] = {}
        if args.stages:
            add_stages(apps["gateway"], hit_answer)
        runners = {name: EnvelopeAppRunner(a, access_log=None) if name == "gateway"
                   else web.AppRunner(a, access_log=None) for name, a in apps.items()}
        for r in runners.values():
            await r.setup()
        conns = {name: Connection(r) for name, r in runners.items()}
        requests = dict.fromkeys(conns, request)
        await conns["gateway"].per_request(request, 1)  # the miss
        if b"; fwd=miss; stored" not in conns["gateway"].answer:
            raise SystemExit(f"inproc_bench: the first request did not miss and store: "
                             f"{conns['gateway'].answer[:300]!r}")
        await conns["gateway"].per_request(request, 1)
        hit_answer["body"] = conns["gateway"].answer.partition(b"\r\n\r\n")[2]
        if args.stages:
            body = request.partition(b"\r\n\r\n")[2]
            for stage in STAGES:
                conns[stage] = Connection(runners["gateway"])
                requests[stage] = raw_request(body, f"/stage/{stage}")
        for name, conn in conns.items():
            await conn.per_request(requests[name], max(1, n // 10))  # warm-up
        # Rounds alternate them all, so the machine's drift reaches each alike.
        costs: dict[str, list[float]] = {name: [] for name in conns}
        for _ in range(ROUNDS):
            for name, conn in conns.items():
                costs[name].append(await conn.per_request(requests[name], max(1, n // ROUNDS)))
        for name, conn in conns.items():
            if name in ("gateway", "hit") and b"; hit;" not in conn.answer:
                raise SystemExit(f"inproc_bench: not a hit: {conn.answer[:300]!r}")
            status = conn.answer.split(b"\r\n", 1)[0].decode()
            print(f"{name:>8}: {statistics.median(costs[name]):7.1f} us  ({status})", flush=True)
            conn.close()
        for r in (*runners.values(), sim):
            await r.cleanup()
        assert sim_state.calls == 1, sim_state.calls

    def gap(name: str) -> tuple[float, list[float]]:
        gaps = sorted(g - f for g, f in zip(costs[name], costs["floor"], strict=True))
        return statistics.median(gaps), gaps

    for stage in STAGES if args.stages else ():
        print(f"{'gap':>8}: {gap(stage)[0]:7.1f} us  after {stage}")
    median, gaps = gap("gateway")
    print(f"{'gap':>8}: {median:7.1f} us  (middle half {gaps[len(gaps) // 4]:.1f}"
          f"-{gaps[3 * len(gaps) // 4]:.1f}; {len(request):,}-byte request, {n:,} hits, "
          f"{ROUNDS} alternating rounds)")


if __name__ == "__main__":
    use_event_loop("auto")
    asyncio.run(main())
