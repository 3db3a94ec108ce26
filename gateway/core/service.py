"""The recognition service: look up -> coalesce -> reserve quota -> forward -> store -> answer.

It never imports ``aiohttp.web``: the HTTP handler (``gateway.http.api``) parses and validates,
then hands a ``Call`` here and renders the ``Answer``.

Long because: the request path's steps (look up, derive, coalesce, reserve, forward, store)
share one ledger and its invariants (quota atomicity, the sent mark); the table of flights and
the locks across processes are in ``gateway.core.coalesce``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from gateway.config import AUDIT_TEAM, Config, LiveConfig, TeamConfig, live
from gateway.core import derive, failpoints
from gateway.core.cache_key import cache_key, params_text
from gateway.core.coalesce import Flight, Flights
from gateway.core.envelope import data_object, data_prefix, success_body, success_json
from gateway.core.errors import BadGateway, GatewayError, GatewayTimeout, QuotaReached, Unavailable
from gateway.core.hot_cache import HotCache, UsageCache
from gateway.core.quota import QuotaLedger
from gateway.obs.metrics import Metrics
from gateway.store.base import CachedResult, Hit, Reservation, Store, StoreUnavailable
from gateway.upload import UploadedFile
from gateway.upstream import UpstreamClient, was_billed

T = TypeVar("T")
log = logging.getLogger("gateway.service")

_UNREAD = "\0unread"  # the store's cache_generation before the first look at it
USAGE_MAX_AGE_S = 0.25  # how stale the quota shown on a free answer may be (other processes)
# The ledger line of the gateway's own cache audits: its limit bounds the audits a period.
AUDIT_CALLS_PER_PERIOD = 10_000
AUDIT_LINE = TeamConfig(AUDIT_TEAM, frozenset(), AUDIT_CALLS_PER_PERIOD)
# A follower of another process's call polls the store, backing off up to this.


class NotCached(GatewayTimeout):
    """only-if-cached and nothing held: a 504 the upstream had no part in (counted apart)."""

    outcome = "only-if-cached"

    def __init__(self) -> None:
        super().__init__("Not in the gateway's cache (only-if-cached)")


@dataclass(frozen=True, slots=True)
class Directives:
    """What the request asks of the cache (the HTTP layer reads them from Cache-Control)."""

    no_cache: bool = False  # do not answer from the store: ask the upstream
    no_store: bool = False  # ask the upstream and keep nothing
    only_if_cached: bool = False  # answer from the store or not at all


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
    """What the service answered and how; the HTTP layer renders it (Cache-Status, Warning)."""

    body: bytes
    outcome: str  # hit | miss | coalesced | derived | none (metric label)
    content_hash: str
    upstream_ms: float | None = None
    fwd: str | None = None  # forwarded upstream, and why: miss | request | stale
    stored: bool = False  # forwarded and its result stored
    ttl: int | None = None  # a stored answer's freshness left, s (negative once stale)
    stale: bool = False  # a stale stored answer, served because the upstream failed


class _Retry(Exception):
    """The leader could not go ahead (its team was over quota): followers try themselves."""


class RecognitionService:
    def __init__(
        self,
        config: Config | LiveConfig,
        store: Store,
        ledger: QuotaLedger,
        upstream: UpstreamClient,
        metrics: Metrics,
    ):
        self.live = live(config)
        config = self.live.current
        self.store = store
        self.ledger = ledger
        self.upstream = upstream
        self.metrics = metrics
        self._tasks: set[asyncio.Task[Any]] = set()
        self._hits: list[Hit] = []
        self.hot = HotCache(int(config.cache.memory_mb * 1024 * 1024))
        self.usage = UsageCache(USAGE_MAX_AGE_S)
        self._generation = store.generation
        self._shared_generation: str | None = _UNREAD
        self._upstream_quota: int | None = None  # latest account quota, written by flush()
        self._account_quota: int | None = None  # latest account quota, for reconcile()
        # Ledger writes refused by the store after the upstream call ended: retried by flush().
        self._unended: list[tuple[str, Reservation]] = []
        self.flights = Flights(store, self.live, lambda: self.ledger.clock(), self._spawn)
        # Types the audit found the upstream not following the model for: type -> why.
        self.derive_off: dict[str, str] = {}
        self._derive_off_unwritten: set[str] = set()
        self.audit_random = random.Random()

    @property
    def config(self) -> Config:
        return self.live.current

    @property
    def max_bytes(self) -> int:
        return int(self.live.current.cache.max_mb * 1024 * 1024)

    # -- the request path ------------------------------------------------------------------
    async def recognize(self, call: Call) -> Answer:
        scope = "" if self.config.cache.share_across_teams else call.team.name
        key = cache_key(call.file.content_hash, call.type, call.params, scope)
        d = call.directives
        if d.no_cache and not call.team.allow_refresh:
            d = dataclasses.replace(d, no_cache=False)  # this team may not force a paid call
        if d.only_if_cached and (d.no_cache or d.no_store):
            # Neither may be answered from the store, and only-if-cached forbids forwarding.
            raise NotCached()
        if d.no_store:
            self._refuse_if_breaker_open()
            return await self._forward(call, key, scope, store=False, fwd="request")
        derivable = self.derivable(call.type)
        # A widened miss asks for every object at once, so later variants are derived hits.
        sent = self._widened(call) if derivable and not d.no_cache else None
        flight_key = (
            key
            if sent is None
            else cache_key(call.file.content_hash, call.type, sent.params, scope)
        )
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
                if derivable:
                    derived = await self._derived(call, key, scope, period, now, used)
                    if derived is not None:
                        return derived
                if d.only_if_cached:
                    raise NotCached()
            try:
                if not d.no_cache:
                    flight = self.flights.get(flight_key)
                    if flight is not None:
                        try:
                            return await self._follow(flight, key, call, scope)
                        except _Retry:
                            continue
                    # Its leader may have landed while this request read the store from
                    # before the leader's commit: the result is in memory, ride on it.
                    landed = self.hot.get(flight_key)
                    if landed is not None and (
                        self.ledger.clock() - landed.created_at < self.config.cache.ttl_s
                    ):
                        return await self._coalesced(landed, key, call, scope)
                self._refuse_if_breaker_open()
                fwd = "request" if d.no_cache else "stale" if entry else "miss"
                return await self._lead(call, flight_key, scope, fwd, sent)
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

    # -- derived hits ----------------------------------------------------------------------
    def derivable(self, type_: str) -> bool:
        """Whether misses of ``type_`` may be answered from looser stored results."""
        return (
            self.config.cache.derive and type_ in derive.DERIVABLE and type_ not in self.derive_off
        )

    def _widened(self, call: Call) -> Call | None:
        """The call a widened miss forwards instead of ``call`` (None: forward ``call``)."""
        if not self.config.cache.widen:
            return None
        params = derive.widened(call.type, call.params, self.config.cache.widen_max_labels)
        if params == call.params:
            return None
        return Call(call.team, call.type, params, call.file, call.directives)

    def _usable(
        self, entries: list[CachedResult], call: Call, now: float
    ) -> tuple[CachedResult, bytes] | None:
        """The loosest fresh entry that answers ``call`` under the model, and the answer."""
        fresh = [e for e in entries if now - e.created_at < self.config.cache.ttl_s]
        found = derive.best(call.type, ((e.params, e.data_prefix) for e in fresh), call.params)
        if found is None:
            return None
        n, stored = found
        return fresh[n], derive.derive(call.type, stored, call.params)

    async def _derived(
        self, call: Call, key: str, scope: str, period: str, now: float, used: int
    ) -> Answer | None:
        """A miss on the exact key answered from a looser result of the same image and type:
        the in-process tier first, then one indexed store lookup. Free, like a hit."""
        content_hash = call.file.content_hash
        found = self._usable(self.hot.variants(content_hash, call.type, scope), call, now)
        if found is None:
            entries = await self.store.results_of_type(content_hash, call.type, scope)
            found = self._usable(entries, call, now)
            if found is None:
                return None
            self.hot.put(found[0])
        source, prefix = found
        self._note_hit(source.key, call, period, now, coalesced=False, derived=True)
        rate = self.config.cache.audit_rate
        if rate > 0 and self.audit_random.random() < rate:
            self._start_audit(call, key, scope, prefix)
        return Answer(
            success_body(prefix, self.ledger.left(call.team, used)), "derived", content_hash
        )

    def _answer_from(self, result: CachedResult, call: Call) -> bytes | None:
        """``result``'s data prefix as the answer to ``call``: itself when its parameters
        are the call's, else derived (None when the model cannot answer from it)."""
        if result.params == params_text(call.params):
            return result.data_prefix
        found = self._usable([result], call, result.created_at)
        return found[1] if found is not None else None

    # -- the audit --------------------------------------------------------------------------
    def _start_audit(self, call: Call, key: str, scope: str, derived: bytes) -> None:
        """Ask the upstream the derived answer's exact question, in the background, charged
        to the gateway's own ``audit`` ledger line (never to the team)."""
        file = call.file
        if file.data is None:
            return  # a spooled upload is gone once the request ends: audit a smaller one
        copy = dataclasses.replace(file, data=bytes(file.data))
        audit = Call(AUDIT_LINE, call.type, call.params, copy)
        self._spawn(self._audit(audit, key, scope, derived))

    async def _audit(self, call: Call, key: str, scope: str, derived: bytes) -> None:
        if call.type in self.derive_off or self.upstream.breaker.is_open():
            return
        try:
            reservation = await self._reserve(call.team)
        except (QuotaReached, StoreUnavailable) as exc:
            log.warning("cache audit skipped: %s", getattr(exc, "message", exc))
            return
        try:
            result, _ = await self._fetch(call, key, scope, reservation, None, store=True)
        except Exception as exc:  # billed or refunded by _fetch; the caller was answered
            log.warning("cache audit: the upstream call failed (%s)", type(exc).__name__)
            return
        match = result.data_prefix == derived
        self.metrics.count_audit(call.type, match)
        if not match:
            await self._model_broken(call.type, result.params)

    async def _model_broken(self, type_: str, params: str) -> None:
        if type_ in self.derive_off:
            return
        when = datetime.fromtimestamp(self.ledger.clock(), UTC).isoformat(timespec="seconds")
        self.derive_off[type_] = f"audit mismatch at {params} ({when})"
        log.error(
            "cache audit: a derived %s answer (%s) differs from the upstream's own answer: "
            "the upstream does not follow the threshold/label model, so derived hits and "
            "widening are off for %s (see docs/observability.md, Derived hits)",
            type_,
            params,
            type_,
        )
        self._derive_off_unwritten.add(type_)
        await self._write_derive_off()

    async def _write_derive_off(self) -> None:
        """Tell the other processes (and ``gateway cache stats``) through the store."""
        for type_ in sorted(self._derive_off_unwritten):
            try:
                await self.store.set_meta(derive.DERIVE_OFF_META + type_, self.derive_off[type_])
            except StoreUnavailable:
                return
            self._derive_off_unwritten.discard(type_)

    async def _read_derive_off(self) -> None:
        for type_ in derive.DERIVABLE:
            if type_ in self._derive_off_unwritten:
                continue
            try:
                why = await self.store.get_meta(derive.DERIVE_OFF_META + type_)
            except StoreUnavailable:
                return
            if why:
                if type_ not in self.derive_off:
                    log.error("cache audit: derived hits and widening are off for %s", type_)
                self.derive_off[type_] = why
            else:
                self.derive_off.pop(type_, None)  # an operator cleared it

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
            call.file.content_hash,
            ttl=ttl,
            stale=stale,
        )

    async def _lead(
        self, call: Call, key: str, scope: str, fwd: str, sent: Call | None = None
    ) -> Answer:
        flight = self.flights.start(key)
        shared: CachedResult | None = None
        try:
            if fwd != "request" and not await self.flights.claim(key, flight):
                # Another process is calling for this key: wait for its result.
                shared = await self.flights.follow_shared(key, flight)
            if shared is None:
                reservation = await self._reserve(call.team)
        except BaseException:
            self.flights.land(key, flight)
            self.flights.release(key, flight)
            flight.future.set_exception(_Retry())
            flight.future.exception()  # retrieved: followers may be none
            raise
        if shared is not None:
            self.flights.land(key, flight)
            self.hot.put(shared)
            flight.future.set_result(shared)
            exact = cache_key(call.file.content_hash, call.type, call.params, scope)
            return await self._coalesced(shared, exact, call, scope)
        return await self._call_upstream(
            call, key, scope, reservation, flight, store=True, fwd=fwd, sent=sent
        )

    async def _follow(self, flight: Flight, key: str, call: Call, scope: str) -> Answer:
        try:
            result = await asyncio.wait_for(
                asyncio.shield(flight.future), self.config.cache.coalesce_wait_s
            )
        except TimeoutError:
            log.warning(
                "coalesced request waited %.0fs; forwarding on its own",
                self.config.cache.coalesce_wait_s,
            )
            return await self._forward(call, key, scope, store=True, fwd="miss")
        return await self._coalesced(result, key, call, scope)

    async def _coalesced(self, result: CachedResult, key: str, call: Call, scope: str) -> Answer:
        """The answer of a request that rode on another's upstream call: free."""
        prefix = self._answer_from(result, call)
        if prefix is None:  # the leader's (widened) answer does not follow the model
            return await self._forward(call, key, scope, store=True, fwd="miss")
        period = self.ledger.period()
        self._note_hit(result.key, call, period, self.ledger.clock(), coalesced=True)
        used = await self._used(call.team.name, period)
        return Answer(
            success_body(prefix, self.ledger.left(call.team, used)),
            "coalesced",
            call.file.content_hash,
        )

    async def _forward(self, call: Call, key: str, scope: str, *, store: bool, fwd: str) -> Answer:
        reservation = await self._reserve(call.team)
        return await self._call_upstream(call, key, scope, reservation, None, store=store, fwd=fwd)

    async def _call_upstream(
        self,
        call: Call,
        key: str,
        scope: str,
        reservation: Reservation,
        flight: Flight | None,
        *,
        store: bool,
        fwd: str,
        sent: Call | None = None,
    ) -> Answer:
        """``sent``: the call forwarded instead of ``call`` (widened); ``call``'s answer is
        derived from its result."""
        # The upstream call runs as its own task: a client hanging up must not cancel it for
        # the followers, nor lose a result that was paid for.
        task = self._spawn(self._fetch(sent or call, key, scope, reservation, flight, store=store))
        result, upstream_s = await asyncio.shield(task)
        prefix = self._answer_from(result, call) if sent is not None else result.data_prefix
        if prefix is None:
            # The widened answer is not the model's (not highest first): widening is off for
            # the type from now, and this caller's exact question is asked (and paid) again.
            await self._model_broken(call.type, result.params)
            exact = cache_key(call.file.content_hash, call.type, call.params, scope)
            return await self._forward(call, exact, scope, store=True, fwd=fwd)
        return Answer(
            success_body(prefix, self.ledger.left(call.team, reservation.used)),
            "miss" if store else "none",
            call.file.content_hash,
            upstream_s * 1000,
            fwd=fwd,
            stored=store,
        )

    async def _fetch(
        self,
        call: Call,
        key: str,
        scope: str,
        reservation: Reservation,
        flight: Flight | None,
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
                self.metrics.count_upstream_call(reservation.team, call.type)

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
                self.flights.land(key, flight)
                self.flights.release(key, flight)
                flight.future.set_exception(exc)
                flight.future.exception()
            raise
        if flight is not None:
            self.flights.land(key, flight)
            self.flights.release(key, flight)
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

    def _note_hit(
        self,
        key: str,
        call: Call,
        period: str,
        now: float,
        *,
        coalesced: bool,
        derived: bool = False,
    ) -> None:
        self._hits.append(Hit(key, call.team.name, period, now, coalesced, derived))
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
        if self._derive_off_unwritten:
            await self._write_derive_off()
        await self._read_derive_off()
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

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A task of ours that outlives its request: kept referenced until done, and
        awaited by ``drain`` at shutdown."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        """Wait for upstream calls already running (they were paid for), then flush."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.flush()


__all__ = ["Answer", "Call", "Directives", "RecognitionService"]
