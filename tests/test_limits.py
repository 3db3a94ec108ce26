"""Limits against slow or oversized clients: body deadline, header sizes, no charge, no 500."""

from __future__ import annotations

import asyncio

from gateway.sample_images import make_png
from tests.conftest import TEAM_KEYS, GatewayFactory, Sim, objects_form, post_requests


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
