"""The Redis store, for several gateway replicas sharing one cache and one quota ledger.

Every multi-key change is one Lua script, so it is atomic on the server: a reservation can
never admit past a limit, and the totals move with the entries they count.

Keys (under ``prefix``):
  r:<key>          hash   one result (content_hash, type, params, scope, data, size, created_at)
  h:<hash>         set    result keys of one image, every scope
  t:<type>         set    result keys of one type
  lru              zset   result key -> last hit time (eviction order)
  created          zset   result key -> created_at
  totals           hash   entries, bytes
  used:<period>    hash   team -> charged;  hits:, coalesced:, undelivered:, derived:<period>
                   likewise (derived hits are counted in hits: too)
  resv             hash   pending reservations: id -> "team|period|owner|sent"
  resv_of:<owner>  set    ids of one owner's pending reservations
  done:<id>        string how a reservation ended (a week: makes retries idempotent)
  owners, beats    hash   owner id -> "host|pid|started", owner id -> beat counter
  meta             hash   name -> value
  fl:<key>         string the lock on a key in flight: its holder's token (expires unless renewed)
  apikeys          hash   store-issued team key id -> JSON definition (gateway.core.keys)
  apikey_uses      hash   key id -> requests it authorized; apikey_used_at: id -> last use

The Lua scripts are in ``gateway.store.redis.scripts``.

Long because: one backend's implementation of every method of the Store protocol, read against
one contract suite (tests/store/test_store_contract.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

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
from gateway.store.redis import scripts

log = logging.getLogger("gateway.store")

# The ledger's hashes per period, in TeamUsage's order after the team (charged first).
_LEDGER_KINDS = ("used:", "hits:", "coalesced:", "undelivered:", "derived:")
_FIELDS = ("content_hash", "type", "params", "scope", "data", "created_at")

POOL_WAIT_S = 5.0  # how long a command waits for a free connection before 503
WAIT_MS = 1000  # how long a ledger write waits for its replicas (min_replicas_ack)


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (it finds the primary, and follows a failover) that makes a command
    wait for a free connection as BlockingConnectionPool does, instead of failing."""


class _NotReplicated(Exception):
    def __init__(self, result: Any) -> None:
        self.result = result


def _unavailable(exc: BaseException) -> BaseException:
    """What a failed Redis command raises: StoreUnavailable, or the cancel it really was.

    redis-py can turn a cancel that lands mid-command into a ConnectionError; reported as a
    store failure it was swallowed, and a cancelled background loop (shutdown waits for it)
    ran on for ever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return asyncio.CancelledError()
    return StoreUnavailable(f"Redis unavailable: {type(exc).__name__}")


class RedisStore:
    """Connections come from a bounded pool that makes a command wait for a free one (not
    fail), are health-checked when idle, and a command that meets a dropped connection is
    sent once more on a new one: every script and ledger write here is idempotent (by
    reservation id for the ledger), so a retry cannot charge twice."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "gw:",
        max_connections: int = 1088,
        require_persistence: bool = False,
        sentinels: tuple[str, ...] = (),
        master_name: str = "mymaster",
        min_replicas_ack: int = 0,
    ):
        self.url = url
        self.prefix = prefix
        self.max_connections = max_connections
        self.require_persistence = require_persistence
        self.sentinels = sentinels
        self.master_name = master_name
        self.min_replicas_ack = min_replicas_ack
        self._sentinel: Sentinel | None = None
        self.generation = 0
        self._redis: aioredis.Redis | None = None

    @property
    def _r(self) -> aioredis.Redis:
        if self._redis is None:
            raise StoreUnavailable("store is closed")
        return self._redis

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    async def open(self) -> None:
        options: dict[str, Any] = {
            "max_connections": self.max_connections,
            "timeout": POOL_WAIT_S,
            "socket_timeout": 5,
            "socket_connect_timeout": 5,
            "health_check_interval": 15,
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 1),
            "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        }
        if self.sentinels:
            # The URL's database and password still apply; its host is the primary's,
            # which Sentinel names instead.
            parsed = aioredis.connection.parse_url(self.url)
            sentinel = self._sentinel = Sentinel(
                [(h, int(p)) for h, _, p in (a.rpartition(":") for a in self.sentinels)],
                sentinel_kwargs={"socket_timeout": 1, "socket_connect_timeout": 1},
            )
            extra: dict[str, Any] = {
                k: parsed[k] for k in ("db", "password", "username") if k in parsed
            }
            self._redis = sentinel.master_for(
                self.master_name,
                connection_pool_class=_BlockingSentinelPool,
                **options,
                **extra,
            )
        else:
            pool = aioredis.BlockingConnectionPool.from_url(self.url, **options)
            self._redis = aioredis.Redis(connection_pool=pool)
        self._save = self._redis.register_script(scripts.SAVE)
        self._delete = self._redis.register_script(scripts.DELETE)
        self._reserve = self._redis.register_script(scripts.RESERVE)
        self._mark_sent = self._redis.register_script(scripts.MARK_SENT)
        self._end = self._redis.register_script(scripts.END)
        await self.ping()
        await self._check_persistence()

    async def _check_persistence(self) -> None:
        """A Redis that keeps nothing on disk loses every team's spend when it restarts."""
        try:
            config = await self._r.config_get("appendonly")
            config.update(await self._r.config_get("save"))
        except (RedisError, OSError):
            return  # CONFIG may be renamed or forbidden (managed Redis): nothing to tell
        aof = str(config.get("appendonly", "")).lower() == "yes"
        rdb = bool(str(config.get("save", "")).strip())
        if aof or rdb:
            return
        message = (
            f"Redis at {self._safe_url()} saves neither AOF nor RDB snapshots: a restart "
            "of it loses the quota ledger (every team's spend) and the cache"
        )
        if self.require_persistence:
            await self.close()
            raise StoreUnavailable(
                message + "; refusing to start (storage.require_persistence = true): set "
                "appendonly yes on the server"
            )
        log.warning("%s; set appendonly yes (or storage.require_persistence = true)", message)

    async def _ledger(self, script: Any, args: list[Any]) -> Any:
        """Run a ledger script; with ``min_replicas_ack``, on the same connection as a WAIT
        for that many replicas (``_NotReplicated`` when fewer took it in time)."""
        if not self.min_replicas_ack:
            return await self._call(script(args=args))
        pipe = self._r.pipeline(transaction=False)
        await script(args=args, client=pipe)  # queued in the pipeline, not sent yet
        pipe.execute_command("WAIT", self.min_replicas_ack, WAIT_MS)
        result, acked = await self._call(pipe.execute())
        if int(acked) < self.min_replicas_ack:
            raise _NotReplicated(result)
        return result

    async def _ledger_end(self, script: Any, args: list[Any]) -> Any:
        """A write that ends a reservation: kept by the primary if its replicas are slow (a
        failover may then undo it, which leaves the charge in place: never a refund)."""
        try:
            return await self._ledger(script, args)
        except _NotReplicated as exc:
            log.warning("Redis replicas did not acknowledge a ledger write within %d ms", WAIT_MS)
            return exc.result

    def _safe_url(self) -> str:
        """The URL without a password."""
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose(close_connection_pool=True)
            self._redis = None
        if self._sentinel is not None:
            for client in self._sentinel.sentinels:
                await client.aclose()
            self._sentinel = None

    async def ping(self) -> None:
        await self._call(self._r.ping())

    def _k(self, *parts: str) -> str:
        return self.prefix + "".join(parts)

    async def lookup(self, key: str, team: str, period: str) -> tuple[CachedResult | None, int]:
        pipe = self._r.pipeline(transaction=False)
        pipe.hmget(self._k("r:", key), _FIELDS)
        pipe.hget(self._k("used:", period), team)
        values, used = await self._call(pipe.execute())
        return self._result(key, values), int(used or 0)

    def _result(self, key: str, values: list[bytes | None]) -> CachedResult | None:
        if values[0] is None:
            return None
        content_hash, type_, params, scope, data, created_at = values
        assert (
            content_hash is not None
            and type_ is not None
            and params is not None
            and scope is not None
        )
        assert data is not None and created_at is not None
        return CachedResult(
            key=key,
            content_hash=content_hash.decode(),
            type=type_.decode(),
            params=params.decode(),
            scope=scope.decode(),
            data_prefix=data,
            created_at=float(created_at),
        )

    async def save_result(
        self, result: CachedResult, *, max_bytes: int, settle: Reservation | None = None
    ) -> None:
        await self._ledger_end(
            self._save,
            [
                self.prefix,
                result.key,
                result.content_hash,
                result.type,
                result.params,
                result.scope,
                result.data_prefix,
                result.size,
                repr(result.created_at),
                max_bytes,
                settle.id if settle is not None else "",
                settle.team if settle is not None else "",
                settle.period if settle is not None else "",
            ],
        )

    async def results_for_hash(self, content_hash: str, scope: str) -> list[CachedResult]:
        keys = sorted(
            k.decode() for k in await self._call(self._r.smembers(self._k("h:", content_hash)))
        )
        results = [await self._one(k) for k in keys]
        found = [r for r in results if r is not None and r.scope == scope]
        return sorted(found, key=lambda r: (r.type, r.params))

    async def _one(self, key: str) -> CachedResult | None:
        return self._result(key, await self._call(self._r.hmget(self._k("r:", key), _FIELDS)))

    async def reserve(
        self, team: str, period: str, limit: int, *, at: float, owner: str = ""
    ) -> Reservation | None:
        if limit <= 0:
            return None
        rid = uuid.uuid4().hex
        try:
            used = int(
                await self._ledger(self._reserve, [self.prefix, team, period, limit, rid, owner])
            )
        except _NotReplicated as exc:
            if int(exc.result) >= 0:  # charged on the primary alone: a failover could lose it
                await self._end_one("refund", Reservation(rid, team, period, 0, at, owner))
            raise StoreUnavailable(
                f"Redis replicas did not acknowledge the charge within {WAIT_MS} ms"
            ) from None
        return None if used < 0 else Reservation(rid, team, period, used, at, owner)

    async def mark_sent(self, reservation: Reservation) -> bool:
        try:
            marked = await self._ledger(self._mark_sent, [self.prefix, reservation.id])
        except _NotReplicated:
            raise StoreUnavailable(
                f"Redis replicas did not acknowledge the sent mark within {WAIT_MS} ms"
            ) from None
        return int(marked) > 0

    async def _end_one(self, mode: str, r: Reservation) -> list[int]:
        args = [self.prefix, mode, r.team, r.period, r.id]
        return [int(n) for n in await self._ledger_end(self._end, args)]

    async def settle(self, reservation: Reservation) -> None:
        await self._end_one("settle", reservation)

    async def keep_undelivered(self, reservation: Reservation) -> None:
        await self._end_one("undelivered", reservation)

    async def refund(self, reservation: Reservation) -> bool:
        return (await self._end_one("refund", reservation))[0] > 0

    async def register_owner(self, owner: Owner) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(self._k("owners"), owner.id, f"{owner.host}|{owner.pid}|{owner.started}")
        pipe.hsetnx(self._k("beats"), owner.id, owner.beat)
        await self._call(pipe.execute())

    async def beat(self, owner: Owner) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(self._k("owners"), owner.id, f"{owner.host}|{owner.pid}|{owner.started}")
        pipe.hincrby(self._k("beats"), owner.id, 1)
        await self._call(pipe.execute())

    async def pending_owners(self) -> list[Owner]:
        payloads = await self._call(self._r.hvals(self._k("resv")))
        ids = sorted({p.decode().split("|")[2] for p in payloads})
        if not ids:
            return []
        pipe = self._r.pipeline(transaction=False)
        pipe.hmget(self._k("owners"), ids)
        pipe.hmget(self._k("beats"), ids)
        infos, beats = await self._call(pipe.execute())
        owners = []
        for owner_id, info, beat in zip(ids, infos, beats, strict=True):
            host, pid, started = info.decode().split("|", 2) if info else ("", "0", "")
            owners.append(Owner(owner_id, host, int(pid or 0), started, int(beat or 0)))
        return owners

    async def reclaim_owner(self, owner_id: str) -> Reclaimed:
        ids = [
            i.decode() for i in await self._call(self._r.smembers(self._k("resv_of:", owner_id)))
        ]
        # Also ids whose owner set was lost: any pending payload naming this owner.
        for rid, payload in (await self._call(self._r.hgetall(self._k("resv")))).items():
            if payload.decode().split("|")[2] == owner_id and rid.decode() not in ids:
                ids.append(rid.decode())
        refunded = undelivered = 0
        for i in range(0, len(ids), 500):
            batch = ids[i : i + 500]
            r, u, _ = await self._call(self._end(args=[self.prefix, "reclaim", "", "", *batch]))
            refunded, undelivered = refunded + int(r), undelivered + int(u)
        pipe = self._r.pipeline(transaction=True)
        pipe.hdel(self._k("owners"), owner_id)
        pipe.hdel(self._k("beats"), owner_id)
        pipe.delete(self._k("resv_of:", owner_id))
        await self._call(pipe.execute())
        return Reclaimed(refunded, undelivered)

    async def used(self, team: str, period: str) -> int:
        return int(await self._call(self._r.hget(self._k("used:", period), team)) or 0)

    async def charged_total(self) -> int:
        total = 0
        try:
            async for name in self._r.scan_iter(match=self._k("used:*"), count=1000):
                total += sum(int(v) for v in await self._call(self._r.hvals(name)))
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return total

    async def record_hits(self, hits: list[Hit]) -> None:
        if not hits:
            return
        summary = HitSummary.of(hits)
        pipe = self._r.pipeline(transaction=False)
        for (team, period), (direct, coalesced, derived) in summary.per_team.items():
            if direct:
                pipe.hincrby(self._k("hits:", period), team, direct)
            if coalesced:
                pipe.hincrby(self._k("coalesced:", period), team, coalesced)
            if derived:
                pipe.hincrby(self._k("derived:", period), team, derived)
        for key, (n, at) in summary.per_key.items():
            pipe.zadd(self._k("lru"), {key: at}, xx=True, gt=True)
            pipe.hincrby(self._k("hitcount"), "all", n)
        await self._call(pipe.execute())

    async def usage(self, period: str) -> list[TeamUsage]:
        pipe = self._r.pipeline(transaction=False)
        for kind in _LEDGER_KINDS:
            pipe.hgetall(self._k(kind, period))
        used, hits, coalesced, undelivered, derived = await self._call(pipe.execute())
        teams = sorted({k.decode() for k in (*used, *hits, *coalesced)})
        return [
            TeamUsage(
                team=t,
                period=period,
                charged=int(used.get(t.encode(), 0)),
                hits=int(hits.get(t.encode(), 0)),
                coalesced=int(coalesced.get(t.encode(), 0)),
                undelivered=int(undelivered.get(t.encode(), 0)),
                derived=int(derived.get(t.encode(), 0)),
            )
            for t in teams
        ]

    async def totals(self) -> tuple[int, int]:
        entries, size = await self._call(self._r.hmget(self._k("totals"), ["entries", "bytes"]))
        return int(entries or 0), int(size or 0)

    async def stats(self) -> CacheStats:
        entries, size = await self.totals()
        oldest = await self._call(self._r.zrange(self._k("created"), 0, 0, withscores=True))
        hits = int(await self._call(self._r.hget(self._k("hitcount"), "all")) or 0)
        by_type = []
        try:
            names = [n async for n in self._r.scan_iter(match=self._k("t:*"), count=1000)]
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        for name in names:
            type_ = name.decode()[len(self._k("t:")) :]
            keys = [k.decode() for k in await self._call(self._r.smembers(name))]
            sizes = [
                int(s)
                for s in [await self._call(self._r.hget(self._k("r:", k), "size")) for k in keys]
                if s is not None
            ]
            if sizes:
                by_type.append((type_, len(sizes), sum(sizes)))
        return CacheStats(
            entries=entries,
            size_bytes=size,
            oldest=float(oldest[0][1]) if oldest else None,
            by_type=tuple(sorted(by_type)),
            hits=hits,
        )

    async def purge(
        self,
        *,
        content_hash: str | None = None,
        type_: str | None = None,
        older_than: float | None = None,
    ) -> int:
        r = self._r
        candidates: set[bytes] | None = None
        if content_hash is not None:
            candidates = set(await self._call(r.smembers(self._k("h:", content_hash))))
        if type_ is not None:
            of_type = set(await self._call(r.smembers(self._k("t:", type_))))
            candidates = of_type if candidates is None else candidates & of_type
        if older_than is not None:
            old = set(
                await self._call(r.zrangebyscore(self._k("created"), "-inf", f"({older_than!r}"))
            )
            candidates = old if candidates is None else candidates & old
        if candidates is None:
            candidates = set(await self._call(r.zrange(self._k("created"), 0, -1)))
        total = 0
        batch = sorted(candidates)
        for i in range(0, len(batch), 500):
            total += int(await self._call(self._delete(args=[self.prefix, *batch[i : i + 500]])))
        if total:
            self.generation += 1
            await self.set_meta("cache_generation", uuid.uuid4().hex)
        return total

    async def get_meta(self, name: str) -> str | None:
        value = await self._call(self._r.hget(self._k("meta"), name))
        return value.decode() if value is not None else None

    async def set_meta(self, name: str, value: str) -> None:
        await self._call(self._r.hset(self._k("meta"), name, value))

    # -- derivation ------------------------------------------------------------------------
    async def results_of_type(
        self, content_hash: str, type_: str, scope: str
    ) -> list[CachedResult]:
        script = getattr(self, "_results_of_type", None)
        if script is None or script.registered_client is not self._r:
            script = self._results_of_type = self._r.register_script(scripts.RESULTS_OF_TYPE)
        found = await self._call(script(args=[self.prefix, content_hash, type_, scope]))
        results = []
        for i in range(0, len(found), 1 + len(_FIELDS)):
            result = self._result(found[i].decode(), found[i + 1 : i + 1 + len(_FIELDS)])
            if result is not None:
                results.append(result)
        return sorted(results, key=lambda r: r.params)

    # -- rate limits (gateway.core.ratelimit) ----------------------------------------------
    async def take_token(self, team: str, rate: float, burst: float) -> tuple[bool, float] | None:
        """Not idempotent: a retry after a dropped connection may take a second token, which
        errs on the strict side and charges nothing."""
        script = getattr(self, "_take_token", None)
        if script is None or script.registered_client is not self._r:
            script = self._take_token = self._r.register_script(scripts.TAKE_TOKEN)
        taken, tokens = await self._call(
            script(keys=[self._k("rl:", team)], args=[repr(float(rate)), repr(float(burst))])
        )
        return bool(int(taken)), float(tokens)

    # -- notifications (gateway.http.notify) ------------------------------------------------
    async def set_meta_if_absent(self, name: str, value: str) -> bool:
        """A retry after a dropped connection may find its own write and answer False: the
        event is then not sent rather than sent twice."""
        return bool(await self._call(self._r.hsetnx(self._k("meta"), name, value)))

    # -- coalescing across replicas (gateway.core.service) ---------------------------------
    def _flight_script(self, name: str, source: str) -> Any:
        script = getattr(self, name, None)
        if script is None or script.registered_client is not self._r:
            script = self._r.register_script(source)
            setattr(self, name, script)
        return script

    async def claim_flight(self, key: str, token: str, ttl_ms: int) -> bool | None:
        script = self._flight_script("_claim_flight", scripts.CLAIM_FLIGHT)
        return bool(await self._call(script(keys=[self._k("fl:", key)], args=[token, ttl_ms])))

    async def renew_flight(self, key: str, token: str, ttl_ms: int) -> bool:
        script = self._flight_script("_renew_flight", scripts.RENEW_FLIGHT)
        return bool(await self._call(script(keys=[self._k("fl:", key)], args=[token, ttl_ms])))

    async def release_flight(self, key: str, token: str) -> None:
        script = self._flight_script("_release_flight", scripts.RELEASE_FLIGHT)
        await self._call(script(keys=[self._k("fl:", key)], args=[token]))

    async def flight(self, key: str) -> tuple[CachedResult | None, bool]:
        pipe = self._r.pipeline(transaction=False)
        pipe.hmget(self._k("r:", key), _FIELDS)
        pipe.exists(self._k("fl:", key))
        values, held = await self._call(pipe.execute())
        return self._result(key, values), bool(held)

    # -- migrate-store (gateway.store.migrate) ---------------------------------------------
    async def owners(self) -> list[Owner]:
        pipe = self._r.pipeline(transaction=True)
        pipe.hgetall(self._k("owners"))
        pipe.hgetall(self._k("beats"))
        infos, beats = await self._call(pipe.execute())
        owners = []
        for raw_id, info in sorted(infos.items()):
            host, pid, started = info.decode().split("|", 2)
            beat = int(beats.get(raw_id, 0))
            owners.append(Owner(raw_id.decode(), host, int(pid or 0), started, beat))
        return owners

    async def ledger_rows(self) -> list[TeamUsage]:
        periods: set[str] = set()
        try:
            for kind in _LEDGER_KINDS:
                async for name in self._r.scan_iter(match=self._k(kind, "*"), count=1000):
                    periods.add(name.decode()[len(self._k(kind)) :])
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        rows: list[TeamUsage] = []
        for period in sorted(periods):
            pipe = self._r.pipeline(transaction=True)
            for kind in _LEDGER_KINDS:
                pipe.hgetall(self._k(kind, period))
            used, hits, coalesced, undelivered, derived = await self._call(pipe.execute())
            for t in sorted({*used, *hits, *coalesced, *undelivered}):
                rows.append(
                    TeamUsage(
                        t.decode(),
                        period,
                        int(used.get(t, 0)),
                        int(hits.get(t, 0)),
                        int(coalesced.get(t, 0)),
                        int(undelivered.get(t, 0)),
                        int(derived.get(t, 0)),
                    )
                )
        return rows

    async def put_ledger_row(self, row: TeamUsage) -> None:
        pipe = self._r.pipeline(transaction=True)
        for kind, value in (
            ("used:", row.charged),
            ("hits:", row.hits),
            ("coalesced:", row.coalesced),
            ("undelivered:", row.undelivered),
            ("derived:", row.derived),
        ):
            pipe.hset(self._k(kind, row.period), row.team, value)
        if self.min_replicas_ack:
            pipe.execute_command("WAIT", self.min_replicas_ack, WAIT_MS)
        await self._call(pipe.execute())

    async def results_page(self, cursor: str, limit: int) -> tuple[list[CachedResult], str]:
        at = int(cursor or 0)
        at, names = await self._call(self._r.scan(at, match=self._k("r:", "*"), count=limit))
        keys = [n.decode()[len(self._k("r:")) :] for n in names]
        pipe = self._r.pipeline(transaction=False)
        for k in keys:
            pipe.hmget(self._k("r:", k), _FIELDS)
        values = await self._call(pipe.execute()) if keys else []
        found = [r for k, v in zip(keys, values, strict=True) if (r := self._result(k, v))]
        return found, (str(at) if int(at) else "")

    async def meta_items(self) -> dict[str, str]:
        items = await self._call(self._r.hgetall(self._k("meta")))
        return {n.decode(): v.decode() for n, v in items.items()}

    # -- team keys (gateway.core.keys) -----------------------------------------------------
    def _keys_script(self, name: str, source: str) -> Any:
        script = getattr(self, name, None)
        if script is None or script.registered_client is not self._r:
            script = self._r.register_script(source)
            setattr(self, name, script)
        return script

    async def save_key(self, key: KeyRecord) -> None:
        """One script (the key and the generation together), acknowledged by
        ``min_replicas_ack`` replicas like a ledger write: a revoke must survive a failover."""
        definition = json.dumps(
            {
                "team": key.team,
                "key_hash": key.key_hash,
                "label": key.label,
                "created_at": key.created_at,
                "expires_at": key.expires_at,
                "revoked_at": key.revoked_at,
            }
        )
        script = self._keys_script("_save_key", scripts.SAVE_KEY)
        await self._ledger_end(script, [self.prefix, key.id, definition, uuid.uuid4().hex])

    async def list_keys(self) -> list[KeyRecord]:
        pipe = self._r.pipeline(transaction=True)
        pipe.hgetall(self._k("apikeys"))
        pipe.hgetall(self._k("apikey_uses"))
        pipe.hgetall(self._k("apikey_used_at"))
        defined, uses, used_at = await self._call(pipe.execute())
        keys = []
        for raw_id, raw in defined.items():
            d = json.loads(raw)
            last = used_at.get(raw_id)
            keys.append(
                KeyRecord(
                    id=raw_id.decode(),
                    team=str(d["team"]),
                    key_hash=str(d["key_hash"]),
                    label=str(d["label"]),
                    created_at=float(d["created_at"]),
                    expires_at=None if d["expires_at"] is None else float(d["expires_at"]),
                    revoked_at=None if d["revoked_at"] is None else float(d["revoked_at"]),
                    last_used_at=None if last is None else float(last),
                    uses=int(uses.get(raw_id, 0)),
                )
            )
        return sorted(keys, key=lambda k: (k.created_at, k.id))

    async def record_key_uses(self, uses: dict[str, tuple[int, float]]) -> None:
        """Not idempotent: a retry after a dropped connection may count a batch twice (the
        count is a report, not a charge)."""
        if not uses:
            return
        args: list[Any] = [self.prefix]
        for key_id, (n, at) in uses.items():
            args += [key_id, n, repr(float(at))]
        await self._call(self._keys_script("_key_uses", scripts.KEY_USES)(args=args))
