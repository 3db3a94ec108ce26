"""The installed command as an operator runs it: JSON access log, SIGHUP reload, SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import requests

from gateway.devtools.sample_images import make_png
from tests.support import (
    UPSTREAM_KEY,
    GatewayProcess,
    Sim,
    eventually,
    free_port,
    objects_form,
    post_requests,
    write_config,
)


def start(tmp_path: Path, sim: Sim, *args: str, quota: int = 5,
          server: str = "") -> tuple[GatewayProcess, Path]:
    port = free_port()
    config = write_config(tmp_path / "g.toml", sim_url=sim.url, db=tmp_path / "g.db", port=port,
                          teams={"t": ("team-key", quota)}, server=server)
    return GatewayProcess(config, port, tmp_path / "g.log", *args), config


async def test_json_access_log_has_one_line_per_request_and_no_secret(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess]) -> None:
    gw, _ = start(tmp_path, sim, "--log-format", "json")
    processes.append(gw)
    await asyncio.to_thread(gw.wait_ready)
    image = make_png(1)
    await post_requests(gw.url, *objects_form("team-key", image))
    await post_requests(gw.url, *objects_form("team-key", image))
    await post_requests(gw.url, *objects_form("wrong-key", image))
    gw.stop()
    text = gw.log_path.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    access = [r for r in records if r["logger"] == "gateway.access"]
    assert [(r["team"], r["status"], r["cache"]) for r in access] == [
        ("t", 200, "miss"), ("t", 200, "hit"), ("unknown", 401, "none")]
    first = access[0]
    assert first["type"] == "objects" and first["bytes"] == len(image)
    assert len(first["hash"]) == 12 and first["gateway_ms"] > 0 and first["upstream_ms"] > 0
    assert access[1]["upstream_ms"] is None
    for secret in (UPSTREAM_KEY, "team-key", "wrong-key"):
        assert secret not in text


async def test_sighup_reload_raises_a_quota_and_refuses_a_broken_config(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess]) -> None:
    gw, config = start(tmp_path, sim, quota=1)
    processes.append(gw)
    await asyncio.to_thread(gw.wait_ready)
    assert (await post_requests(gw.url, *objects_form("team-key", make_png(1)))).status_code == 200
    assert (await post_requests(gw.url, *objects_form("team-key", make_png(2)))).status_code == 402

    good = config.read_text().replace("quota = 1", "quota = 3")
    config.write_text(good)
    gw.proc.send_signal(signal.SIGHUP)
    await eventually(lambda: "reloaded " in gw.log_path.read_text(), what="the reload's log line")
    r = await post_requests(gw.url, *objects_form("team-key", make_png(2)))
    assert r.status_code == 200 and r.json()["data"]["quota"] == 1

    config.write_text(good.replace("quota = 3", "quota = 'lots'"))
    gw.proc.send_signal(signal.SIGHUP)
    await eventually(lambda: "reload refused" in gw.log_path.read_text(), what="the refusal")
    assert gw.proc.poll() is None
    r = await post_requests(gw.url, *objects_form("team-key", make_png(3)))
    assert r.status_code == 200 and r.json()["data"]["quota"] == 0  # old config kept
    assert "reload refused" in gw.log_path.read_text()


async def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess]) -> None:
    sim.state.latency_ms = 1500
    gw, _ = start(tmp_path, sim, quota=100)
    processes.append(gw)
    await asyncio.to_thread(gw.wait_ready)
    in_flight = [asyncio.create_task(post_requests(gw.url, *objects_form("team-key", make_png(i))))
                 for i in range(5)]
    await eventually(lambda: sim.state.calls == 5, what="all five at the upstream")
    gw.proc.send_signal(signal.SIGTERM)
    await eventually(lambda: "draining: finishing" in gw.log_path.read_text(),
                     what="the listener to close")
    started = time.monotonic()
    try:
        late = await asyncio.to_thread(requests.post, gw.url, timeout=5,
                                       data=objects_form("team-key", make_png(99))[0],
                                       files={"file": make_png(99)})
        refused = late.status_code == 503
    except requests.ConnectionError:
        refused = True  # the listener is closed: new connections are refused
    assert refused
    results = await asyncio.gather(*in_flight)
    assert [r.status_code for r in results] == [200] * 5
    assert time.monotonic() - started < 10
    assert await asyncio.to_thread(gw.proc.wait, 15) == 0


async def test_sigterm_grace_turns_readyz_503_before_the_listener_closes(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess]) -> None:
    """With server.drain_grace_s, a load balancer polling /readyz sees 503 while the gateway
    still listens; new API requests get a 503 envelope with Retry-After; in-flight ones end
    with 200; a SIGHUP in the middle of it all changes nothing."""
    sim.state.latency_ms = 2000
    gw, _ = start(tmp_path, sim, quota=100, server="drain_grace_s = 1.5")
    processes.append(gw)
    await asyncio.to_thread(gw.wait_ready)
    ready = await asyncio.to_thread(requests.get, f"http://127.0.0.1:{gw.port}/readyz", timeout=5)
    assert ready.status_code == 200
    in_flight = [asyncio.create_task(post_requests(gw.url, *objects_form("team-key", make_png(i))))
                 for i in range(3)]
    await eventually(lambda: sim.state.calls == 3, what="all three at the upstream")
    gw.proc.send_signal(signal.SIGTERM)
    await eventually(lambda: "SIGTERM: draining" in gw.log_path.read_text(), what="the drain")
    ready = await asyncio.to_thread(requests.get, f"http://127.0.0.1:{gw.port}/readyz", timeout=5)
    assert ready.status_code == 503 and "draining" in ready.json()["problems"]
    assert ready.headers["Retry-After"] == "1"
    late = await post_requests(gw.url, *objects_form("team-key", make_png(50)))
    assert late.status_code == 503 and late.json() == {
        "status": 503, "status_message": "Gateway draining", "data": None}
    assert late.headers["Retry-After"] == "1"
    results = await asyncio.gather(*in_flight)
    assert [r.status_code for r in results] == [200] * 3
    assert await asyncio.to_thread(gw.proc.wait, 15) == 0
    assert sim.state.calls == 3


async def test_a_sighup_while_starting_does_not_kill_the_gateway(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess]) -> None:
    gw, _ = start(tmp_path, sim)
    processes.append(gw)
    # Once the command has started (its SIGHUP disposition is "ignore": bit 0 of SigIgn; or
    # already "caught" by the reload handler, SigCgt), and while it opens the store and
    # binds: SIGHUPs must not end it.
    status = Path(f"/proc/{gw.proc.pid}/status")

    def hup_handled() -> bool:
        masks = {k: int(v, 16) for k, _, v in (line.partition(":\t") for line in
                                                status.read_text().splitlines())
                 if k in ("SigIgn", "SigCgt")}
        return bool((masks["SigIgn"] | masks["SigCgt"]) & 1)

    deadline = time.monotonic() + 20
    while not hup_handled():
        assert gw.proc.poll() is None and time.monotonic() < deadline
        await asyncio.sleep(0.005)
    for _ in range(5):
        if gw.proc.poll() is None:
            gw.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.02)
    await asyncio.to_thread(gw.wait_ready)
    r = await post_requests(gw.url, *objects_form("team-key", make_png(60)))
    assert r.status_code == 200
