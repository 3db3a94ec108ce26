"""Prometheus metrics (names and labels are a contract: docs/observability.md, "Metrics").

Created against an injected ``CollectorRegistry`` so each test gets a fresh one. Label values
stay bounded: teams come from config, types from the API's fixed list.
"""

from __future__ import annotations

import asyncio
import bisect
import os
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
)

from gateway.analysis import ANALYSIS_TYPES, DERIVABLE
from gateway.config import Config
from gateway.obs.logs import access_lines_dropped
from gateway.obs.scrape import TeamGauges


def bulk_histograms(child: Any) -> bool:
    """Whether a histogram child has the private ``_sum`` and ``_buckets`` counters that
    ``Metrics.fold`` adds to in bulk (prometheus-client 0.20 to today). Where not, each request
    is observed through the public ``observe()`` as it is counted: the same series, one lock
    per request instead of one per loop turn."""
    buckets = getattr(child, "_buckets", None)
    return (
        hasattr(getattr(child, "_sum", None), "inc")
        and isinstance(buckets, list)
        and all(hasattr(b, "inc") for b in buckets)
    )

CACHE_OUTCOMES = ("hit", "miss", "coalesced", "derived", "none")
DERIVED_TYPES = tuple(DERIVABLE)  # the types with a threshold (gateway.analysis)
ALL_TYPES = (*ANALYSIS_TYPES, "cache")
# `_created` series double the series count and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Requests answered by the gateway",
            ("team", "type", "status", "cache"),
            registry=r,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Time to answer a request",
            ("type", "cache"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Checked on a series preinitialize() creates anyway: no probe series in the registry.
        self.bulk = bulk_histograms(self.request_duration.labels(ALL_TYPES[0], "hit"))
        self.upstream_requests = Counter(
            "gateway_upstream_requests",
            "Calls made to the upstream API",
            ("type", "status"),
            registry=r,
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_request_duration_seconds",
            "Upstream call latency",
            ("type",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.calls_saved = Counter(
            "gateway_upstream_calls_saved",
            "Upstream calls avoided (cache hits, derived hits and coalesced)",
            ("team", "type"),
            registry=r,
        )
        # gateway_quota_used, gateway_quota_limit: written into the scrape's text (see there)
        self.team_gauges = TeamGauges()
        self.upstream_quota_remaining = Gauge(
            "gateway_upstream_quota_remaining",
            "The upstream account's remaining quota, from its last answer",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.upstream_quota_remaining.set(float("nan"))  # unknown until the upstream answers
        self.ledger_drift = Gauge(
            "gateway_ledger_drift_calls",
            "Calls the upstream counted (from its data.quota) minus calls the ledger charged, "
            "since the gateway first saw the account's quota (or since it last rose)",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.cache_entries = Gauge(
            "gateway_cache_entries",
            "Results held in the store",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.cache_size = Gauge(
            "gateway_cache_size_bytes",
            "Bytes of results held",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.upstream_breaker_state = Gauge(
            "gateway_upstream_breaker_state",
            "Upstream circuit breaker: 0 closed, 1 open (refusing at once), 2 half-open (probing)",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.cache_audits = Counter(
            "gateway_cache_audits",
            "Derived answers also asked upstream and compared with its own answer",
            ("type", "result"),
            registry=r,
        )
        self.upstream_calls_by_team = Counter(
            "gateway_upstream_calls_by_team",
            "Calls sent to the upstream for a team's request (each may be billed), by type",
            ("team", "type"),
            registry=r,
        )
        self.upstream_call_price = Gauge(
            "gateway_upstream_call_price",
            "What one upstream call of the type costs ([pricing]), in the labelled currency",
            ("type", "currency"),
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.access_log_dropped = Counter(
            "gateway_access_log_dropped",
            "Access log lines dropped because the log sink was not taking them",
            registry=r,
        )
        self._dropped_seen = access_lines_dropped()
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self._request_children: dict[tuple[str, str, int, str], tuple[Any, Any]] = {}
        self._saved_children: dict[tuple[str, str], Any] = {}
        self._pending_requests: dict[tuple[str, str, int, str], list[Any]] = {}
        self._pending_saved: dict[tuple[str, str], int] = {}
        self._fold_scheduled = False
        self._inflight: Callable[[], float] | None = None
        self.inflight = Gauge(
            "gateway_inflight_requests",
            "Requests being answered",
            registry=r,
            multiprocess_mode="livesum",
        )

    def count_request(self, team: str, type_: str, status: int, cache: str, seconds: float) -> None:
        """One answered request. Counted here, written to the metrics at the next turn of the
        event loop (``fold``), with every other request answered in the same turn."""
        key = (team, type_, status, cache)
        pending = self._pending_requests.get(key)
        if pending is None:
            pending = self._pending_requests[key] = [0, 0.0, [0] * (len(LATENCY_BUCKETS) + 1)]
        pending[0] += 1
        pending[1] += seconds
        pending[2][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1  # the last is +Inf
        if not self.bulk:
            self.request_duration.labels(type_, cache).observe(seconds)
        if not self._fold_scheduled:
            self._schedule_fold()

    def count_saved(self, team: str, type_: str) -> None:
        key = (team, type_)
        self._pending_saved[key] = self._pending_saved.get(key, 0) + 1
        if not self._fold_scheduled:
            self._schedule_fold()

    def count_audit(self, type_: str, match: bool) -> None:
        self.cache_audits.labels(type_, "match" if match else "mismatch").inc()

    def _schedule_fold(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a direct call): write at once
            self.fold()
            return
        self._fold_scheduled = True
        loop.call_soon(self.fold)

    def fold(self) -> None:
        """Write what was counted since the last fold. A metric value costs a lock (and with
        several workers an mmap write) per change: one change per series per loop turn
        instead of five or six per request. A scrape folds first, so it is exact in this
        process; another worker folds at its next loop turn, before a client could have
        read the answer and asked for a scrape."""
        self._fold_scheduled = False
        requests, self._pending_requests = self._pending_requests, {}
        for key, (count, total, buckets) in requests.items():
            children = self._request_children.get(key)
            if children is None:
                team, type_, status, cache = key
                children = self._request_children[key] = (
                    self.requests.labels(team, type_, str(status), cache),
                    self.request_duration.labels(type_, cache),
                )
            children[0].inc(count)
            # Histogram.observe() per request, in bulk: its sum and the one bucket each
            # observation falls in (prometheus_client keeps buckets non-cumulative).
            if not self.bulk:
                continue  # observed one by one in count_request
            histogram = children[1]
            histogram._sum.inc(total)
            for i, n in enumerate(buckets):
                if n:
                    histogram._buckets[i].inc(n)
        saved, self._pending_saved = self._pending_saved, {}
        for (team, type_), count in saved.items():
            child = self._saved_children.get((team, type_))
            if child is None:
                child = self._saved_children[(team, type_)] = self.calls_saved.labels(team, type_)
            child.inc(count)
        if self._inflight is not None:
            self.inflight.set(self._inflight())
        dropped = access_lines_dropped()  # counted by the access log, off this path
        if dropped != self._dropped_seen:
            self.access_log_dropped.inc(dropped - self._dropped_seen)
            self._dropped_seen = dropped

    def whole(self) -> CollectorRegistry:
        """What a scrape shows: with several workers, every worker's values combined."""
        self.fold()
        if not self.multiprocess:
            return self.registry
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry

    def track_inflight(self, current: Callable[[], float]) -> None:
        """One process: read the in-flight count when scraped (nothing per request).
        Several workers: each sets its own (``livesum``) when it folds, see ``inflight_changed``."""
        if not self.multiprocess:
            self.inflight.set_function(current)
        else:
            self._inflight = current

    def inflight_changed(self) -> None:
        if self.multiprocess and not self._fold_scheduled:
            self._schedule_fold()

    def preinitialize(self, config: Config) -> None:
        """Create the series known at start so they exist at zero. Per team only its two quota
        gauges: its request and saved-call series appear with its first such answer, so a
        team costs series for what it does (thousands of idle teams stay cheap to scrape)."""
        self.team_gauges.configure(config)
        for type_ in ALL_TYPES:
            for outcome in CACHE_OUTCOMES:
                self.request_duration.labels(type_, outcome)
        for type_ in DERIVED_TYPES:
            for result in ("match", "mismatch"):
                self.cache_audits.labels(type_, result)
        for type_ in ANALYSIS_TYPES:
            self.upstream_duration.labels(type_)
            for status in ("200", "402", "timeout", "error"):
                self.upstream_requests.labels(type_, status)
        if not self.multiprocess:
            # A reload may change the currency. prometheus-client cannot clear labels across
            # processes (it warns on every worker's start): with workers > 1 a new currency
            # shows beside the old series until a restart.
            self.upstream_call_price.clear()
        for type_ in ANALYSIS_TYPES:
            price = config.pricing.price(type_)
            self.upstream_call_price.labels(type_, config.pricing.currency).set(price)

    def count_upstream_call(self, team: str, type_: str) -> None:
        """One call about to leave for the upstream on ``team``'s behalf (a miss, not a hit)."""
        self.upstream_calls_by_team.labels(team, type_).inc()
