"""The recognition service: look up -> coalesce -> reserve quota -> forward -> store -> answer.

It never imports ``aiohttp.web``: the HTTP handler (``gateway.api``) parses and validates,
then hands a ``Call`` here and renders the ``Answer``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway import failpoints
from gateway.cache_key import cache_key, params_text
from gateway.config import Config, TeamConfig
from gateway.envelope import data_object, data_prefix, success_body, success_json
from gateway.errors import BadGateway, GatewayError, GatewayTimeout, Unavailable
from gateway.form import UploadedFile
from gateway.hot_cache import HotCache, UsageCache
from gateway.metrics import Metrics
from gateway.quota import QuotaLedger
from gateway.store.base import CachedResult, Hit, Reservation, Store, StoreUnavailable
from gateway.upstream import UpstreamClient, was_billed

log = logging.getLogger("gateway.service")

CACHE_NAME = "imagerecognize-gateway"
_UNREAD = "\0unread"  # the store's cache_generation before the first look at it
USAGE_MAX_AGE_S = 0.25  # how stale the quota shown on a free answer may be (other processes)


@dataclass(frozen=True, slots=True)
class Directives:
    """Request Cache-Control directives the gateway honours (RFC 9111)."""

    no_cache: bool = False
    no_store: bool = False
    only_if_cached: bool = False

    @classmethod
    def parse(cls, header: str | None) -> Directives:
        if not header:
            return _NO_DIRECTIVES
        names = {part.split("=", 1)[0].strip().lower() for part in header.split(",")}
        return cls(
            no_cache="no-cache" in names or "max-age=0" in header.replace(" ", ""),
            no_store="no-store" in names,
            only_if_cached="only-if-cached" in names,
        )


_NO_DIRECTIVES = Directives()


@dataclass(slots=True)
class Call:
    team: TeamConfig
    type: str
    params: dict[str, int]
    file: UploadedFile
    directives: Directives = _NO_DIRECTIVES


@dataclass(slots=True)
class Answer:
    body: bytes
    outcome: str  # hit | miss | coalesced | none (metric label)
    cache_status: str  # the Cache-Status header value
    content_hash: str
    upstream_ms: float | None = None
    warning: str | None = None  # RFC 7234 Warning, on a stale answer


class _Retry(Exception):
    """The leader could not go ahead (its team was over quota): followers try themselves."""


@dataclass(slots=True)
class _Flight:
    future: asyncio.Future[CachedResult] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class RecognitionService:
    def __init__(
        self,
        config: Config,
        store: Store,
        ledger: QuotaLedger,
        upstream: UpstreamClient,
        metrics: Metrics,
    ):
        self.config = config
        self.store = store
        self.ledger = ledger
        self.upstream = upstream
        self.metrics = metrics
        self._flights: dict[str, _Flight] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._hits: list[Hit] = []
        self.max_bytes = int(config.cache.max_mb * 1024 * 1024)
        self.hot = HotCache(int(config.cache.memory_mb * 1024 * 1024))
        self.usage = UsageCache(USAGE_MAX_AGE_S)
        self._generation = store.generation
        self._shared_generation: str | None = _UNREAD
        self._upstream_quota: int | None = None  # latest account quota, written by flush()
        self._account_quota: int | None = None  # latest account quota, for reconcile()
        # Ledger writes refused by the store after the upstream call ended: retried by flush().
        self._unended: list[tuple[str, Reservation]] = []

    # -- the request path ------------------------------------------------------------------
    async def recognize(self, call: Call) -> Answer:
        scope = "" if self.config.cache.share_across_teams else call.team.name
        key = cache_key(call.file.content_hash, call.type, call.params, scope)
        d = call.directives
        if d.only_if_cached and (d.no_cache or d.no_store):
            # Neither may be answered from the store, and only-if-cached forbids forwarding.
            raise GatewayTimeout("Not in the gateway's cache (only-if-cached)")
        if d.no_store:
            self._refuse_if_breaker_open()
            return await self._forward(call, key, scope, store=False, cache_status="fwd=request")
        while True:
            period = self.ledger.period()
            entry: CachedResult | None = None
            if not d.no_cache:
                entry, used = await self._lookup(key, call.team.name, period)
                now = self.ledger.clock()
                if entry is not None:
                    age = now - entry.created_at
                    if age < self.config.cache.ttl_s:
                        self._note_hit(key, call, period, now, coalesced=False)
                        return self._hit(entry, call, used, age)
                if d.only_if_cached:
                    raise GatewayTimeout("Not in the gateway's cache (only-if-cached)")
            try:
                if not d.no_cache:
                    flight = self._flights.get(key)
                    if flight is not None:
                        try:
                            return await self._follow(flight, key, call, scope)
                        except _Retry:
                            continue
                self._refuse_if_breaker_open()
                fwd = "fwd=request" if d.no_cache else "fwd=stale" if entry else "fwd=miss"
                return await self._lead(call, key, scope, fwd)
            except (BadGateway, GatewayTimeout, Unavailable) as exc:
                stale = await self._stale(entry, key, call, period)
                if stale is None:
                    raise
                log.warning("upstream failed (%s); serving a stale result", exc.status)
                return stale

    async def _lookup(self, key: str, team: str, period: str) -> tuple[CachedResult | None, int]:
        """The entry and the team's charged count: from memory when both are there and
        fresh, else from the store in one round trip."""
        if self.store.generation != self._generation:
            self._drop_hot()
        entry = self.hot.get(key)
        if entry is not None:
            return entry, await self._used(team, period)
        entry, used = await self.store.lookup(key, team, period)
        self.usage.put(team, period, used, time.monotonic())
        if entry is not None:
            self.hot.put(entry)
        return entry, used

    async def _used(self, team: str, period: str) -> int:
        """The team's charged count for the ``quota`` of a free answer: at most
        ``USAGE_MAX_AGE_S`` old, so hits rarely wait for the store."""
        used = self.usage.get(team, period, time.monotonic())
        if used is None:
            used = await self.store.used(team, period)
            self.usage.put(team, period, used, time.monotonic())
        return used

    def _drop_hot(self) -> None:
        self.hot.clear()
        self._generation = self.store.generation

    def _refuse_if_breaker_open(self) -> None:
        """Refuse before charging anything while the upstream is known to be failing."""
        if self.upstream.breaker.is_open():
            self.upstream.breaker.before_call()

    async def _stale(
        self, entry: CachedResult | None, key: str, call: Call, period: str
    ) -> Answer | None:
        """stale-if-error: an expired entry, within its grace, beats an error."""
        if entry is None:
            return None
        now = self.ledger.clock()
        age = now - entry.created_at
        if age >= self.config.cache.keep_s:
            return None
        self._note_hit(key, call, period, now, coalesced=False)
        used = await self._used(call.team.name, period)
        return self._hit(entry, call, used, age, stale=True)

    def _hit(
        self, entry: CachedResult, call: Call, used: int, age: float, *, stale: bool = False
    ) -> Answer:
        """An answer from the store: free, ``ttl`` negative once past freshness (RFC 9211)."""
        ttl = int(self.config.cache.ttl_s - age)
        return Answer(
            success_body(entry.data_prefix, self.ledger.left(call.team, used)),
            "hit",
            f"{CACHE_NAME}; hit; ttl={ttl}" + ("; detail=stale-if-error" if stale else ""),
            call.file.content_hash,
            warning=f'110 {CACHE_NAME} "Response is Stale"' if stale else None,
        )

    async def _lead(self, call: Call, key: str, scope: str, fwd: str) -> Answer:
        flight = _Flight()
        self._flights[key] = flight  # a no-cache leader may take over a plain one's key
        try:
            reservation = await self._reserve(call.team)
        except BaseException:
            self._land(key, flight)
            flight.future.set_exception(_Retry())
            flight.future.exception()  # retrieved: followers may be none
            raise
        return await self._call_upstream(call, key, scope, reservation, flight, store=True, fwd=fwd)

    def _land(self, key: str, flight: _Flight) -> None:
        """Take ``flight`` off the in-flight table, unless another leader has taken its key."""
        if self._flights.get(key) is flight:
            del self._flights[key]

    async def _follow(self, flight: _Flight, key: str, call: Call, scope: str) -> Answer:
        try:
            result = await asyncio.wait_for(
                asyncio.shield(flight.future), self.config.cache.coalesce_wait_s
            )
        except TimeoutError:
            log.warning(
                "coalesced request waited %.0fs; forwarding on its own",
                self.config.cache.coalesce_wait_s,
            )
            return await self._forward(call, key, scope, store=True, cache_status="fwd=miss")
        period = self.ledger.period()
        self._note_hit(key, call, period, self.ledger.clock(), coalesced=True)
        used = await self._used(call.team.name, period)
        return Answer(
            success_body(result.data_prefix, self.ledger.left(call.team, used)),
            "coalesced",
            f"{CACHE_NAME}; hit; detail=coalesced",
            call.file.content_hash,
        )

    async def _forward(
        self, call: Call, key: str, scope: str, *, store: bool, cache_status: str
    ) -> Answer:
        reservation = await self._reserve(call.team)
        return await self._call_upstream(
            call, key, scope, reservation, None, store=store, fwd=cache_status
        )

    async def _call_upstream(
        self,
        call: Call,
        key: str,
        scope: str,
        reservation: Reservation,
        flight: _Flight | None,
        *,
        store: bool,
        fwd: str,
    ) -> Answer:
        # The upstream call runs as its own task: a client hanging up must not cancel it for
        # the followers, nor lose a result that was paid for.
        task = asyncio.create_task(self._fetch(call, key, scope, reservation, flight, store=store))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        result, upstream_s = await asyncio.shield(task)
        return Answer(
            success_body(result.data_prefix, self.ledger.left(call.team, reservation.used)),
            "miss" if store else "none",
            f"{CACHE_NAME}; {fwd}" + ("; stored" if store else ""),
            call.file.content_hash,
            upstream_s * 1000,
        )

    async def _fetch(
        self,
        call: Call,
        key: str,
        scope: str,
        reservation: Reservation,
        flight: _Flight | None,
        *,
        store: bool,
    ) -> tuple[CachedResult, float]:
        """One paid call, ledger first: the charge follows the bill.

        The reservation is marked sent (durably) just before the request leaves. A failure
        the upstream provably did not bill is refunded; any other keeps its charge as
        undelivered. Once the upstream answered, the result is delivered even when the store
        cannot take it, and the charge that could not be written is retried (``flush``)."""
        try:
            failpoints.hit("reserved")

            async def on_send() -> None:
                if not await self.store.mark_sent(reservation):
                    # Housekeeping elsewhere took this process for dead and ended it.
                    raise Unavailable("Gateway ledger record lost; try again")

            started = time.perf_counter()
            try:
                recognition = await self.upstream.recognize(
                    call.type, call.params, call.file, on_send=on_send
                )
                failpoints.hit("answered")
                upstream_s = time.perf_counter() - started
                result = CachedResult(
                    key=key,
                    content_hash=call.file.content_hash,
                    type=call.type,
                    params=params_text(call.params),
                    scope=scope,
                    data_prefix=data_prefix(recognition.data),
                    created_at=self.ledger.clock(),
                )
            except BaseException as exc:
                await self._end_unanswered(reservation, billed=was_billed(exc))
                if isinstance(exc, Exception) and not isinstance(
                    exc, GatewayError | StoreUnavailable
                ):
                    log.exception("upstream answer could not be used")
                    raise BadGateway() from None
                raise
            if recognition.account_quota is not None:
                self._upstream_quota = self._account_quota = recognition.account_quota
            try:
                if store:
                    # Stored and settled in one transaction, before anyone is answered.
                    await self.store.save_result(
                        result, max_bytes=self.max_bytes, settle=reservation
                    )
                    self.hot.put(result)
                else:
                    await self.store.settle(reservation)
            except StoreUnavailable as exc:
                # Paid for and delivered: the answer goes out, the charge is written later.
                log.error(
                    "could not store a paid result (%s); answering it uncached, its charge "
                    "is retried until the store takes it",
                    exc,
                )
                self._unended.append(("settle", reservation))
            failpoints.hit("saved")
        except BaseException as exc:
            if flight is not None:
                self._land(key, flight)
                flight.future.set_exception(exc)
                flight.future.exception()
            raise
        if flight is not None:
            self._land(key, flight)
            flight.future.set_result(result)
        return result, upstream_s

    async def _end_unanswered(self, reservation: Reservation, *, billed: bool) -> None:
        """A call with no usable answer: refund it only if the upstream provably did not
        bill it; otherwise keep the charge, counted as undelivered."""
        self.usage.clear()
        mode = "undelivered" if billed else "refund"
        try:
            if billed:
                await self.store.keep_undelivered(reservation)
            else:
                await self.ledger.refund(reservation)
        except StoreUnavailable as exc:
            log.error(
                "could not %s a failed upstream call for team %s (retried): %s",
                "record the charge of" if billed else "refund",
                reservation.team,
                exc,
            )
            self._unended.append((mode, reservation))

    async def _retry_unended(self) -> None:
        """Write the ledger changes the store refused when they happened."""
        todo, self._unended = self._unended, []
        for n, (mode, reservation) in enumerate(todo):
            try:
                if mode == "settle":
                    await self.store.settle(reservation)
                elif mode == "undelivered":
                    await self.store.keep_undelivered(reservation)
                else:
                    await self.ledger.refund(reservation)
            except StoreUnavailable:
                self._unended.extend(todo[n:])
                return
            log.info("ledger: wrote a delayed %s for team %s", mode, reservation.team)

    async def _reserve(self, team: TeamConfig) -> Reservation:
        reservation = await self.ledger.reserve(team)
        self.usage.put(team.name, reservation.period, reservation.used, time.monotonic())
        return reservation

    def _note_hit(self, key: str, call: Call, period: str, now: float, *, coalesced: bool) -> None:
        self._hits.append(Hit(key, call.team.name, period, now, coalesced))
        self.metrics.count_saved(call.team.name, call.type)

    # -- type=cache ------------------------------------------------------------------------
    async def cached_results(self, team: TeamConfig, content_hash: str) -> bytes:
        scope = "" if self.config.cache.share_across_teams else team.name
        now = self.ledger.clock()
        results = []
        for entry in await self.store.results_for_hash(content_hash, scope):
            if now - entry.created_at >= self.config.cache.ttl_s:
                continue
            params = dict(p.split("=", 1) for p in entry.params.split("&") if p)
            results.append(
                {
                    "type": entry.type,
                    "params": {k: int(v) for k, v in params.items()},
                    "data": data_object(entry.data_prefix),
                    "cached_at": datetime.fromtimestamp(entry.created_at, UTC)
                    .isoformat(timespec="seconds")
                    .replace("+00:00", "Z"),
                }
            )
        data: dict[str, Any] = {
            "error": 0 if results else "no cached results",
            "type": "cache",
            "hash": content_hash,
            "results": results,
            "quota": self.ledger.left(team, await self._used(team.name, self.ledger.period())),
        }
        return success_json(data)

    # -- background ------------------------------------------------------------------------
    async def flush(self) -> None:
        """Write batched hit counters (off the answer's path) and the account quota; drop
        the in-memory tier when another process purged the store."""
        try:
            shared = await self.store.get_meta("cache_generation")
        except StoreUnavailable:
            shared = self._shared_generation
        if shared != self._shared_generation:
            if self._shared_generation is not _UNREAD:
                self._drop_hot()
            self._shared_generation = shared
        if self._unended:
            await self._retry_unended()
        hits, self._hits = self._hits, []
        if hits:
            try:
                await self.store.record_hits(hits)
            except StoreUnavailable as exc:
                log.warning("could not record %d cache hits: %s", len(hits), exc)
                self._hits[:0] = hits[-10000:]
        if self._upstream_quota is not None:
            value, self._upstream_quota = self._upstream_quota, None
            try:
                await self.store.set_meta("upstream_quota", str(value))
            except StoreUnavailable:
                self._upstream_quota = value

    async def reconcile(self) -> None:
        """Set ``gateway_ledger_drift_calls``: the calls the upstream counted since a
        baseline (its ``data.quota`` then minus now) minus the calls the ledger charged
        since then. The baseline is taken at the first answer seen, and again whenever the
        account's quota rises by more than the calls that can be in flight (a reset or a
        top-up). Calls in flight make it briefly negative by their number; it stays
        positive when something else spends the account's key or the upstream billed calls
        the gateway refunded, and negative when the gateway kept charges the upstream did
        not bill."""
        remaining = self._account_quota
        if remaining is None:
            return
        slack = self.config.upstream.max_concurrency
        try:
            charged = await self.store.charged_total()
            parts = (await self.store.get_meta("drift_base") or "").split()
            if len(parts) != 3 or remaining > int(parts[2]) + slack:
                base_remaining, base_charged = remaining, charged
            else:
                base_remaining, base_charged = int(parts[0]), int(parts[1])
            if parts[:1] != [str(base_remaining)] or parts[2:] != [str(remaining)]:
                await self.store.set_meta(
                    "drift_base", f"{base_remaining} {base_charged} {remaining}"
                )
        except (StoreUnavailable, ValueError):
            return
        self.metrics.ledger_drift.set((base_remaining - remaining) - (charged - base_charged))

    async def drain(self) -> None:
        """Wait for upstream calls already running (they were paid for), then flush."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.flush()


__all__ = ["Answer", "Call", "Directives", "RecognitionService"]
