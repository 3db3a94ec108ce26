"""`server.workers = 2` through the installed command: supervisor death, crash loops, SIGHUP,
and a second gateway on the same port or on a store orphaned workers still hold."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gateway.devtools.sample_images import make_png
from tests.support import (
    UPSTREAM_KEY,
    GatewayProcess,
    Sim,
    free_port,
    gateway_command,
    objects_form,
    post_requests,
    write_config,
)

ENV = {**os.environ, "TEST_UPSTREAM_KEY": UPSTREAM_KEY}


def workers_config(tmp_path: Path, sim: Sim, name: str, *, port: int, db: Path,
                   teams: dict[str, tuple[str, int]] | None = None) -> Path:
    return write_config(tmp_path / f"{name}.toml", sim_url=sim.url, db=db, port=port,
                        teams=teams or {"t": ("team-key", 100)}, server="workers = 2")


def worker_pids(gw: GatewayProcess) -> set[int]:
    return {int(line.split("pid ")[1].rstrip(")")) for line in gw.log_path.read_text().splitlines()
            if "listening" in line and "pid " in line}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited, whoever reaps it


def wait_gone(pids: set[int], timeout: float = 30) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return {p for p in pids if alive(p)}


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if b"=" in item)


@pytest.fixture
def leftovers() -> Iterator[set[int]]:
    """Pids a test may leave behind on the old code (orphans): killed at the end."""
    pids: set[int] = set()
    yield pids
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)


def wait_for_workers(gw: GatewayProcess, count: int = 2, timeout: float = 30) -> set[int]:
    gw.wait_ready()
    deadline = time.monotonic() + timeout
    while len(pids := worker_pids(gw)) < count:
        assert time.monotonic() < deadline, gw.log_path.read_text()
        time.sleep(0.05)
    return pids


async def test_workers_die_with_a_killed_supervisor_and_remove_their_metrics_folder(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess], leftovers: set[int]) -> None:
    """kill -9 of the supervisor: its workers stop (no stale config keeps answering on the
    port), remove the metrics folder, and a restart without a team refuses its key every time."""
    port = free_port()
    db = tmp_path / "g.db"
    teams = {"t": ("team-key", 100), "gone": ("revoked-key", 100)}
    old = GatewayProcess(workers_config(tmp_path, sim, "old", port=port, db=db, teams=teams),
                         port, tmp_path / "old.log")
    processes.append(old)
    pids = await asyncio.to_thread(wait_for_workers, old)
    leftovers.update(pids)
    metrics_dir = Path(environ_of(next(iter(pids)))["PROMETHEUS_MULTIPROC_DIR"])
    assert await asyncio.to_thread(metrics_dir.is_dir)
    r = await post_requests(old.url, *objects_form("revoked-key", make_png(1)))
    assert r.status_code == 200

    old.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(old.proc.wait)
    assert await asyncio.to_thread(wait_gone, pids) == set()
    assert not await asyncio.to_thread(metrics_dir.exists)

    new = GatewayProcess(workers_config(tmp_path, sim, "new", port=port, db=db),
                         port, tmp_path / "new.log")
    processes.append(new)
    await asyncio.to_thread(wait_for_workers, new)
    codes = [r.status_code for r in await asyncio.gather(*(
        post_requests(new.url, *objects_form("revoked-key", make_png(100 + i)))
        for i in range(40)))]
    assert codes == [401] * 40


def test_a_second_gateway_refuses_a_port_another_gateways_workers_hold(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess]) -> None:
    port = free_port()
    first = GatewayProcess(workers_config(tmp_path, sim, "a", port=port, db=tmp_path / "a.db"),
                           port, tmp_path / "a.log")
    processes.append(first)
    pids = wait_for_workers(first)
    second = subprocess.Popen(
        [*gateway_command(), "serve", "--config",
         str(workers_config(tmp_path, sim, "b", port=port, db=tmp_path / "b.db"))],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = second.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        second.terminate()
        out, _ = second.communicate()
        pytest.fail(f"the second gateway started on a port in use:\n{out}")
    assert second.returncode == 1
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out, out
    assert lines[0].startswith(f"gateway: 127.0.0.1:{port} is already in use by pid ")
    assert {int(p) for p in lines[0].split("pid ")[1].split(";")[0].split(", ")} == pids


def test_serve_refuses_a_store_that_orphaned_workers_still_hold(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess], leftovers: set[int]) -> None:
    """Workers stopped (SIGSTOP) when their supervisor is killed stay alive until continued:
    meanwhile a gateway on their store refuses to start, naming them; once they are gone it
    starts."""
    db = tmp_path / "shared.db"
    old_port = free_port()
    old = GatewayProcess(workers_config(tmp_path, sim, "old", port=old_port, db=db),
                         old_port, tmp_path / "old.log")
    processes.append(old)
    pids = wait_for_workers(old)
    leftovers.update(pids)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    old.proc.send_signal(signal.SIGKILL)
    old.proc.wait()

    port = free_port()
    config = write_config(tmp_path / "new.toml", sim_url=sim.url, db=db, port=port,
                          teams={"t": ("team-key", 100)})
    refused = subprocess.run([*gateway_command(), "serve", "--config", str(config)], env=ENV,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1, refused.stderr
    line = refused.stderr.strip()
    assert "\n" not in line and line.startswith("gateway: the store is still held by pid ")
    assert {int(p) for p in line.split("pid ")[1].split(":")[0].split(", ")} == pids

    for pid in pids:
        os.kill(pid, signal.SIGCONT)
    assert wait_gone(pids) == set()
    new = GatewayProcess(config, port, tmp_path / "new.log")
    processes.append(new)
    new.wait_ready()
    assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).ok


def test_workers_that_cannot_reach_redis_back_off_and_give_up_in_one_line(
        tmp_path: Path) -> None:
    closed = free_port()  # nothing listens here
    config = write_config(tmp_path / "r.toml", sim_url="http://127.0.0.1:9/api/v2/",
                          db=tmp_path / "r.db", port=free_port(), teams={"t": ("team-key", 5)},
                          server="workers = 2")
    config.write_text(config.read_text().replace(
        'backend = "sqlite"', f'backend = "redis"\nredis_url = "redis://127.0.0.1:{closed}/0"'))
    run = subprocess.run([*gateway_command(), "serve", "--config", str(config)], env=ENV,
                         capture_output=True, text=True, timeout=90)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("gateway: store error: Redis unavailable")
    assert lines[-1].endswith("(a worker failed to start 4 times in a row; giving up)")
    retries = [line for line in lines if "failed to start" in line and "starting another" in line]
    delays = sorted({line.rsplit(" in ", 1)[1] for line in retries})
    assert delays == ["0.5 s", "1 s", "2 s"]  # exponential, per worker
    assert len(retries) == 6 and len(lines) == 8, lines


async def test_sighups_while_workers_start_kill_none_of_them(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess]) -> None:
    port = free_port()
    gw = GatewayProcess(workers_config(tmp_path, sim, "h", port=port, db=tmp_path / "h.db"),
                        port, tmp_path / "h.log")
    processes.append(gw)
    status = Path(f"/proc/{gw.proc.pid}/status")

    def supervisor_handles_hup() -> bool:
        masks = {k: int(v, 16) for k, _, v in (line.partition(":\t") for line in
                                                status.read_text().splitlines())
                 if k in ("SigIgn", "SigCgt")}
        return bool((masks["SigIgn"] | masks["SigCgt"]) & 1)

    deadline = time.monotonic() + 20
    while not supervisor_handles_hup():
        assert gw.proc.poll() is None and time.monotonic() < deadline
        await asyncio.sleep(0.005)

    async def ready() -> bool:
        try:
            r = await asyncio.to_thread(requests.get, f"http://127.0.0.1:{port}/readyz", timeout=1)
        except requests.ConnectionError:
            return False
        return r.ok and len(worker_pids(gw)) == 2

    # The supervisor passes every SIGHUP to its workers, which are starting all this while.
    while not await ready():
        assert gw.proc.poll() is None and time.monotonic() < deadline + 20
        assert "exited with" not in gw.log_path.read_text()  # a worker died of a SIGHUP
        gw.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.02)
    text = gw.log_path.read_text()
    assert "exited with" not in text and "failed to start" not in text, text
    assert all(alive(pid) for pid in worker_pids(gw))
    r = await post_requests(gw.url, *objects_form("team-key", make_png(5)))
    assert r.status_code == 200
    assert gw.stop() == 0
