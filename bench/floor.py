"""The floor: a bare aiohttp app whose handler only reads the body and answers a small JSON.

    python bench/floor.py --port 8099
    python bench/floor.py --port 8098 --proxy-to http://127.0.0.1:8090/api/v2/

With --proxy-to it is the floor of the miss path instead: a bare proxy that reads the body,
POSTs the same bytes (same Content-Type) to that URL over one keep-alive session and relays
the answer; no parsing, no key swap, no store.

It runs like ``gateway serve`` does (``web.run_app``, no access log) on the loop the gateway
picks (``gateway.event_loop``, ``--event-loop`` as ``server.event_loop``: uvloop when
installed), so the ratio gateway/floor measures what the gateway adds to reading an upload.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.event_loop import EVENT_LOOPS, use_event_loop

BODY = b'{"status":200,"message":"Success","data":{"error":0,"quota":0}}'


SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


async def proxy(request: web.Request) -> web.Response:
    if request.method != "POST":
        return await handle(request)  # the bench's readiness check
    body = await request.read()
    async with request.app[SESSION].post(
            request.app[UPSTREAM], data=body,
            headers={"Content-Type": request.headers.get("Content-Type", "")}) as answer:
        data = await answer.read()
        return web.Response(body=data, status=answer.status, content_type="application/json")


async def _session(app: web.Application):  # type: ignore[no-untyped-def]
    app[SESSION] = aiohttp.ClientSession()
    yield
    await app[SESSION].close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto",
                        help="as server.event_loop (default auto: uvloop when installed)")
    parser.add_argument("--proxy-to", metavar="URL",
                        help="be the miss path's floor: forward every body to URL")
    parser.add_argument("--reuse-port", action="store_true",
                        help="SO_REUSEPORT, to run several floor processes on one port")
    args = parser.parse_args()
    use_event_loop(args.event_loop)
    web.run_app(app(args.proxy_to), host=args.host, port=args.port, print=None, access_log=None,
                reuse_port=args.reuse_port or None)


def app(proxy_to: str | None = None) -> web.Application:
    """The floor's app (bench/inproc_bench.py drives it without a socket)."""
    # Large enough for the 5 MB (and 50 MB) bodies: request.read() refuses past it.
    floor = web.Application(client_max_size=64 * 1024 * 1024)
    if proxy_to:
        floor[UPSTREAM] = proxy_to
        floor.cleanup_ctx.append(_session)
    floor.router.add_route("*", "/{tail:.*}", proxy if proxy_to else handle)
    return floor


if __name__ == "__main__":
    main()
