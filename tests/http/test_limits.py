"""Limits against slow or oversized clients: body deadline, header sizes, no charge, no 500."""

from __future__ import annotations

import asyncio

from gateway.devtools.sample_images import make_png
from tests.support import TEAM_KEYS, GatewayFactory, Sim, objects_form, post_requests


async def raw_exchange(port: int, data: bytes, *, then_wait: float) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), then_wait)
    finally:
        writer.close()


async def test_a_trickled_body_gets_408_and_frees_its_slot(gateway_factory: GatewayFactory,
                                                          sim: Sim) -> None:
    gw = await gateway_factory(server={"body_timeout_s": 0.5})
    port = gw.runner.addresses[0][1]
    head = (b"POST /api/v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")
    answer = await raw_exchange(port, head, then_wait=5)
    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"status":408' in answer
    assert sim.state.calls == 0 and gw.state.inflight == 0
    ok = await post_requests(gw.url, *objects_form(TEAM_KEYS["search"], make_png(1)))
    assert ok.status_code == 200


async def test_oversized_header_is_refused_without_a_500(gateway_factory: GatewayFactory,
                                                         sim: Sim) -> None:
    gw = await gateway_factory()
    port = gw.runner.addresses[0][1]
    head = b"POST /api/v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"
    answer = await raw_exchange(port, head, then_wait=5)
    assert answer.split(b"\r\n", 1)[0].split()[1] == b"400"
    assert sim.state.calls == 0


async def test_trickled_headers_are_cut_off_at_the_idle_limit(gateway_factory: GatewayFactory,
                                                              sim: Sim) -> None:
    """Slowloris: a client that never finishes its request head holds its connection no longer
    than server.keepalive_timeout_s, however it trickles."""
    gw = await gateway_factory(server={"keepalive_timeout_s": 1.0})
    port = gw.runner.addresses[0][1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = asyncio.get_running_loop().time()
    head = b"POST /api/v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    closed_after = None
    try:
        for i in range(len(head)):
            writer.write(head[i : i + 1])
            await writer.drain()
            try:
                if await asyncio.wait_for(reader.read(1024), 0.2) == b"":
                    closed_after = asyncio.get_running_loop().time() - started
                    break
            except TimeoutError:
                continue
    except ConnectionError:
        closed_after = asyncio.get_running_loop().time() - started
    finally:
        writer.close()
    assert closed_after is not None and closed_after < 3.0
    assert sim.state.calls == 0
