"""The charge follows the bill: a call the upstream answered stays charged whatever the store
does afterwards, the answer waits for the store, and mixed directives cannot corrupt the
in-flight table."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
import requests

from gateway.devtools.sample_images import make_png
from tests.support import TEAM_KEYS, GatewayFactory, Sim, make_config

KEY = TEAM_KEYS["search"]


async def post(session: aiohttp.ClientSession, url: str, seed: int,
               headers: dict[str, str] | None = None) -> tuple[int, str]:
    form = aiohttp.FormData()
    for name, value in (("apikey", KEY), ("type", "objects"), ("max_labels", "10"),
                        ("min_confidence", "80")):
        form.add_field(name, value)
    form.add_field("file", make_png(seed), filename="i.png", content_type="image/png")
    async with session.post(url, data=form, headers=headers or {}) as r:
        await r.read()
        return r.status, r.headers.get("Cache-Status", "")


def ledger(db: Path) -> tuple[int, int, int]:
    """(charged, undelivered, pending) for team search, read from the file."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        used, undelivered = conn.execute(
            "SELECT COALESCE(SUM(used), 0), COALESCE(SUM(undelivered), 0) FROM quota_usage "
            "WHERE team = 'search'").fetchone()
        (pending,) = conn.execute("SELECT COUNT(*) FROM reservations").fetchone()
    return int(used), int(undelivered), int(pending)


async def wait_for_calls(sim: Sim, n: int) -> None:
    for _ in range(500):
        if sim.state.calls >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the upstream saw {sim.state.calls} calls, not {n}")


async def test_a_store_that_fails_after_the_upstream_answered_keeps_the_charge(
        gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    config = make_config(sim.url, db, storage={"busy_timeout_ms": 200})
    gw = await gateway_factory(config)
    sim.state.latency_ms = 800
    lock = sqlite3.connect(db, isolation_level=None)
    async with aiohttp.ClientSession() as session:
        call = asyncio.create_task(post(session, gw.url, 1))
        await wait_for_calls(sim, 1)
        # Another process holds the write lock past busy_timeout_ms while the answer comes.
        lock.execute("BEGIN IMMEDIATE")
        try:
            status, _ = await call
        finally:
            lock.execute("ROLLBACK")
            lock.close()
    assert status == 200  # paid for and delivered, though it could not be stored
    for _ in range(100):  # the charge that could not be written is retried
        if ledger(db) == (1, 0, 0):
            break
        await asyncio.sleep(0.05)
    assert ledger(db) == (1, 0, 0)
    # Housekeeping, however late, never gives back a call the upstream billed.
    done = await gw.state.ledger.reclaim()
    assert (done.refunded, done.undelivered) == (0, 0)
    assert ledger(db) == (1, 0, 0)


async def test_the_answer_waits_until_the_result_and_its_charge_are_stored(
        gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    gw = await gateway_factory(make_config(sim.url, db, storage={"busy_timeout_ms": 5000}))
    lock = sqlite3.connect(db, isolation_level=None)
    sim.state.latency_ms = 300
    async with aiohttp.ClientSession() as session:
        call = asyncio.create_task(post(session, gw.url, 2))
        await wait_for_calls(sim, 1)
        lock.execute("BEGIN IMMEDIATE")  # the store's write waits for this lock
        held = time.monotonic()
        await asyncio.sleep(1.0)
        assert not call.done(), "answered before its result was committed"
        lock.execute("ROLLBACK")
        lock.close()
        status, cache_status = await call
    assert status == 200 and "stored" in cache_status
    assert time.monotonic() - held >= 1.0
    assert ledger(db) == (1, 0, 0)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_no_cache_and_plain_requests_for_one_image_at_quota_never_500(
        gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path, backend: str) -> None:
    storage = ({} if backend == "sqlite" else
               {"backend": "redis", "redis_url": "redis://127.0.0.1:6379/13",
                "redis_prefix": f"race:{uuid.uuid4().hex}:"})
    config = make_config(sim.url, tmp_path / "gateway.db", storage=storage,
                         teams={"search": {"keys": [KEY], "quota": 20}})
    gw = await gateway_factory(config)
    sim.state.latency_ms = 15
    async with aiohttp.ClientSession() as session:
        statuses: list[int] = []
        for round_no in range(4):
            answers = await asyncio.gather(*(
                post(session, gw.url, 100 + round_no,
                     {"Cache-Control": "no-cache"} if i % 2 else None)
                for i in range(60)))
            statuses += [s for s, _ in answers]
    assert set(statuses) <= {200, 402}, sorted(set(statuses))
    assert 402 in statuses
    assert len(gw.state.service.flights) == 0
    (usage,) = await gw.state.store.usage(gw.state.ledger.period())
    assert (usage.charged, usage.undelivered) == (20, 0)
    assert await gw.state.store.pending_owners() == []
    assert sim.state.calls == 20


async def drift(gw_state: object) -> float:
    from gateway.http.state import GatewayState

    assert isinstance(gw_state, GatewayState)
    await gw_state.service.reconcile()
    return gw_state.metrics.ledger_drift._value.get()  # type: ignore[attr-defined]


async def test_the_ledger_is_reconciled_against_the_upstreams_own_count(
        gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path) -> None:
    gw = await gateway_factory(upstream={"timeout_s": 1})
    async with aiohttp.ClientSession() as session:
        for seed in range(3):
            assert (await post(session, gw.url, 500 + seed))[0] == 200
        assert await drift(gw.state) == 0  # three calls charged, three counted upstream
        # Someone spends the account's key behind the gateway's back: the upstream counts
        # a call the ledger never saw.
        form = aiohttp.FormData()
        for name, value in (("apikey", sim.state.api_key), ("type", "objects"),
                            ("max_labels", "5"), ("min_confidence", "50")):
            form.add_field(name, value)
        form.add_field("file", make_png(600), filename="i.png", content_type="image/png")
        async with session.post(sim.url, data=form) as r:
            assert r.status == 200
        assert (await post(session, gw.url, 601))[0] == 200
        assert await drift(gw.state) == 1
        # A failure the gateway kept charged (it may have been billed) that the upstream did
        # not count: the drift shows the over-charge.
        sim.state.fault, sim.state.fault_count = "500", 1
        assert (await post(session, gw.url, 602))[0] == 502
        assert (await post(session, gw.url, 603))[0] == 200
        assert await drift(gw.state) == 0
    body = await asyncio.to_thread(requests.get, f"{gw.base}/metrics", timeout=5)
    assert "gateway_ledger_drift_calls 0.0" in body.text
