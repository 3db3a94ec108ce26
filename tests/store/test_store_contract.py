"""One contract suite, run over every store implementation (real SQLite file, real Redis)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.store.base import CachedResult, Hit, Reclaimed, Store
from gateway.store.owners import Owner
from gateway.store.redis import RedisStore
from gateway.store.sqlite import SQLiteStore
from tests.support import REDIS_URL


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store
    if request.param == "sqlite":
        s = SQLiteStore(str(tmp_path / "store.db"))
    else:
        s = RedisStore(REDIS_URL, prefix=f"test:{uuid.uuid4().hex}:")
    await s.open()
    yield s
    if isinstance(s, RedisStore):
        await s.purge()
        r = s._r
        async for k in r.scan_iter(match=s.prefix + "*"):
            await r.delete(k)
    await s.close()


def result(key: str, *, content_hash: str = "h" * 32, type_: str = "objects",
           data: bytes = b'{"error":0,"objects":[],"quota":', created: float | None = None,
           scope: str = "") -> CachedResult:
    return CachedResult(key=key, content_hash=content_hash, type=type_, params="max_labels=1",
                        scope=scope, data_prefix=data, created_at=created or time.time())


async def test_lookup_miss_then_hit_with_the_teams_usage(store: Store) -> None:
    assert await store.lookup("k1", "team", "2026-11") == (None, 0)
    r = result("k1")
    await store.save_result(r, max_bytes=10**9)
    await store.reserve("team", "2026-11", 5, at=time.time())
    found, used = await store.lookup("k1", "team", "2026-11")
    assert found is not None and found.data_prefix == r.data_prefix and used == 1
    assert found.content_hash == r.content_hash and found.type == "objects"


async def test_reserve_never_passes_the_limit_under_concurrency(store: Store) -> None:
    now = time.time()
    outcomes = await asyncio.gather(*(store.reserve("t", "p", 7, at=now) for _ in range(40)))
    admitted = [o for o in outcomes if o is not None]
    assert sorted(o.used for o in admitted) == list(range(1, 8))
    assert await store.used("t", "p") == 7
    assert await store.refund(admitted[0]) is True
    assert await store.used("t", "p") == 6
    again = await store.reserve("t", "p", 7, at=now)
    assert again is not None and again.used == 7
    assert await store.reserve("t", "p", 0, at=now) is None
    assert await store.used("t", "other-period") == 0


async def test_refund_is_idempotent_and_never_after_settling(store: Store) -> None:
    now = time.time()
    a = await store.reserve("t", "p", 5, at=now)
    b = await store.reserve("t", "p", 5, at=now)
    assert a is not None and b is not None
    assert await store.refund(a) is True
    assert await store.refund(a) is False  # a second refund gives nothing back
    await store.settle(b)
    assert await store.refund(b) is False
    assert await store.used("t", "p") == 1


async def test_saving_a_result_settles_its_reservation(store: Store) -> None:
    r = await store.reserve("t", "p", 5, at=time.time(), owner="gone")
    assert r is not None
    assert await store.mark_sent(r) is True
    await store.save_result(result("k"), max_bytes=10**9, settle=r)
    assert await store.reclaim_owner("gone") == Reclaimed(0, 0)  # nothing pending
    assert await store.used("t", "p") == 1
    assert await store.refund(r) is False


async def test_a_gone_owners_reservations_end_by_whether_they_were_sent(store: Store) -> None:
    now = time.time()
    dead, alive = Owner("dead", "h/b", 1, "1"), Owner("alive", "h/b", 2, "2")
    for o in (dead, alive):
        await store.register_owner(o)
    unsent = await store.reserve("t", "p", 9, at=now, owner="dead")
    sent = await store.reserve("t", "p", 9, at=now, owner="dead")
    live = await store.reserve("t", "p", 9, at=now, owner="alive")
    assert unsent is not None and sent is not None and live is not None
    assert await store.mark_sent(sent) is True
    assert await store.used("t", "p") == 3
    assert sorted(o.id for o in await store.pending_owners()) == ["alive", "dead"]
    assert await store.reclaim_owner("dead") == Reclaimed(refunded=1, undelivered=1)
    # The sent one stays charged, counted as undelivered; the other owner's is untouched.
    assert await store.used("t", "p") == 2
    (usage,) = await store.usage("p")
    assert (usage.charged, usage.undelivered) == (2, 1)
    assert [o.id for o in await store.pending_owners()] == ["alive"]
    # Ended once: later endings by the (not so) dead owner change nothing.
    assert await store.mark_sent(unsent) is False
    assert await store.refund(sent) is False
    await store.settle(unsent)
    await store.keep_undelivered(sent)
    assert await store.used("t", "p") == 2
    assert (await store.usage("p"))[0].undelivered == 1


async def test_an_undelivered_call_keeps_its_charge(store: Store) -> None:
    r = await store.reserve("t", "p", 5, at=time.time())
    assert r is not None
    await store.keep_undelivered(r)
    await store.keep_undelivered(r)  # idempotent
    assert await store.refund(r) is False
    (usage,) = await store.usage("p")
    assert (usage.charged, usage.undelivered) == (1, 1)


async def test_owner_rows_carry_identity_and_beats(store: Store) -> None:
    me = Owner("me", "host/boot", 1234, "99")
    await store.register_owner(me)
    r = await store.reserve("t", "p", 5, at=time.time(), owner="me")
    assert r is not None
    await store.beat(me)
    await store.beat(me)
    (seen,) = await store.pending_owners()
    assert (seen.id, seen.host, seen.pid, seen.started, seen.beat) == ("me", "host/boot", 1234,
                                                                       "99", 2)
    orphan = await store.reserve("t", "p", 5, at=time.time(), owner="never-registered")
    assert orphan is not None
    unknown = [o for o in await store.pending_owners() if o.id == "never-registered"]
    assert unknown == [Owner("never-registered", "", 0, "", 0)]


async def test_totals_and_eviction_of_least_recently_hit(store: Store) -> None:
    now = time.time()
    for i in range(5):
        await store.save_result(result(f"k{i}", created=now + i), max_bytes=10**9)
    entries, size = await store.totals()
    assert entries == 5 and size == sum(result(f"k{i}").size for i in range(5))
    await store.record_hits([Hit("k0", "t", "p", now + 100)])
    one = result("k5", created=now + 5).size
    await store.save_result(result("k5", created=now + 5), max_bytes=one * 3)
    remaining = {k for k in (f"k{i}" for i in range(6)) if (await store.lookup(k, "t", "p"))[0]}
    assert remaining == {"k0", "k4", "k5"}  # k0 was hit recently; k1..k3 were oldest
    assert await store.totals() == (3, 3 * one)


async def test_replacing_an_entry_keeps_totals_exact(store: Store) -> None:
    await store.save_result(result("k", data=b'{"a":1,"quota":'), max_bytes=10**9)
    await store.save_result(result("k", data=b'{"a":12345,"quota":'), max_bytes=10**9)
    entries, size = await store.totals()
    assert entries == 1 and size == result("k", data=b'{"a":12345,"quota":').size


async def test_results_for_hash_respects_scope(store: Store) -> None:
    await store.save_result(result("a", type_="objects"), max_bytes=10**9)
    await store.save_result(result("b", type_="nsfw"), max_bytes=10**9)
    await store.save_result(result("c", scope="ads"), max_bytes=10**9)
    await store.save_result(result("d", content_hash="x" * 32), max_bytes=10**9)
    shared = await store.results_for_hash("h" * 32, "")
    assert [r.key for r in shared] == ["b", "a"]  # ordered by type
    assert [r.key for r in await store.results_for_hash("h" * 32, "ads")] == ["c"]


async def test_hits_and_usage(store: Store) -> None:
    await store.save_result(result("k"), max_bytes=10**9)
    await store.reserve("search", "2026-11", 10, at=time.time())
    await store.record_hits([Hit("k", "search", "2026-11", time.time()),
                             Hit("k", "ads", "2026-11", time.time()),
                             Hit("k", "ads", "2026-11", time.time(), coalesced=True),
                             Hit("k", "ads", "2026-11", time.time(), derived=True)])
    usage = {u.team: u for u in await store.usage("2026-11")}
    got = {t: (u.charged, u.hits, u.coalesced, u.derived) for t, u in usage.items()}
    assert got == {"search": (1, 1, 0, 0), "ads": (0, 2, 1, 1)}  # derived within hits
    assert (await store.stats()).hits == 3


async def test_purge(store: Store) -> None:
    now = time.time()
    await store.save_result(result("a", created=now - 100), max_bytes=10**9)
    await store.save_result(result("b", type_="nsfw", created=now), max_bytes=10**9)
    await store.save_result(result("c", content_hash="x" * 32, created=now), max_bytes=10**9)
    assert await store.purge(older_than=now - 50) == 1
    assert await store.purge(type_="nsfw") == 1
    assert await store.purge(content_hash="x" * 32) == 1
    assert await store.totals() == (0, 0)


async def test_meta(store: Store) -> None:
    assert await store.get_meta("upstream_quota") is None
    await store.set_meta("upstream_quota", "42")
    await store.set_meta("upstream_quota", "41")
    assert await store.get_meta("upstream_quota") == "41"


async def test_sqlite_files_are_private(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "data" / "gateway.db"))
    await store.open()
    await store.reserve("t", "p", 5, at=time.time())
    await store.close()
    for name in ("gateway.db", "gateway-cache.db"):
        assert (tmp_path / "data" / name).stat().st_mode & 0o777 == 0o600, name


async def test_results_of_type_are_one_images_results_of_one_type_and_scope(store: Store) -> None:
    h, other = "d" * 32, "e" * 32

    def r(key: str, **kw: object) -> CachedResult:
        kw.setdefault("content_hash", h)
        base = result(key, **kw)  # type: ignore[arg-type]
        return CachedResult(base.key, base.content_hash, base.type, key.split("?")[1],
                            base.scope, base.data_prefix, base.created_at)

    wanted = [r(f"{h}/objects?max_labels={m}&min_confidence=0") for m in (5, 10)]
    for entry in [*wanted, r(f"{h}/nsfw?nsfw_min_confidence=0", type_="nsfw"),
                  r(f"search|{h}/objects?max_labels=1&min_confidence=0", scope="search"),
                  r(f"{other}/objects?max_labels=5&min_confidence=0", content_hash=other)]:
        await store.save_result(entry, max_bytes=10**9)
    found = await store.results_of_type(h, "objects", "")
    assert sorted((f.key, f.params, f.data_prefix) for f in found) == sorted(
        (w.key, w.params, w.data_prefix) for w in wanted)
    assert [f.scope for f in await store.results_of_type(h, "objects", "search")] == ["search"]
    assert await store.results_of_type(other, "nsfw", "") == []
    await store.purge(content_hash=h)
    assert await store.results_of_type(h, "objects", "") == []


async def test_a_shared_rate_bucket_admits_exactly_its_burst_under_concurrency(
        store: Store) -> None:
    """Redis holds one bucket per team for every replica: 30 concurrent takes from a full
    bucket of 5 (refilling 0.01/s) get exactly 5 tokens; SQLite keeps none (None: the
    gateway's processes keep them)."""
    taken = await asyncio.gather(*(store.take_token("t", 0.01, 5.0) for _ in range(30)))
    if isinstance(store, SQLiteStore):
        assert set(taken) == {None}
        return
    # What a few milliseconds refill at 0.01/s is far below a token.
    # (Concurrent takes may reach the server in any order: the tokens left form a set.)
    left = sorted(int(t[1]) for t in taken if t is not None and t[0])
    assert left == [0, 1, 2, 3, 4]
    refused = [t for t in taken if t is not None and not t[0]]
    assert len(refused) == 25 and all(0.0 <= tokens < 1.0 for _, tokens in refused)
    # Another team has its own bucket; a changed rate or burst (a reload) starts full again.
    assert await store.take_token("u", 0.01, 5.0) == (True, 4.0)
    assert await store.take_token("t", 0.01, 2.0) == (True, 1.0)
    assert (await store.take_token("t", 0.01, 2.0) or (False, 0))[0]


async def test_set_meta_if_absent_lets_exactly_one_caller_set_it(store: Store) -> None:
    """Notifications are sent once across replicas: of 20 concurrent callers one sets the
    name; the value is the first one's, and set_meta still overwrites it."""
    won = await asyncio.gather(*(store.set_meta_if_absent("notify:x", f"v{i}")
                                 for i in range(20)))
    assert won.count(True) == 1
    assert await store.get_meta("notify:x") == f"v{won.index(True)}"
    assert await store.set_meta_if_absent("notify:x", "again") is False
    await store.set_meta("notify:x", "over")
    assert await store.get_meta("notify:x") == "over"
    assert await store.set_meta_if_absent("notify:y", "") is True


async def test_one_caller_holds_a_keys_flight_lock_until_it_releases_or_it_expires(
        store: Store) -> None:
    """Coalescing across replicas: of 20 concurrent claims on a key one holds the lock (a
    claim resent by its holder still holds); only the holder renews or releases it; a lock
    nobody renews expires. SQLite keeps no such locks (None: each process coalesces its own)."""
    claims = await asyncio.gather(*(store.claim_flight("k", f"t{i}", 60_000) for i in range(20)))
    if isinstance(store, SQLiteStore):
        assert set(claims) == {None}
        assert await store.flight("k") == (None, False)
        return
    assert claims.count(True) == 1 and claims.count(False) == 19
    holder = f"t{claims.index(True)}"
    assert await store.claim_flight("k", holder, 60_000) is True  # a retry of its own claim
    assert await store.flight("k") == (None, True)
    other = "t0" if holder != "t0" else "t1"
    assert await store.renew_flight("k", other, 60_000) is False
    await store.release_flight("k", other)  # not its lock: nothing happens
    assert (await store.flight("k"))[1] is True
    assert await store.renew_flight("k", holder, 60_000) is True
    await store.save_result(result("k"), max_bytes=10**9)
    await store.release_flight("k", holder)
    found, held = await store.flight("k")
    assert found is not None and found.key == "k" and held is False
    assert await store.claim_flight("k", other, 60_000) is True
    # A lock its holder no longer renews (a dead replica's) expires by itself.
    assert await store.claim_flight("short", "dead", 50) is True
    assert await store.claim_flight("short", "next", 60_000) is False
    for _ in range(200):
        if not (await store.flight("short"))[1]:
            break
        await asyncio.sleep(0.01)
    assert await store.claim_flight("short", "next", 60_000) is True


async def test_store_issued_keys_round_trip_and_every_change_moves_the_generation(
        store: Store) -> None:
    """Team keys (gateway.core.keys): a definition replaced keeps its uses; uses add up and the
    last use only moves forward; an unknown id's uses are dropped; every save changes
    keys_generation, which is how other processes learn to re-read."""
    from gateway.store.base import KeyRecord

    assert await store.list_keys() == []
    assert await store.get_meta("keys_generation") is None
    old = KeyRecord("key_a", "search", "sha256:" + "a" * 64, "ci", 1000.0, expires_at=5000.0)
    new = KeyRecord("key_b", "ads", "sha256:" + "b" * 64, "", 2000.0)
    await store.save_key(new)
    first = await store.get_meta("keys_generation")
    await store.save_key(old)
    second = await store.get_meta("keys_generation")
    assert None not in (first, second) and first != second
    assert await store.list_keys() == [old, new]  # oldest first
    await store.record_key_uses({"key_a": (3, 1500.0), "key_b": (1, 2100.0), "gone": (9, 1.0)})
    await store.record_key_uses({"key_a": (2, 1200.0)})  # a late batch: the last use stays
    used = {k.id: (k.uses, k.last_used_at) for k in await store.list_keys()}
    assert used == {"key_a": (5, 1500.0), "key_b": (1, 2100.0)}
    revoked = KeyRecord("key_a", "search", old.key_hash, "ci", 1000.0, 1800.0, revoked_at=1700.0)
    await store.save_key(revoked)
    assert await store.get_meta("keys_generation") not in (first, second)
    (a, _) = await store.list_keys()
    assert (a.revoked_at, a.expires_at, a.uses, a.last_used_at) == (1700.0, 1800.0, 5, 1500.0)
    await store.record_key_uses({})


async def test_a_team_with_a_zero_quota_is_never_admitted(store: Store) -> None:
    """quota = 0 switches a team off: its first call is refused and charges nothing (the
    ledger's 'used < limit' only guards a row that already exists)."""
    now = time.time()
    assert await store.reserve("off", "p", 0, at=now) is None
    assert await store.used("off", "p") == 0
    assert await store.reserve("off", "p", -1, at=now) is None
    assert await store.used("off", "p") == 0
    assert await store.reserve("off", "p", 1, at=now) is not None  # the row starts at 1


async def test_results_saved_without_a_reservation_charge_nothing(store: Store) -> None:
    """Only a reservation charges: saving results alone (a refresh, a purge's refill) leaves
    every team's count and the ledger's total (the drift metric's side) where they were."""
    for n in range(3):
        await store.save_result(result(f"free{n}"), max_bytes=10**9)
    assert await store.charged_total() == 0
    r = await store.reserve("t", "p", 5, at=time.time())
    assert r is not None
    await store.save_result(result("paid"), max_bytes=10**9, settle=r)
    assert await store.charged_total() == 1 and await store.used("t", "p") == 1


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisStore]:
    s = RedisStore(REDIS_URL, prefix=f"test:{uuid.uuid4().hex}:")
    await s.open()
    yield s
    r = s._r
    async for k in r.scan_iter(match=s.prefix + "*"):
        await r.delete(k)
    await s.close()


@pytest.mark.parametrize("end", ["settle", "save_result", "keep_undelivered"])
async def test_a_charge_redis_lost_is_made_again_when_its_call_ends_paid(
        redis_store: RedisStore, end: str) -> None:
    """A failover (or a restart without persistence) can lose a reservation the gateway
    holds: when its call then ends paid, the team is charged again from the ending's own
    team and period; a refund of a lost one gives nothing back."""
    period = "2026-12"
    held = [await redis_store.reserve("t", period, 5, at=time.time()) for _ in range(2)]
    assert None not in held
    await redis_store._r.delete(redis_store._k("resv"), redis_store._k("used:", period))
    assert await redis_store.used("t", period) == 0
    lost = held[0]
    assert lost is not None
    if end == "settle":
        await redis_store.settle(lost)
    elif end == "save_result":
        await redis_store.save_result(result("paid"), max_bytes=10**9, settle=lost)
    else:
        await redis_store.keep_undelivered(lost)
    assert await redis_store.used("t", period) == 1
    (usage,) = await redis_store.usage(period)
    assert (usage.team, usage.charged) == ("t", 1)
    assert usage.undelivered == (1 if end == "keep_undelivered" else 0)
    assert held[1] is not None and await redis_store.refund(held[1]) is False
    assert await redis_store.used("t", period) == 1


async def test_a_charge_no_replica_acknowledged_is_taken_back_and_the_call_refused(
        redis_store: RedisStore) -> None:
    """storage.redis_min_replicas_ack = 1 on a Redis without replicas (each WAIT times out):
    a charge only the primary holds could vanish in a failover, so it is refunded on the
    primary and the call refused, never made; an earlier charge stays. A sent mark no replica
    took is refused too (the call is then not sent)."""
    from gateway.store.base import StoreUnavailable
    from gateway.store.redis import WAIT_MS

    acked = RedisStore(REDIS_URL, prefix=redis_store.prefix, min_replicas_ack=1)
    await acked.open()
    try:
        earlier = await redis_store.reserve("t", "p", 5, at=time.time())
        assert earlier is not None
        with pytest.raises(StoreUnavailable) as caught:
            await acked.reserve("t", "p", 5, at=time.time(), owner="replica-less")
        assert str(caught.value) == (
            f"Redis replicas did not acknowledge the charge within {WAIT_MS} ms")
        assert await redis_store.used("t", "p") == 1
        assert [o.id for o in await redis_store.pending_owners()] == [""]  # earlier's only
        with pytest.raises(StoreUnavailable) as caught:
            await acked.mark_sent(earlier)
        assert str(caught.value) == (
            f"Redis replicas did not acknowledge the sent mark within {WAIT_MS} ms")
    finally:
        await acked.close()
