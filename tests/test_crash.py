"""kill -9 at random moments under concurrent load, repeated on one SQLite file.

After every kill: the file is intact, every result delivered before the kill is a free hit,
and the ledger holds at least every delivered miss and at most what the upstream served.
Reservations a killed process left pending are refunded once past the reclaim horizon.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import requests

from gateway.quota import QuotaLedger
from gateway.sample_images import make_png
from gateway.store.sqlite import SQLiteStore
from tests.conftest import GatewayFactory, GatewayProcess, Sim, free_port, make_config, write_config

KEY = "crash-team-key"
ROUNDS = 3
CLIENTS = 6
SHARED = 900_000  # seeds every client and round repeats: coalesced and hits


@dataclass
class Ledger:
    used: int
    pending: int
    integrity: str


@dataclass
class Deliveries:
    misses: int = 0                                   # 200s with fwd=miss, not distinct
    seeds: set[int] = field(default_factory=set)      # every image answered 200


def inspect(db: Path) -> Ledger:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (used,) = conn.execute(
            "SELECT COALESCE(SUM(used), 0) FROM quota_usage WHERE team = 't'").fetchone()
        (pending,) = conn.execute("SELECT COUNT(*) FROM reservations").fetchone()
        (integrity,) = conn.execute("PRAGMA integrity_check").fetchone()
    return Ledger(int(used), int(pending), str(integrity))


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
    previous: Ledger | None = None
    for round_no in range(ROUNDS + 1):
        gw = await start(tmp_path, sim, db, f"round{round_no}", processes)
        if previous is not None:
            await verify_delivered(gw, sim, delivered, previous,
                                   f"CRASH_SEED={seed} after kill {round_no}")
        if round_no == ROUNDS:
            break
        sim.state.latency_ms = rng.choice([0, 10, 40])
        kill_at = rng.uniform(0.3, 1.5)
        context = f"CRASH_SEED={seed} round {round_no} killed at {kill_at:.2f}s"
        await load_until_killed(gw, round_no, kill_at, rng, delivered)
        ledger = inspect(db)
        assert ledger.integrity == "ok", context
        # Every delivered miss was settled in the transaction that stored it; every settled
        # charge is an upstream success. A pending reservation is a call the kill cut short
        # (possibly before it reached the upstream): charged until reclaimed, never lost.
        settled = ledger.used - ledger.pending
        assert delivered.misses <= settled <= sim.state.successes, (
            context, ledger, delivered.misses, sim.state.successes)
        assert ledger.used <= sim.state.calls + ledger.pending, (context, ledger, sim.state.calls)
        assert ledger.pending <= CLIENTS * (round_no + 1), (context, ledger)
        previous = ledger
    assert delivered.misses > 0 and len(delivered.seeds) > delivered.misses // 2


async def test_reservations_left_by_a_killed_process_are_refunded_past_the_horizon(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess],
        gateway_factory: GatewayFactory) -> None:
    db = tmp_path / "pending.db"
    gw = await start(tmp_path, sim, db, "victim", processes)
    sim.state.latency_ms = 2000  # the calls are still at the upstream when the process dies
    async with aiohttp.ClientSession() as session:
        calls = [asyncio.create_task(post(session, gw.url, 5000 + i)) for i in range(4)]
        for _ in range(500):  # at most 10 s
            if sim.state.calls == 4:
                break
            await asyncio.sleep(0.02)
        assert sim.state.calls == 4
        gw.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(gw.proc.wait)
        answers = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(a, aiohttp.ClientError) for a in answers), answers
    killed = inspect(db)
    assert killed == Ledger(used=4, pending=4, integrity="ok")

    # A restarted gateway keeps them: they are younger than any upstream call can take.
    again = await start(tmp_path, sim, db, "restarted", processes)
    assert quota_used_metric(again) == 4
    assert again.stop() == 0
    assert inspect(db).pending == 4

    config = make_config(sim.url, db, teams={"t": {"keys": [KEY], "quota": 100}})
    horizon = max(4 * config.upstream.timeout_s, 300.0)
    store = SQLiteStore(str(db))
    await store.open()
    try:
        early = QuotaLedger(store, config, clock=lambda: time.time() + horizon - 30)
        assert await early.reclaim() == 0
    finally:
        await store.close()
    assert inspect(db).pending == 4

    # A gateway whose clock is past the horizon refunds them when it starts.
    late = await gateway_factory(config, clock=lambda: time.time() + horizon + 60)
    assert inspect(db) == Ledger(used=killed.used - killed.pending, pending=0, integrity="ok")
    assert await late.state.ledger.reclaim() == 0  # refunded once, never twice
    assert inspect(db).used == 0
