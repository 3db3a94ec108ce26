"""Requests aiohttp's parser refuses, sent to the installed command: the upstream's envelope,
nothing of the request echoed or logged, no upstream call, no charge."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gateway.devtools.sample_images import make_png
from tests.support import (
    UPSTREAM_KEY,
    GatewayProcess,
    Sim,
    free_port,
    objects_form,
    post_requests,
    write_config,
)

KEY = "team-key-that-must-not-leak"
LF_BODY = (b'--b\nContent-Disposition: form-data; name="apikey"\n\n' + KEY.encode()
           + b"\n--b\nContent-Disposition: form-data; name=\"type\"\n\nobjects\n--b--\n")
CHUNKED_HEAD = (b"POST /api/v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
BARE_LF_CHUNK = f"{len(LF_BODY):x}".encode() + b"\n" + LF_BODY + b"\n0\n\n"


async def exchange(port: int, *parts: bytes) -> bytes:
    """Send the parts one by one (each its own packet), read the answer until the gateway
    closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(0.2)  # the head is parsed and handed on before the body
            writer.write(part)
            await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)  # not body_timeout_s (60 s)
    finally:
        writer.close()


CASES = [
    pytest.param(
        [b"GET /api/v2/?type=cache&hash=" + b"a" * 8200 + b"&apikey=" + KEY.encode()
         + b" HTTP/1.1\r\nHost: x\r\n\r\n"],
        414, "Request-URI too long", id="request-line-too-long"),
    pytest.param(
        [b"GET /api/v2/?apikey=" + KEY.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Big: "
         + b"a" * 20000 + KEY.encode() + b"\r\n\r\n"],
        431, "Request header fields too large", id="header-too-long"),
    pytest.param([CHUNKED_HEAD + BARE_LF_CHUNK], 300, None, id="bare-lf-chunks-one-packet"),
    pytest.param([CHUNKED_HEAD, BARE_LF_CHUNK], 300, None, id="bare-lf-chunks-after-the-head"),
    pytest.param([CHUNKED_HEAD + b"zz\r\n" + LF_BODY + b"\r\n0\r\n\r\n"], 300, None,
                 id="bad-chunk-size"),
]


@pytest.fixture
async def gateway(tmp_path: Path, sim: Sim, processes: list[GatewayProcess]) -> GatewayProcess:
    port = free_port()
    config = write_config(tmp_path / "g.toml", sim_url=sim.url, db=tmp_path / "g.db", port=port,
                          teams={"t": (KEY, 10)})
    gw = GatewayProcess(config, port, tmp_path / "g.log")
    processes.append(gw)
    await asyncio.to_thread(gw.wait_ready)
    return gw


@pytest.mark.parametrize(("parts", "status", "message"), CASES)
async def test_an_unparseable_request_gets_the_envelope_and_leaks_nothing(
        gateway: GatewayProcess, sim: Sim, parts: list[bytes], status: int,
        message: str | None) -> None:
    answer = await exchange(gateway.port, *parts)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == str(status).encode(), answer[:300]
    assert b"\r\ncontent-type: application/json" in head.lower()
    envelope = json.loads(body)
    assert envelope["status"] == status and envelope["data"] is None
    if message is not None:
        assert envelope["status_message"] == message
    assert KEY.encode() not in answer and b"aaaa" not in answer
    assert sim.state.calls == 0

    # The gateway still serves, and nothing of the request reached the log.
    ok = await post_requests(gateway.url, *objects_form(KEY, make_png(1)))
    assert ok.status_code == 200 and ok.json()["data"]["quota"] == 9  # one charge: this one
    assert gateway.stop() == 0
    log = await asyncio.to_thread(gateway.log_path.read_text)
    for secret in (KEY, UPSTREAM_KEY, "aaaa"):
        assert secret not in log
    assert "Traceback" not in log and " ERROR " not in log, log
    assert "malformed request" in log
