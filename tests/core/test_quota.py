"""Quota periods roll over on calendar UTC boundaries, derived from timestamps."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.config import Config
from gateway.core.quota import QuotaLedger, period_key
from gateway.devtools.sample_images import make_png
from gateway.store.base import Reclaimed
from gateway.store.owners import Owner, process_start, this_host
from gateway.store.sqlite import SQLiteStore
from tests.support import (
    TEAM_KEYS,
    GatewayFactory,
    Sim,
    make_config,
    objects_form,
    post_requests,
)


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("period", "before", "after", "keys"), [
    pytest.param("day", "2026-11-24T23:59:59", "2026-11-25T00:00:00",
                 ("2026-11-24", "2026-11-25"), id="day"),
    pytest.param("week", "2026-11-29T23:59:59", "2026-11-30T00:00:00",
                 ("2026-W48", "2026-W49"), id="week-monday"),
    pytest.param("week", "2026-12-31T12:00:00", "2027-01-04T00:00:00",
                 ("2026-W53", "2027-W01"), id="iso-week-year"),
    pytest.param("month", "2026-11-30T23:59:59", "2026-12-01T00:00:00",
                 ("2026-11", "2026-12"), id="month"),
    pytest.param("total", "2026-11-30T23:59:59", "2030-01-01T00:00:00",
                 ("total", "total"), id="total"),
])
def test_period_keys(period: str, before: str, after: str, keys: tuple[str, str]) -> None:
    assert (period_key(period, ts(before)), period_key(period, ts(after))) == keys


@pytest.mark.parametrize("period", ["day", "week", "month"])
async def test_quota_resets_when_the_period_rolls_over(
        gateway_factory: GatewayFactory, sim: Sim, period: str) -> None:
    now = [ts("2026-11-30T23:59:58")]  # a Monday's eve, a month's last day
    if period == "week":
        now = [ts("2026-11-29T23:59:58")]  # Sunday
    gw = await gateway_factory(quota={"period": period},
                               teams={"t": {"keys": ["k"], "quota": 2}}, clock=lambda: now[0])
    codes = [(await post_requests(gw.url, *objects_form("k", make_png(500 + i)))).status_code
             for i in range(3)]
    assert codes == [200, 200, 402]
    now[0] += 5  # past midnight UTC: a new day, week or month
    r = await post_requests(gw.url, *objects_form("k", make_png(600)))
    assert r.status_code == 200 and r.json()["data"]["quota"] == 1
    assert sim.state.calls == 3


async def test_total_period_never_resets(gateway_factory: GatewayFactory, sim: Sim) -> None:
    now = [ts("2026-11-30T23:59:58")]
    gw = await gateway_factory(quota={"period": "total"},
                               teams={"t": {"keys": [TEAM_KEYS["search"]], "quota": 1}},
                               clock=lambda: now[0])
    assert (await post_requests(gw.url, *objects_form(TEAM_KEYS["search"],
                                                      make_png(1)))).status_code == 200
    now[0] += 86400 * 400
    assert (await post_requests(gw.url, *objects_form(TEAM_KEYS["search"],
                                                      make_png(2)))).status_code == 402


# -- the ledger itself (in-process, so a mutation run's mutants are what runs) ---------------
def ledger_config(tmp_path: Path, period: str = "day") -> Config:
    return make_config("http://127.0.0.1:9/api/v2/", tmp_path / "gateway.db",
                       quota={"period": period}, teams={"t": {"keys": ["k"], "quota": 10}})


@pytest.fixture
def far_east(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time 14 hours ahead of UTC (POSIX TZ: no tz database needed)."""
    monkeypatch.setenv("TZ", "KIR-14")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_periods_are_utc_whatever_the_local_time(far_east: None, tmp_path: Path) -> None:
    late = ts("2026-11-30T23:30:00")  # already 2026-12-01 13:30 in local time
    assert time.localtime(late).tm_mday == 1
    assert period_key("day", late) == "2026-11-30" and period_key("month", late) == "2026-11"
    ledger = QuotaLedger(None, ledger_config(tmp_path), clock=lambda: late)  # type: ignore[arg-type]
    assert ledger.period() == "2026-11-30"


def test_the_period_moves_on_at_the_boundary_and_with_the_config(tmp_path: Path) -> None:
    now = [ts("2026-11-30T23:59:59") + 0.2]
    config = ledger_config(tmp_path)
    ledger = QuotaLedger(None, config, clock=lambda: now[0])  # type: ignore[arg-type]
    assert ledger.period() == "2026-11-30"
    now[0] += 0.5                                   # the same second
    assert ledger.period() == "2026-11-30"
    now[0] += 0.4                                   # 00:00:00.1, the next day
    assert ledger.period() == "2026-12-01"
    ledger.live.current = replace(config, quota=replace(config.quota, period="week"))  # a reload
    assert ledger.period() == "2026-W49"            # within the same second


def exited_pids(n: int) -> list[int]:
    processes = [subprocess.Popen(["true"]) for _ in range(n)]
    for p in processes:
        p.wait()
    return [p.pid for p in processes]


async def test_reclaim_ends_the_reservations_of_owners_that_are_gone(tmp_path: Path) -> None:
    """Two dead gateway processes each left one reservation never sent and one sent: the
    unsent are refunded, the sent stay charged as undelivered; live owners' stay pending."""
    store = SQLiteStore(str(tmp_path / "ledger.db"))
    await store.open()
    try:
        config = ledger_config(tmp_path, "month")
        team = next(t for t in config.teams if t.name == "t")
        clock = lambda: ts("2026-11-24T12:00:00")  # noqa: E731
        for n, pid in enumerate(exited_pids(2)):
            owner = Owner(f"dead-{n}", this_host(), pid, "")
            await store.register_owner(owner)
            dead = QuotaLedger(store, config, clock=clock, owner=owner)
            await dead.reserve(team)                       # never sent
            assert await store.mark_sent(await dead.reserve(team))
        me = QuotaLedger(store, config, clock=clock)
        await store.register_owner(me.owner)
        await me.reserve(team)                             # live: untouched
        alive = Owner("alive", this_host(), os.getpid(), process_start(os.getpid()))
        await store.register_owner(alive)                  # another live ledger (a worker)
        await QuotaLedger(store, config, clock=clock, owner=alive).reserve(team)
        assert await store.used("t", "2026-11") == 6
        assert await me.reclaim() == Reclaimed(refunded=2, undelivered=2)
        assert await store.used("t", "2026-11") == 4
        assert await me.reclaim() == Reclaimed(0, 0)       # nothing left to end
    finally:
        await store.close()
