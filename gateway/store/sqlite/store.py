"""The SQLite store (the only code, with its schema and check modules, that opens SQLite).

Two files: the ledger (``storage.path``: quota usage, reservations, meta) and the cache
(``<path stem>-cache.db``: results), attached to one connection. Losing the cache costs
money, losing the ledger loses the record of spend: so a corrupt cache is moved aside and
started afresh (and a cache unreadable at run time degrades to misses), while a corrupt
ledger refuses to start (``gateway check-store`` says what to do).

WAL, ``busy_timeout``, ``BEGIN IMMEDIATE`` for multi-statement writes, named ordered
migrations per file tracked in ``PRAGMA user_version``. One connection writes, in its own
thread, a whole transaction per hop (``_Writer``); another (aiosqlite) reads, so lookups are
never queued behind writes. Cache totals (entries,
bytes) are kept by triggers in the same transaction as the change, exact across processes.

The files' schema and migrations are in ``gateway.store.sqlite.schema``, the check and repair in
``gateway.store.sqlite.check``.

Long because: one backend's implementation of every method of the Store protocol, read against
one contract suite (tests/store/test_store_contract.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sqlite3
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import aiosqlite

from gateway.store.base import (
    CachedResult,
    CacheStats,
    Hit,
    HitSummary,
    KeyRecord,
    Reclaimed,
    Reservation,
    StoreUnavailable,
    TeamUsage,
)
from gateway.store.owners import Owner
from gateway.store.sqlite.schema import (
    CACHE_MIGRATIONS,
    CACHE_PROBE,
    LEDGER_MIGRATIONS,
    LEDGER_PROBE,
    cache_path_for,
    is_corrupt,
    prepare_file,
    quarantine,
)

log = logging.getLogger("gateway.store")
T = TypeVar("T")

_ERRORS = (sqlite3.Error, OSError, ValueError)
CHECKPOINT_INTERVAL_S = 1.0


def _row_result(row: sqlite3.Row | tuple[object, ...]) -> CachedResult:
    key, content_hash, type_, params, scope, data, created_at = row[:7]
    return CachedResult(
        key=str(key),
        content_hash=str(content_hash),
        type=str(type_),
        params=str(params),
        scope=str(scope),
        data_prefix=bytes(data),  # type: ignore[arg-type]
        created_at=float(created_at),  # type: ignore[arg-type]
    )


_RESULT_COLUMNS = "key, content_hash, type, params, scope, data, created_at"
_LOOKUP = (
    f"SELECT {_RESULT_COLUMNS}, (SELECT used FROM quota_usage WHERE team = ? AND period = ?) "
    "FROM (SELECT 1) LEFT JOIN results ON results.key = ?"
)


class SQLiteStore:
    def __init__(
        self,
        path: str,
        *,
        cache_path: str | None = None,
        synchronous: str = "NORMAL",
        busy_timeout_ms: int = 5000,
        repair_cache: bool = True,
    ):
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self.generation = 0
        self.cache_path = cache_path or cache_path_for(path)
        self.synchronous = synchronous
        self.repair_cache = repair_cache
        self._writer: _Writer | None = None
        self._reader: aiosqlite.Connection | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        # Lookups (the cache-hit path) run on the event loop's thread: a WAL reader does not
        # wait for writers, and a primary-key read of cached pages costs ~15 us, against
        # ~80 us of CPU for aiosqlite's round trip to its thread. busy_timeout 0: a read that
        # would wait is not waited for here but sent to the reader thread, which may wait.
        self._inline: sqlite3.Connection | None = None
        # Writes too, when a commit does not fsync (synchronous NORMAL/OFF in WAL): a
        # ledger or cache transaction costs ~30 us of CPU, the round trip to the writer
        # thread ~100-150 us more. busy_timeout 0: if another connection (another worker
        # process, or our own writer thread) holds the write lock, the transaction goes to
        # the writer thread instead, which waits busy_timeout; the loop never waits on a lock.
        self._inline_writer: sqlite3.Connection | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def open(self) -> None:
        try:
            await asyncio.to_thread(
                prepare_file, self.path, LEDGER_MIGRATIONS, LEDGER_PROBE, verify=True
            )
        except _ERRORS as exc:
            raise StoreUnavailable(
                f"quota ledger {self.path} is unusable ({exc}); refusing to start without it: "
                "run `gateway check-store --config ...` (restore from backup if it cannot "
                "repair it)"
            ) from exc
        try:
            await asyncio.to_thread(prepare_file, self.cache_path, CACHE_MIGRATIONS, CACHE_PROBE)
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise StoreUnavailable(f"cannot open cache {self.cache_path}: {exc}") from exc
            if not self.repair_cache:
                raise StoreUnavailable(
                    f"result cache {self.cache_path} is corrupt ({exc}): run "
                    "`gateway check-store --repair` (or start the gateway: it moves it aside)"
                ) from exc
            aside = await asyncio.to_thread(quarantine, self.cache_path)
            log.error(
                "result cache %s is corrupt (%s): moved to %s, starting with an empty "
                "cache; quota data is unaffected",
                self.cache_path,
                exc,
                aside,
            )
            try:
                await asyncio.to_thread(
                    prepare_file, self.cache_path, CACHE_MIGRATIONS, CACHE_PROBE
                )
            except _ERRORS as again:
                raise StoreUnavailable(f"cannot create cache {self.cache_path}: {again}") from again
        except _ERRORS as exc:
            raise StoreUnavailable(f"cannot open cache {self.cache_path}: {exc}") from exc
        try:
            self._writer = _Writer(self._connect_sync)
            await self._writer.start()
            self._checkpointer = asyncio.create_task(self._checkpoints())
            self._reader = await self._connect()
            self._inline = await asyncio.to_thread(self._connect_inline)
            if self.synchronous.upper() in ("NORMAL", "OFF"):
                self._inline_writer = await asyncio.to_thread(self._connect_inline_writer)
        except _ERRORS as exc:
            await self.close()
            raise StoreUnavailable(f"cannot open SQLite store {self.path}: {exc}") from exc

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        await conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        await conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        await conn.execute("ATTACH DATABASE ? AS cache", (self.cache_path,))
        await conn.execute(f"PRAGMA cache.synchronous = {self.synchronous}")
        return conn

    def _connect_sync(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute("ATTACH DATABASE ? AS cache", (self.cache_path,))
        conn.execute(f"PRAGMA cache.synchronous = {self.synchronous}")
        # No checkpoint inside a commit (it would make that request wait for the copy and
        # its fsyncs): _checkpoints() does them in the background instead.
        conn.execute("PRAGMA main.wal_autocheckpoint = 0")
        conn.execute("PRAGMA cache.wal_autocheckpoint = 0")
        return conn

    async def _checkpoints(self) -> None:
        """PASSIVE checkpoints of both files every CHECKPOINT_INTERVAL_S, on a connection of
        their own in a thread of their own: writers are not blocked, requests do not wait.

        The connection is opened, used and closed only in that one thread, in order: a
        cancelled await does not stop a checkpoint already running there, and closing the
        connection from another thread while it runs crashes the process (SIGSEGV, seen in
        CI when close() cancelled this task mid-checkpoint)."""
        conn: sqlite3.Connection | None = None
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sqlite-checkpoint")
        loop = asyncio.get_running_loop()

        def checkpoint() -> None:
            nonlocal conn
            if conn is None:
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA busy_timeout = 0")
                conn.execute("ATTACH DATABASE ? AS cache", (self.cache_path,))
            conn.execute("PRAGMA main.wal_checkpoint(PASSIVE)").fetchall()
            conn.execute("PRAGMA cache.wal_checkpoint(PASSIVE)").fetchall()

        def shut() -> None:
            nonlocal conn
            if conn is not None:
                conn.close()
                conn = None

        try:
            while True:
                await asyncio.sleep(CHECKPOINT_INTERVAL_S)
                try:
                    await loop.run_in_executor(pool, checkpoint)
                except _ERRORS as exc:  # busy, or the disk: the next round tries again
                    log.debug("WAL checkpoint skipped: %s", exc)
        finally:
            # Queued behind any checkpoint still running in that thread (one worker, FIFO).
            with contextlib.suppress(*_ERRORS):
                await asyncio.shield(loop.run_in_executor(pool, shut))
            pool.shutdown(wait=False)

    def _connect_inline_writer(self) -> sqlite3.Connection:
        conn = self._connect_sync()
        conn.execute("PRAGMA busy_timeout = 0")
        return conn

    def _connect_inline(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 0")
        conn.execute("PRAGMA query_only = 1")
        conn.execute("ATTACH DATABASE ? AS cache", (self.cache_path,))
        return conn

    async def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
            self._checkpointer = None
        for conn in (self._inline, self._inline_writer):
            if conn is not None:
                conn.close()
        self._inline = self._inline_writer = None
        if self._reader is not None:
            with contextlib.suppress(*_ERRORS):
                await self._reader.close()
        if self._writer is not None:
            await self._writer.close()
        self._reader = self._writer = None

    @property
    def _r(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StoreUnavailable("store is closed")
        return self._reader

    @property
    def _w(self) -> _Writer:
        if self._writer is None:
            raise StoreUnavailable("store is closed")
        return self._writer

    async def _read(self, sql: str, args: Iterable[object] = ()) -> list[sqlite3.Row]:
        try:
            return list(await self._r.execute_fetchall(sql, tuple(args)))
        except _ERRORS as exc:
            raise StoreUnavailable(f"SQLite read failed: {exc}") from exc

    async def _write(self, sql: str, args: Iterable[object] = ()) -> int:
        params = tuple(args)
        return await self._transaction(lambda c: c.execute(sql, params).rowcount)

    async def ping(self) -> None:
        await self._read("SELECT 1")

    # -- results ---------------------------------------------------------------------------
    async def lookup(self, key: str, team: str, period: str) -> tuple[CachedResult | None, int]:
        rows: Iterable[sqlite3.Row] | None = None
        try:
            if self._inline is not None:
                try:
                    rows = self._inline.execute(_LOOKUP, (team, period, key)).fetchall()
                except sqlite3.OperationalError:
                    rows = None  # busy or locked: the reader thread waits busy_timeout
            if rows is None:
                rows = await self._r.execute_fetchall(_LOOKUP, (team, period, key))
        except _ERRORS as exc:
            if not is_corrupt(exc):
                raise StoreUnavailable(f"SQLite read failed: {exc}") from exc
            # The cache is damaged: answer as a miss (paid, metered) rather than refuse.
            log.error(
                "result cache unreadable (%s): treating as a miss; run "
                "`gateway check-store --repair`",
                exc,
            )
            return None, await self.used(team, period)
        row = next(iter(rows))
        used = int(row[7] or 0)
        return (_row_result(row) if row[0] is not None else None), used

    async def _transaction(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` in one ``BEGIN IMMEDIATE`` transaction: on the loop's thread when the
        lock is free and commits do not fsync, else in the writer's thread (one hop to the
        thread and back, however many statements)."""
        try:
            if self._inline_writer is not None:
                try:
                    return _transact(self._inline_writer, body, inline=True)
                except _Busy:
                    pass  # the writer thread waits for the lock (busy_timeout)
            return await self._w.run(body)
        except _ERRORS as exc:
            raise StoreUnavailable(f"SQLite write failed: {exc}") from exc

    async def save_result(
        self, result: CachedResult, *, max_bytes: int, settle: Reservation | None = None
    ) -> None:
        def body(w: sqlite3.Connection) -> None:
            if settle is not None:
                w.execute("DELETE FROM reservations WHERE id = ?", (settle.id,))
            w.execute(
                "INSERT INTO results (key, content_hash, type, params, scope, data, size, "
                "created_at, last_hit_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET data = excluded.data, size = excluded.size, "
                "created_at = excluded.created_at, last_hit_at = excluded.last_hit_at",
                (
                    result.key,
                    result.content_hash,
                    result.type,
                    result.params,
                    result.scope,
                    result.data_prefix,
                    result.size,
                    result.created_at,
                    result.created_at,
                ),
            )
            (total,) = next(iter(_fetchall(w, "SELECT bytes FROM cache_totals")))
            if total > max_bytes:
                self._evict(w, int(total) - max_bytes, keep=result.key)

        await self._transaction(body)

    @staticmethod
    def _evict(w: sqlite3.Connection, excess: int, *, keep: str) -> None:
        """Delete least recently hit entries until ``excess`` bytes are freed."""
        rows = _fetchall(
            w,
            "SELECT key, size FROM results WHERE key != ? ORDER BY last_hit_at LIMIT 1000",
            (keep,),
        )
        doomed: list[str] = []
        for key, size in rows:
            if excess <= 0:
                break
            doomed.append(key)
            excess -= size
        w.executemany("DELETE FROM results WHERE key = ?", [(k,) for k in doomed])

    async def results_for_hash(self, content_hash: str, scope: str) -> list[CachedResult]:
        rows = await self._read(
            f"SELECT {_RESULT_COLUMNS} FROM results WHERE content_hash = ? AND scope = ? "
            "ORDER BY type, params",
            (content_hash, scope),
        )
        return [_row_result(r) for r in rows]

    async def record_hits(self, hits: list[Hit]) -> None:
        if not hits:
            return

        summary = HitSummary.of(hits)

        def body(w: sqlite3.Connection) -> None:
            w.executemany(
                "UPDATE results SET hit_count = hit_count + ?, "
                "last_hit_at = MAX(last_hit_at, ?) WHERE key = ?",
                [(n, at, key) for key, (n, at) in summary.per_key.items()],
            )
            w.executemany(
                "INSERT INTO quota_usage (team, period, hits, coalesced, derived) "
                "VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(team, period) DO UPDATE SET hits = hits + excluded.hits, "
                "coalesced = coalesced + excluded.coalesced, derived = derived + excluded.derived",
                [(t, p, n, c, d) for (t, p), (n, c, d) in summary.per_team.items()],
            )

        await self._transaction(body)

    async def stats(self) -> CacheStats:
        totals = await self._read("SELECT entries, bytes FROM cache_totals")
        extra = await self._read("SELECT MIN(created_at), COALESCE(SUM(hit_count), 0) FROM results")
        by_type = await self._read(
            "SELECT type, COUNT(*), COALESCE(SUM(size), 0) FROM results GROUP BY type ORDER BY type"
        )
        entries, size = totals[0]
        oldest, hits = extra[0]
        return CacheStats(
            entries=int(entries),
            size_bytes=int(size),
            oldest=float(oldest) if oldest is not None else None,
            by_type=tuple((str(t), int(n), int(b)) for t, n, b in by_type),
            hits=int(hits),
        )

    async def totals(self) -> tuple[int, int]:
        rows = await self._read("SELECT entries, bytes FROM cache_totals")
        return int(rows[0][0]), int(rows[0][1])

    async def purge(
        self,
        *,
        content_hash: str | None = None,
        type_: str | None = None,
        older_than: float | None = None,
    ) -> int:
        where: list[str] = ["1"]
        args: list[object] = []
        if content_hash is not None:
            where.append("content_hash = ?")
            args.append(content_hash)
        if type_ is not None:
            where.append("type = ?")
            args.append(type_)
        if older_than is not None:
            where.append("created_at < ?")
            args.append(older_than)
        removed = await self._write(f"DELETE FROM results WHERE {' AND '.join(where)}", args)
        if removed:
            self.generation += 1
            await self.set_meta("cache_generation", uuid.uuid4().hex)
        return removed

    # -- quota ledger ----------------------------------------------------------------------
    async def reserve(
        self, team: str, period: str, limit: int, *, at: float, owner: str = ""
    ) -> Reservation | None:
        if limit <= 0:
            return None

        def body(w: sqlite3.Connection) -> Reservation | None:
            # One statement decides admission: atomic under SQLite's write lock, across
            # connections and processes sharing the file.
            rows = _fetchall(
                w,
                "INSERT INTO quota_usage (team, period, used) VALUES (?, ?, 1) "
                "ON CONFLICT(team, period) DO UPDATE SET used = used + 1 WHERE used < ? "
                "RETURNING used",
                (team, period, limit),
            )
            if not rows:
                return None
            rid = uuid.uuid4().hex
            w.execute(
                "INSERT INTO reservations (id, team, period, created_at, owner, sent) "
                "VALUES (?, ?, ?, ?, ?, 0)",
                (rid, team, period, at, owner),
            )
            return Reservation(rid, team, period, int(rows[0][0]), at, owner)

        return await self._transaction(body)

    async def mark_sent(self, reservation: Reservation) -> bool:
        changed = await self._write(
            "UPDATE reservations SET sent = 1 WHERE id = ?", (reservation.id,)
        )
        return changed > 0

    async def settle(self, reservation: Reservation) -> None:
        await self._write("DELETE FROM reservations WHERE id = ?", (reservation.id,))

    async def keep_undelivered(self, reservation: Reservation) -> None:
        def body(w: sqlite3.Connection) -> None:
            cursor = w.execute("DELETE FROM reservations WHERE id = ?", (reservation.id,))
            if cursor.rowcount:
                w.execute(
                    "UPDATE quota_usage SET undelivered = undelivered + 1 "
                    "WHERE team = ? AND period = ?",
                    (reservation.team, reservation.period),
                )

        await self._transaction(body)

    async def refund(self, reservation: Reservation) -> bool:
        def body(w: sqlite3.Connection) -> bool:
            cursor = w.execute("DELETE FROM reservations WHERE id = ?", (reservation.id,))
            if not cursor.rowcount:
                return False  # ended already: nothing to give back
            w.execute(
                "UPDATE quota_usage SET used = used - 1 WHERE team = ? AND period = ? AND used > 0",
                (reservation.team, reservation.period),
            )
            return True

        return await self._transaction(body)

    async def register_owner(self, owner: Owner) -> None:
        await self._write(
            "INSERT INTO owners (id, host, pid, started, beat) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO NOTHING",
            (owner.id, owner.host, owner.pid, owner.started, owner.beat),
        )

    async def beat(self, owner: Owner) -> None:
        def body(w: sqlite3.Connection) -> None:
            cursor = w.execute("UPDATE owners SET beat = beat + 1 WHERE id = ?", (owner.id,))
            if not cursor.rowcount:
                w.execute(
                    "INSERT INTO owners (id, host, pid, started, beat) VALUES (?, ?, ?, ?, 1)",
                    (owner.id, owner.host, owner.pid, owner.started),
                )

        await self._transaction(body)

    async def pending_owners(self) -> list[Owner]:
        rows = await self._read(
            "SELECT r.owner, o.host, o.pid, o.started, o.beat FROM "
            "(SELECT DISTINCT owner FROM reservations) r LEFT JOIN owners o ON o.id = r.owner"
        )
        return [
            Owner(str(i), str(h or ""), int(p or 0), str(s or ""), int(b or 0))
            for i, h, p, s, b in rows
        ]

    async def reclaim_owner(self, owner_id: str) -> Reclaimed:
        def body(w: sqlite3.Connection) -> Reclaimed:
            rows = _fetchall(
                w,
                "DELETE FROM reservations WHERE owner = ? RETURNING team, period, sent",
                (owner_id,),
            )
            refunded = undelivered = 0
            for team, period, sent in rows:
                if sent:
                    undelivered += 1
                    w.execute(
                        "UPDATE quota_usage SET undelivered = undelivered + 1 "
                        "WHERE team = ? AND period = ?",
                        (team, period),
                    )
                else:
                    refunded += 1
                    w.execute(
                        "UPDATE quota_usage SET used = used - 1 "
                        "WHERE team = ? AND period = ? AND used > 0",
                        (team, period),
                    )
            w.execute("DELETE FROM owners WHERE id = ?", (owner_id,))
            return Reclaimed(refunded, undelivered)

        return await self._transaction(body)

    async def used(self, team: str, period: str) -> int:
        sql = "SELECT used FROM quota_usage WHERE team = ? AND period = ?"
        rows: list[sqlite3.Row] | None = None
        if self._inline is not None:
            try:
                rows = self._inline.execute(sql, (team, period)).fetchall()
            except sqlite3.OperationalError:
                rows = None  # busy or locked: the reader thread waits busy_timeout
            except _ERRORS as exc:
                raise StoreUnavailable(f"SQLite read failed: {exc}") from exc
        if rows is None:
            rows = await self._read(sql, (team, period))
        return int(rows[0][0]) if rows else 0

    async def charged_total(self) -> int:
        rows = await self._read("SELECT COALESCE(SUM(used), 0) FROM quota_usage")
        return int(rows[0][0])

    async def usage(self, period: str) -> list[TeamUsage]:
        rows = await self._read(
            "SELECT team, period, used, hits, coalesced, undelivered, derived FROM quota_usage "
            "WHERE period = ? ORDER BY team",
            (period,),
        )
        return [
            TeamUsage(
                team=str(t),
                period=str(p),
                charged=int(u),
                hits=int(h),
                coalesced=int(c),
                undelivered=int(n),
                derived=int(d),
            )
            for t, p, u, h, c, n, d in rows
        ]

    # -- meta ------------------------------------------------------------------------------
    async def get_meta(self, name: str) -> str | None:
        rows = await self._read("SELECT value FROM meta WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None

    async def set_meta(self, name: str, value: str) -> None:
        await self._write(
            "INSERT INTO meta (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    # -- derivation ------------------------------------------------------------------------
    async def results_of_type(
        self, content_hash: str, type_: str, scope: str
    ) -> list[CachedResult]:
        rows = await self._read(
            f"SELECT {_RESULT_COLUMNS} FROM results "
            "WHERE content_hash = ? AND scope = ? AND type = ? ORDER BY params",
            (content_hash, scope, type_),
        )
        return [_row_result(r) for r in rows]

    # -- rate limits -----------------------------------------------------------------------
    async def take_token(self, team: str, rate: float, burst: float) -> tuple[bool, float] | None:
        """None: SQLite keeps no rate buckets (a write per request, hits included, would cost
        more than the check); the workers of one supervisor share them in memory instead."""
        return None

    # -- notifications (gateway.http.notify) ------------------------------------------------
    async def set_meta_if_absent(self, name: str, value: str) -> bool:
        inserted = await self._write(
            "INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT(name) DO NOTHING",
            (name, value),
        )
        return inserted == 1

    # -- coalescing (gateway.core.service) -------------------------------------------------
    async def claim_flight(self, key: str, token: str, ttl_ms: int) -> bool | None:
        """None: no locks across processes; each process coalesces its own requests."""
        return None

    async def renew_flight(self, key: str, token: str, ttl_ms: int) -> bool:
        return False

    async def release_flight(self, key: str, token: str) -> None:
        return None

    async def flight(self, key: str) -> tuple[CachedResult | None, bool]:
        return None, False

    # -- team keys (gateway.core.keys) -----------------------------------------------------
    async def save_key(self, key: KeyRecord) -> None:
        def body(w: sqlite3.Connection) -> None:
            w.execute(
                "INSERT INTO team_keys (id, team, key_hash, label, created_at, expires_at, "
                "revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "team = excluded.team, key_hash = excluded.key_hash, label = excluded.label, "
                "created_at = excluded.created_at, expires_at = excluded.expires_at, "
                "revoked_at = excluded.revoked_at",
                (
                    key.id,
                    key.team,
                    key.key_hash,
                    key.label,
                    key.created_at,
                    key.expires_at,
                    key.revoked_at,
                ),
            )
            w.execute(
                "INSERT INTO meta (name, value) VALUES ('keys_generation', ?) "
                "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                (uuid.uuid4().hex,),
            )

        await self._transaction(body)

    async def list_keys(self) -> list[KeyRecord]:
        rows = await self._read(
            "SELECT id, team, key_hash, label, created_at, expires_at, revoked_at, "
            "last_used_at, uses FROM team_keys ORDER BY created_at, id"
        )
        return [
            KeyRecord(
                id=str(i),
                team=str(t),
                key_hash=str(h),
                label=str(label),
                created_at=float(c),
                expires_at=None if e is None else float(e),
                revoked_at=None if r is None else float(r),
                last_used_at=None if u is None else float(u),
                uses=int(n),
            )
            for i, t, h, label, c, e, r, u, n in rows
        ]

    async def record_key_uses(self, uses: dict[str, tuple[int, float]]) -> None:
        if not uses:
            return
        await self._transaction(
            lambda w: w.executemany(
                "UPDATE team_keys SET uses = uses + ?, "
                "last_used_at = MAX(COALESCE(last_used_at, 0), ?) WHERE id = ?",
                [(n, at, key_id) for key_id, (n, at) in uses.items()],
            )
        )

    # -- migrate-store (gateway.store.migrate) ---------------------------------------------
    async def owners(self) -> list[Owner]:
        rows = await self._read("SELECT id, host, pid, started, beat FROM owners ORDER BY id")
        return [Owner(str(i), str(h), int(p), str(s), int(b)) for i, h, p, s, b in rows]

    async def ledger_rows(self) -> list[TeamUsage]:
        rows = await self._read(
            "SELECT team, period, used, hits, coalesced, undelivered, derived FROM quota_usage "
            "ORDER BY period, team"
        )
        return [
            TeamUsage(str(t), str(p), int(u), int(h), int(c), int(n), int(d))
            for t, p, u, h, c, n, d in rows
        ]

    async def put_ledger_row(self, row: TeamUsage) -> None:
        await self._write(
            "INSERT INTO quota_usage (team, period, used, hits, coalesced, undelivered, derived) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(team, period) DO UPDATE SET "
            "used = excluded.used, hits = excluded.hits, coalesced = excluded.coalesced, "
            "undelivered = excluded.undelivered, derived = excluded.derived",
            (
                row.team,
                row.period,
                row.charged,
                row.hits,
                row.coalesced,
                row.undelivered,
                row.derived,
            ),
        )

    async def results_page(self, cursor: str, limit: int) -> tuple[list[CachedResult], str]:
        rows = await self._read(
            f"SELECT {_RESULT_COLUMNS} FROM results WHERE key > ? ORDER BY key LIMIT ?",
            (cursor, limit),
        )
        found = [_row_result(r) for r in rows]
        return found, (found[-1].key if len(found) == limit else "")

    async def meta_items(self) -> dict[str, str]:
        return {str(n): str(v) for n, v in await self._read("SELECT name, value FROM meta")}


def _fetchall(conn: sqlite3.Connection, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
    return conn.execute(sql, args).fetchall()


class _Writer:
    """The one writing connection, in its own thread: each call runs a whole transaction
    there (datasette's shape: one writer fed by a queue, readers separate)."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]):
        self._connect = connect
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._conn: sqlite3.Connection | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._conn = await loop.run_in_executor(self._pool, self._connect)

    async def run(self, body: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._transact, body)

    def _transact(self, body: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            raise sqlite3.ProgrammingError("store is closed")
        return _transact(self._conn, body)

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        with contextlib.suppress(*_ERRORS):
            await asyncio.get_running_loop().run_in_executor(self._pool, shut)
        self._pool.shutdown(wait=False)


class _Busy(Exception):
    """Another connection holds the write lock; nothing was done."""


def _transact(
    conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], T], *, inline: bool = False
) -> T:
    """``body`` in one ``BEGIN IMMEDIATE`` transaction. ``inline`` (busy_timeout 0): a lock
    held elsewhere raises _Busy before anything is written, for the caller to wait elsewhere;
    otherwise it is the OperationalError of a lock still held after busy_timeout."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        # The primary code: SQLITE_BUSY_RECOVERY, _SNAPSHOT, _TIMEOUT are busy too.
        busy = exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
        if inline and busy:
            raise _Busy() from exc
        raise
    try:
        result = body(conn)
        conn.execute("COMMIT")
        return result
    except BaseException:
        # SQLite rolls back by itself on some errors (SQLITE_FULL): keep the original
        # error, not "cannot rollback - no transaction is active".
        if conn.in_transaction:
            with contextlib.suppress(*_ERRORS):
                conn.execute("ROLLBACK")
        raise
