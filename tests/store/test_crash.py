"""kill -9 at random moments under concurrent load, repeated on one SQLite file.

After every kill and restart: the file is intact, every result delivered before the kill is a
free hit, and right after the restart (not minutes later) nothing is pending: each reservation
the dead process left was refunded if its call was never sent, or kept charged as undelivered
if it was. So delivered <= charged, and every call the upstream received is charged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import requests

from gateway.devtools.sample_images import make_png
from tests.support import GatewayFactory, GatewayProcess, Sim, free_port, make_config, write_config

KEY = "crash-team-key"
ROUNDS = 3
CLIENTS = 6
SHARED = 900_000  # seeds every client and round repeats: coalesced and hits


@dataclass
class Ledger:
    used: int
    pending: int
    integrity: str
    undelivered: int = 0


@dataclass
class Deliveries:
    misses: int = 0                                   # 200s with fwd=miss, not distinct
    seeds: set[int] = field(default_factory=set)      # every image answered 200


def inspect(db: Path) -> Ledger:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        used, undelivered = conn.execute(
            "SELECT COALESCE(SUM(used), 0), COALESCE(SUM(undelivered), 0) FROM quota_usage "
            "WHERE team = 't'").fetchone()
        (pending,) = conn.execute("SELECT COUNT(*) FROM reservations").fetchone()
        (integrity,) = conn.execute("PRAGMA integrity_check").fetchone()
    return Ledger(int(used), int(pending), str(integrity), int(undelivered))


async def start(tmp_path: Path, sim: Sim, db: Path, name: str,
                processes: list[GatewayProcess]) -> GatewayProcess:
    port = free_port()
    config = write_config(tmp_path / f"{name}.toml", sim_url=sim.url, db=db, port=port,
                          teams={"t": (KEY, 100_000)})
    proc = GatewayProcess(config, port, tmp_path / f"{name}.log")
    processes.append(proc)
    await asyncio.to_thread(proc.wait_ready)
    return proc


async def post(session: aiohttp.ClientSession, url: str, seed: int) -> tuple[int, str]:
    form = aiohttp.FormData()
    for name, value in (("apikey", KEY), ("type", "objects"), ("max_labels", "10"),
                        ("min_confidence", "80")):
        form.add_field(name, value)
    form.add_field("file", make_png(seed), filename="image.png", content_type="image/png")
    async with session.post(url, data=form, timeout=aiohttp.ClientTimeout(total=30)) as r:
        await r.read()
        return r.status, r.headers.get("Cache-Status", "")


async def load_until_killed(gw: GatewayProcess, round_no: int, kill_at: float,
                            rng: random.Random, delivered: Deliveries) -> None:
    stop = asyncio.Event()

    async def client(worker: int, session: aiohttp.ClientSession) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            if rng.random() < 0.35:
                seed = SHARED + rng.randrange(8)
            else:
                seed = (round_no * 100 + worker) * 10_000 + n
            try:
                status, cache_status = await post(session, gw.url, seed)
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.01)
                continue
            if status == 200:
                delivered.seeds.add(seed)
                delivered.misses += "fwd=miss" in cache_status

    async with aiohttp.ClientSession() as session:
        workers = [asyncio.create_task(client(w, session)) for w in range(CLIENTS)]
        await asyncio.sleep(kill_at)
        gw.proc.send_signal(signal.SIGKILL)
        stop.set()
        await asyncio.to_thread(gw.proc.wait)
        await asyncio.gather(*workers)


def quota_used_metric(gw: GatewayProcess) -> float:
    text = requests.get(f"http://127.0.0.1:{gw.port}/metrics", timeout=5).text
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith('gateway_quota_used{team="t"}'))


async def verify_delivered(gw: GatewayProcess, sim: Sim, delivered: Deliveries,
                           ledger: Ledger, context: str) -> None:
    calls = sim.state.calls
    seeds = sorted(delivered.seeds)
    async with aiohttp.ClientSession() as session:
        for start_at in range(0, len(seeds), 8):
            answers = await asyncio.gather(*(post(session, gw.url, s)
                                             for s in seeds[start_at : start_at + 8]))
            for seed, (status, cache_status) in zip(seeds[start_at:], answers, strict=False):
                assert status == 200 and "; hit;" in cache_status, (
                    f"{context}: delivered result {seed} was lost: {status} {cache_status}")
    assert sim.state.calls == calls, f"{context}: a delivered result needed the upstream again"
    assert quota_used_metric(gw) == ledger.used, context


async def test_repeated_kill_9_under_load_loses_nothing_delivered_and_overspends_nothing(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess]) -> None:
    seed = int(os.environ.get("CRASH_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    db = tmp_path / "crash.db"
    delivered = Deliveries()
    for round_no in range(ROUNDS + 1):
        gw = await start(tmp_path, sim, db, f"round{round_no}", processes)
        if round_no:
            # Right after the restart: the dead process's reservations have all ended.
            ledger = inspect(db)
            context = f"CRASH_SEED={seed} after kill {round_no}"
            assert ledger.integrity == "ok" and ledger.pending == 0, (context, ledger)
            # Every delivered miss was settled with the result that it stored; every call
            # the upstream received was charged (marked sent before it left); what the
            # kill cut short between that mark and the socket is the only slack.
            settled = ledger.used - ledger.undelivered
            assert delivered.misses <= settled <= sim.state.successes, (
                context, ledger, delivered.misses, sim.state.successes)
            assert sim.state.calls <= ledger.used <= sim.state.calls + CLIENTS, (
                context, ledger, sim.state.calls)
            await verify_delivered(gw, sim, delivered, ledger, context)
        if round_no == ROUNDS:
            break
        sim.state.latency_ms = rng.choice([0, 10, 40])
        kill_at = rng.uniform(0.3, 1.5)
        await load_until_killed(gw, round_no, kill_at, rng, delivered)
    assert delivered.misses > 0 and len(delivered.seeds) > delivered.misses // 2


REDIS_URL = "redis://127.0.0.1:6379/14"


def backend_config(tmp_path: Path, sim: Sim, backend: str, port: int, name: str,
                   quota: int = 100) -> Path:
    prefix = tmp_path / "redis-prefix"  # one fresh prefix per test, shared by its processes
    if not prefix.exists():
        prefix.write_text(f"crash:{uuid.uuid4().hex}:")
    storage = (f'backend = "sqlite"\npath = "{tmp_path / "step.db"}"' if backend == "sqlite"
               else f'backend = "redis"\nredis_url = "{REDIS_URL}"\n'
                    f'redis_prefix = "{prefix.read_text()}"')
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}

[upstream]
url = "{sim.url}"
api_key_env = "TEST_UPSTREAM_KEY"
timeout_s = 10

[storage]
{storage}

[quota]
period = "month"

[teams.t]
keys = ["{KEY}"]
quota = {quota}
""")
    return path


async def ledger_of(config: Path) -> tuple[int, int, int]:
    """(charged, undelivered, pending) of team t, read through the store's own code."""
    from gateway.config import load_config
    from gateway.core.quota import period_key
    from gateway.store import open_store

    cfg = load_config(config, env={"TEST_UPSTREAM_KEY": "x"})
    store = open_store(cfg.storage)
    await store.open()
    try:
        rows = {u.team: u for u in await store.usage(period_key("month", time.time()))}
        pending = len(await store.pending_owners())
    finally:
        await store.close()
    row = rows.get("t")
    return (row.charged, row.undelivered, pending) if row else (0, 0, pending)


async def start_process(config: Path, port: int, log: Path, processes: list[GatewayProcess],
                        env: dict[str, str] | None = None) -> GatewayProcess:
    proc = GatewayProcess(config, port, log, env=env)
    processes.append(proc)
    await asyncio.to_thread(proc.wait_ready)
    return proc


# (failpoint, sim latency): where the kill lands, and what the ledger must say right after a
# restart: charged, undelivered, upstream calls, and whether the image is then a free hit.
STEPS = {
    "after reserve": ("reserved", (0, 0, 0, False)),
    "after send": (None, (1, 1, 1, False)),  # killed while the upstream holds the call
    "after the answer": ("answered", (1, 1, 1, False)),
    "after save": ("saved", (1, 0, 1, True)),
}


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
@pytest.mark.parametrize("step", list(STEPS))
async def test_kill_at_each_step_of_a_miss_leaves_an_exact_ledger(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess], backend: str,
        step: str) -> None:
    point, (charged, undelivered, calls, hit_after) = STEPS[step]
    port = free_port()
    config = backend_config(tmp_path, sim, backend, port, "victim")
    env = {"GATEWAY_FAILPOINTS": point} if point else None
    victim = await start_process(config, port, tmp_path / "victim.log", processes, env)
    if point is None:
        sim.state.latency_ms = 3000
    async with aiohttp.ClientSession() as session:
        call = asyncio.create_task(post(session, victim.url, 77))
        if point is None:
            for _ in range(500):
                if sim.state.calls:
                    break
                await asyncio.sleep(0.02)
            victim.proc.send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(victim.proc.wait, 20) == -signal.SIGKILL
        with pytest.raises(aiohttp.ClientError):
            await call
    sim.state.latency_ms = 0
    port = free_port()
    again = await start_process(backend_config(tmp_path, sim, backend, port, "again"), port,
                                tmp_path / "again.log", processes)
    # Right after the restart, before any request: nothing pending, the charge follows the bill.
    assert await ledger_of(config) == (charged, undelivered, 0)
    assert sim.state.calls == calls
    async with aiohttp.ClientSession() as session:
        status, cache_status = await post(session, again.url, 77)
    assert status == 200
    assert ("; hit;" in cache_status) is hit_after, cache_status
    assert sim.state.calls == calls + (not hit_after)


async def test_a_live_owners_call_is_never_reclaimed_whatever_the_wall_clock_does(
        gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path) -> None:
    # NTP stepping the clock forward an hour (a VM resumed) must not refund a call in flight.
    offset = [0.0]
    config = make_config(sim.url, tmp_path / "clock.db",
                         teams={"t": {"keys": [KEY], "quota": 1}})
    gw = await gateway_factory(config, clock=lambda: time.time() + offset[0])
    sim.state.latency_ms = 1500
    async with aiohttp.ClientSession() as session:
        call = asyncio.create_task(post(session, gw.url, 1))
        for _ in range(300):
            if sim.state.calls:
                break
            await asyncio.sleep(0.01)
        offset[0] = 3600.0 * 24
        done = await gw.state.ledger.reclaim()
        assert (done.refunded, done.undelivered) == (0, 0)
        status, _ = await call
        assert status == 200
        # The team's one unit is spent: a second paid call is refused, not billed.
        status, _ = await post(session, gw.url, 2)
    assert status == 402
    assert sim.state.calls == 1


async def test_a_dead_workers_calls_are_ended_by_a_live_process_on_the_same_store(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess]) -> None:
    db = tmp_path / "two.db"
    victim = await start(tmp_path, sim, db, "victim", processes)
    survivor = await start(tmp_path, sim, db, "survivor", processes)
    sim.state.latency_ms = 3000
    async with aiohttp.ClientSession() as session:
        calls = [asyncio.create_task(post(session, victim.url, 6000 + i)) for i in range(3)]
        for _ in range(500):
            if sim.state.calls == 3:
                break
            await asyncio.sleep(0.02)
        victim.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.proc.wait)
        await asyncio.gather(*calls, return_exceptions=True)
        assert inspect(db).pending == 3
        # The survivor keeps serving, and its housekeeping (every few seconds) ends them.
        sim.state.latency_ms = 0
        status, _ = await post(session, survivor.url, 6100)
        assert status == 200
    for _ in range(200):  # at most 20 s
        if inspect(db).pending == 0:
            break
        await asyncio.sleep(0.1)
    ledger = inspect(db)
    assert (ledger.pending, ledger.used, ledger.undelivered) == (0, 4, 3)


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    with open(f"/proc/{supervisor}/task/{supervisor}/children") as f:
        pids = [int(p) for p in f.read().split()]
    return [p for p in pids if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def sockets_of(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except FileNotFoundError:  # closed between the listing and the read (seen in CI)
            continue
    return count


async def test_a_killed_worker_is_a_crash_of_its_calls_only(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess]) -> None:
    db = tmp_path / "workers.db"
    port = free_port()
    config = write_config(tmp_path / "workers.toml", sim_url=sim.url, db=db, port=port,
                          teams={"t": (KEY, 100_000)}, server="workers = 2")
    gw = GatewayProcess(config, port, tmp_path / "workers.log")
    processes.append(gw)
    await asyncio.to_thread(gw.wait_ready)
    workers = worker_pids(gw.proc.pid)
    assert len(workers) == 2, workers
    sim.state.latency_ms = 3000
    async with aiohttp.ClientSession() as session:
        calls = [asyncio.create_task(post(session, gw.url, 7000 + i)) for i in range(8)]
        for _ in range(500):
            if sim.state.calls == 8:
                break
            await asyncio.sleep(0.02)
        assert sim.state.calls == 8
        # The worker holding more calls (each is a client and an upstream socket).
        os.kill(max(workers, key=sockets_of), signal.SIGKILL)
        answers = await asyncio.gather(*calls, return_exceptions=True)
    delivered = sum(1 for a in answers if a == (200, "imagerecognize-gateway; fwd=miss; stored"))
    lost = sum(1 for a in answers if isinstance(a, BaseException))
    assert delivered + lost == 8 and lost >= 1, answers
    # The other worker kept serving; the replacement ends the dead one's calls as it starts.
    for _ in range(200):  # at most 20 s
        if inspect(db).pending == 0:
            break
        await asyncio.sleep(0.1)
    ledger = inspect(db)
    assert (ledger.pending, ledger.used, ledger.undelivered) == (0, 8, lost), (ledger, answers)
    assert gw.proc.poll() is None  # the supervisor did not go down with its worker


LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
HAVE_FAKETIME = LIBFAKETIME.exists()


async def test_a_wall_clock_step_in_a_real_process_refunds_no_call_in_flight(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess]) -> None:
    # libfaketime moves the process's wall clock (as NTP stepping it after a VM pause does)
    # and leaves its monotonic clock alone, as the kernel does.
    assert HAVE_FAKETIME, "apt-get install libfaketime (.ci/run installs it)"
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    db = tmp_path / "clock.db"
    port = free_port()
    config = write_config(tmp_path / "clock.toml", sim_url=sim.url, db=db, port=port,
                          teams={"t": (KEY, 1)})
    gw = GatewayProcess(config, port, tmp_path / "clock.log", env={
        "LD_PRELOAD": str(LIBFAKETIME), "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"})
    processes.append(gw)
    await asyncio.to_thread(gw.wait_ready)
    sim.state.latency_ms = 7000  # longer than one housekeeping round (5 s)
    async with aiohttp.ClientSession() as session:
        call = asyncio.create_task(post(session, gw.url, 1))
        for _ in range(500):
            if sim.state.calls:
                break
            await asyncio.sleep(0.02)
        offset.write_text("+1d\n")  # the wall clock jumps a day forward mid-call
        status, _ = await call
        assert status == 200
        sim.state.latency_ms = 0
        # The team's one unit is spent: a second paid call is refused, not billed.
        status, _ = await post(session, gw.url, 2)
    assert status == 402
    assert sim.state.calls == 1
    ledger = inspect(db)
    assert (ledger.used, ledger.pending, ledger.undelivered) == (1, 0, 0)
    assert "refunded" not in gw.log_path.read_text()
