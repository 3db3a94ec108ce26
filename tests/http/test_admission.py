"""Admission: clients whose bodies never arrive cost sockets, never a team's service.

``server.max_inflight`` counts requests whose body is in; bodies still arriving are bounded
by ``max_receiving``, ``body_idle_timeout_s``, ``body_min_rate`` and ``body_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import requests

from gateway.devtools.sample_images import make_png
from tests.support import TEAM_KEYS, GatewayFactory, objects_form, post_requests

HEAD = (
    "POST /api/v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    "Content-Type: multipart/form-data; boundary=xyz\r\n"
    "Content-Length: 2000000\r\n\r\n"
)


async def trickler(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client with no key that declares a 2 MB body and sends 5 bytes of it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HEAD.encode() + b"--xyz")
    await writer.drain()
    return reader, writer


def port_of(url: str) -> int:
    return int(url.split(":")[2].split("/")[0])


async def test_trickling_clients_do_not_take_the_slots_a_team_needs(
        gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(server={"max_inflight": 4, "body_idle_timeout_s": 30})
    port = port_of(gw.url)
    clients = [await trickler(port) for _ in range(12)]  # three times max_inflight
    try:
        for _ in range(100):
            if gw.state.receiving == 12:
                break
            await asyncio.sleep(0.02)
        assert gw.state.receiving == 12 and gw.state.inflight == 0
        r = await post_requests(gw.url, *objects_form(TEAM_KEYS["search"], make_png(3)))
        assert r.status_code == 200, r.text
        ready = await asyncio.to_thread(requests.get, f"{gw.base}/readyz", timeout=5)
        assert ready.status_code == 200
    finally:
        for _, writer in clients:
            writer.close()


async def test_bodies_in_transfer_are_bounded_on_their_own(
        gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(server={"max_receiving": 3, "body_idle_timeout_s": 30})
    port = port_of(gw.url)
    clients = [await trickler(port) for _ in range(3)]
    try:
        for _ in range(100):
            if gw.state.receiving == 3:
                break
            await asyncio.sleep(0.02)
        r = await post_requests(gw.url, *objects_form(TEAM_KEYS["search"], make_png(4)))
        assert r.status_code == 503
        assert r.json() == {"status": 503, "status_message": "Gateway overloaded", "data": None}
    finally:
        for _, writer in clients:
            writer.close()


async def read_status(reader: asyncio.StreamReader) -> int:
    line = await asyncio.wait_for(reader.readline(), 15)
    return int(line.split()[1])


async def test_a_stalled_body_is_answered_408_after_the_idle_timeout(
        gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(server={"body_idle_timeout_s": 0.5, "body_timeout_s": 60})
    reader, writer = await trickler(port_of(gw.url))
    started = time.monotonic()
    try:
        assert await read_status(reader) == 408
    finally:
        writer.close()
    assert time.monotonic() - started < 5  # the idle bound, not body_timeout_s
    assert gw.state.receiving == 0


async def test_a_body_slower_than_the_minimum_rate_is_answered_408(
        gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(
        server={"body_idle_timeout_s": 2, "body_min_rate": 1024, "body_timeout_s": 60})
    reader, writer = await trickler(port_of(gw.url))
    started = time.monotonic()
    try:
        async def drip() -> None:  # ~200 bytes/s: never idle, always too slow
            with contextlib.suppress(ConnectionError):
                while True:
                    writer.write(b"x" * 20)
                    await writer.drain()
                    await asyncio.sleep(0.1)

        dripping = asyncio.create_task(drip())
        try:
            assert await read_status(reader) == 408
        finally:
            dripping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dripping
    finally:
        writer.close()
    assert 4.5 < time.monotonic() - started < 12
