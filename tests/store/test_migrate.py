"""``gateway migrate-store``: a populated SQLite store copied to Redis and back loses
nothing, a second run changes nothing, and the copy refuses while a gateway uses the store."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.store.base import CachedResult, Hit, KeyRecord, Store
from gateway.store.migrate import Endpoint, MigrationRefused, migrate
from gateway.store.owners import Owner, this_host, this_process
from gateway.store.redis import RedisStore
from gateway.store.sqlite import SQLiteStore
from tests.support import TEAM_KEYS, gateway_command

REDIS_URL = "redis://127.0.0.1:6379/15"
PERIODS = ("2026-09", "2026-10", "2026-11")


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    name = f"migrate:{uuid.uuid4().hex}:"
    yield name
    r = aioredis.Redis.from_url(REDIS_URL)
    async for k in r.scan_iter(match=name + "*"):
        await r.delete(k)
    await r.aclose()


def config_file(path: Path, storage: str) -> Path:
    teams = "".join(f'[teams.{t}]\nkeys = ["{k}"]\nquota = 100\n\n' for t, k in TEAM_KEYS.items())
    path.write_text(f'[upstream]\nurl = "http://127.0.0.1:1/api/v2/"\n\n[storage]\n{storage}\n\n'
                    f'[quota]\nperiod = "month"\n\n{teams}')
    return path


def sqlite_config(tmp_path: Path, name: str) -> Path:
    return config_file(tmp_path / f"{name}.toml",
                       f'backend = "sqlite"\npath = "{tmp_path / name / "gateway.db"}"')


def redis_config(tmp_path: Path, prefix: str) -> Path:
    return config_file(tmp_path / "redis.toml",
                       f'backend = "redis"\nredis_url = "{REDIS_URL}"\nredis_prefix = "{prefix}"')


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*gateway_command(), *args], capture_output=True, text=True,
                          timeout=60)


async def populate(store: Store) -> None:
    """Three months of charges, hits, coalesced and undelivered calls, cached results of two
    types and scopes, and meta rows, as gateways leave them."""
    now = time.time()
    for n, period in enumerate(PERIODS):
        for team, calls in (("search", 5 + n), ("ads", 2 + n), ("tiny", n)):
            for i in range(calls):
                r = await store.reserve(team, period, 100, at=now)
                assert r is not None
                await store.mark_sent(r)
                if i == 0 and team == "ads":
                    await store.keep_undelivered(r)  # sent, no result delivered
                else:
                    await store.settle(r)
        refunded = await store.reserve("tiny", period, 100, at=now)
        assert refunded is not None and await store.refund(refunded)
        await store.record_hits([Hit("k0", "search", period, now)] * (3 + n)
                                + [Hit("k0", "search", period, now, derived=True)] * (n + 2)
                                + [Hit("k1", "ads", period, now, coalesced=True)] * (n + 1))
    for i in range(7):
        await store.save_result(CachedResult(
            key=f"{'ab' * 16}/objects?max_labels={i}&min_confidence=0" if i < 5 else f"ads|k{i}",
            content_hash="ab" * 16 if i < 5 else "cd" * 16, type="objects" if i < 5 else "nsfw",
            params=f"max_labels={i}&min_confidence=0", scope="" if i < 5 else "ads",
            data_prefix=b'{"error":0,"objects":[' + str(i).encode() + b'],"quota":',
            created_at=now - 100 * i), max_bytes=10**9)
    await store.set_meta("upstream_quota", "9876")
    await store.set_meta("drift_base", "10000 5 9990")
    # Store-issued team keys: one used, one revoked.
    used = KeyRecord("k-used", "search", "sha256:" + "1" * 64, "billing", now - 50,
                     expires_at=now + 86400)
    revoked = KeyRecord("k-revoked", "ads", "sha256:" + "2" * 64, "", now - 40,
                        revoked_at=now - 10)
    for record in (used, revoked):
        await store.save_key(record)
    await store.record_key_uses({"k-used": (4, now - 5)})


async def dump(store: Store) -> tuple[object, ...]:
    results, cursor = [], ""
    while True:
        page, cursor = await store.results_page(cursor, 3)
        results += page
        if not cursor:
            break
    meta = await store.meta_items()
    meta.pop("cache_generation", None)
    meta.pop("keys_generation", None)  # each store's own: moved by every key saved there
    return (await store.ledger_rows(), sorted(set(results), key=lambda r: r.key), meta,
            await store.totals(), await store.charged_total(), await store.list_keys())


async def test_a_populated_sqlite_store_goes_to_redis_and_back_losing_nothing(
        tmp_path: Path, prefix: str) -> None:
    src_cfg, back_cfg = sqlite_config(tmp_path, "one"), sqlite_config(tmp_path, "back")
    redis_cfg = redis_config(tmp_path, prefix)
    source = SQLiteStore(str(tmp_path / "one" / "gateway.db"))
    await source.open()
    await populate(source)
    before = await dump(source)
    assert any(row.derived for row in before[0])  # the derived column is copied too
    await source.close()
    usage = {(p, f): gateway("usage", "--config", str(src_cfg), "--period", p, "--format", f)
             for p in PERIODS for f in ("table", "csv")}
    assert all(u.returncode == 0 for u in usage.values())
    assert "search" in usage[("2026-11", "csv")].stdout

    first = gateway("migrate-store", "--from", str(src_cfg), "--to", str(redis_cfg))
    assert first.returncode == 0, first.stderr
    assert "ledger: 9 rows copied, 0 already there" in first.stdout
    assert "cache: 7 results copied" in first.stdout
    again = gateway("migrate-store", "--from", str(src_cfg), "--to", str(redis_cfg))
    assert again.returncode == 0, again.stderr
    assert "ledger: 0 rows copied, 9 already there" in again.stdout
    assert "cache: 0 results copied, 7 already there" in again.stdout
    assert "meta: 0 copied, 3 already there" in again.stdout
    assert "team keys: 2 copied, 0 already there" in first.stdout
    assert "team keys: 0 copied, 2 already there" in again.stdout
    back = gateway("migrate-store", "--from", f"{REDIS_URL}?prefix={prefix}",
                   "--to", str(back_cfg))
    assert back.returncode == 0, back.stderr

    for cfg in (redis_cfg, back_cfg):
        for (period, fmt), shown in usage.items():
            now = gateway("usage", "--config", str(cfg), "--period", period, "--format", fmt)
            assert now.stdout == shown.stdout, (cfg, period, fmt)
    stores: list[Store] = [RedisStore(REDIS_URL, prefix=prefix),
                           SQLiteStore(str(tmp_path / "back" / "gateway.db"))]
    for store in stores:
        await store.open()
        assert await dump(store) == before, store
        await store.close()


async def test_the_copy_settles_dead_gateways_reservations_and_refuses_live_ones(
        tmp_path: Path, prefix: str) -> None:
    source = Endpoint(SQLiteStore(str(tmp_path / "gateway.db")), "source", 10**9)
    dest = Endpoint(RedisStore(REDIS_URL, prefix=prefix), "dest", 10**9)
    await source.store.open()
    await dest.store.open()
    try:
        exited = await asyncio.create_subprocess_exec("true")
        await exited.wait()
        dead = Owner("dead", this_host(), exited.pid, "")
        live = this_process()
        elsewhere = Owner("elsewhere", "other-host/boot", 4242, "1")
        for owner in (dead, live, elsewhere):
            await source.store.register_owner(owner)
        sent = await source.store.reserve("search", "2026-11", 10, at=0, owner="dead")
        unsent = await source.store.reserve("search", "2026-11", 10, at=0, owner="dead")
        assert sent is not None and unsent is not None and await source.store.mark_sent(sent)
        pending = await source.store.reserve("ads", "2026-11", 10, at=0, owner=live.id)
        assert pending is not None

        with pytest.raises(MigrationRefused, match="on this host uses the source store"):
            await migrate(source, dest, wait_s=0)
        assert await dest.store.ledger_rows() == []  # nothing copied
        await source.store.reclaim_owner(live.id)  # the live gateway stopped cleanly

        # Another host's gateway: refused while its beat moves, taken as gone once it stands.
        async def beating() -> None:
            await asyncio.sleep(0.2)
            await source.store.beat(elsewhere)

        beat = asyncio.create_task(beating())
        with pytest.raises(MigrationRefused, match="its beat moved"):
            await migrate(source, dest, wait_s=0.5)
        await beat
        assert await dest.store.ledger_rows() == []

        report = await migrate(source, dest, wait_s=0.3)
        assert (report.settled.refunded, report.settled.undelivered) == (1, 1)
        (row,) = [r for r in await dest.store.ledger_rows() if r.team == "search"]
        assert (row.charged, row.undelivered) == (1, 1)  # the sent call stays charged
        assert await source.store.pending_owners() == [] and await source.store.owners() == []

        # A destination that took charges of its own is not overwritten.
        r = await dest.store.reserve("search", "2026-11", 10, at=0)
        assert r is not None
        await dest.store.settle(r)
        with pytest.raises(MigrationRefused, match="differs from the source's"):
            await migrate(source, dest, wait_s=0)
        assert await dest.store.used("search", "2026-11") == 2
    finally:
        await source.store.close()
        await dest.store.close()
