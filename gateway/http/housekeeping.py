"""The background loop of a running gateway, from start to shutdown: every half second the
service's batched hit counts are flushed and the breaker's state told to the notifier; every
beat this process is recorded as alive, reservations left by dead processes are ended, the
ledger reconciled with the upstream's count; every minute entries past stale-if-error are
dropped. At shutdown it drains the service, the notifier and this process's ledger record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.http.notify import Notifier
from gateway.http.state import STATE, GatewayState
from gateway.store import StoreUnavailable
from gateway.store.base import Reclaimed
from gateway.store.owners import BEAT_INTERVAL_S

log = logging.getLogger("gateway")

NOTIFIER: web.AppKey[Notifier] = web.AppKey("notifier", Notifier)
FLUSH_INTERVAL_S = 0.5
BEAT_EVERY = int(BEAT_INTERVAL_S / FLUSH_INTERVAL_S)  # flush ticks between owner beats
PURGE_EVERY = int(60.0 / FLUSH_INTERVAL_S)  # ... between purges of entries past keep_s


async def housekeeping_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    stored = await state.store.get_meta("upstream_quota")
    if stored is not None and stored.isdigit():
        state.metrics.upstream_quota_remaining.set(int(stored))

    await state.store.register_owner(state.ledger.owner)
    await _reclaim(state)  # right at start: what a killed predecessor left pending
    await _purge_expired(state)
    await state.service.flush()  # also notes the store's cache generation as of now

    notifier = app[NOTIFIER]
    notifier.start()

    # Cancelling alone cannot stop this loop: a cancel that lands inside a store call can come
    # back as that call's failure (redis-py turns it into a ConnectionError when the server is
    # gone), which the loop logs and outlives; shutdown then waited for ever. So it also stops
    # when told.
    stop = asyncio.Event()

    async def loop() -> None:
        ticks = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), FLUSH_INTERVAL_S)
            if stop.is_set():
                return
            await state.service.flush()
            ticks += 1
            notifier.check_breaker(state.upstream.breaker.state)
            if ticks % BEAT_EVERY == 0:
                try:
                    await state.store.beat(state.ledger.owner)
                except StoreUnavailable as exc:
                    log.warning("could not record this process as alive: %s", exc)
                await _reclaim(state)
                await state.service.reconcile()
                await notifier.check_store(_drift(state))
            if ticks % PURGE_EVERY == 0:
                await _purge_expired(state)

    tasks = [asyncio.create_task(loop()), asyncio.create_task(state.deadlines.run())]
    yield
    stop.set()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await state.service.drain()
    await notifier.close()
    state.metrics.fold()  # what the last requests counted
    try:  # every call has ended: nothing of ours is pending; forget this process
        left = await state.store.reclaim_owner(state.ledger.owner.id)
    except StoreUnavailable as exc:
        log.warning("could not close this process's ledger record: %s", exc)
    else:
        _log_reclaimed(left, "left by this process at shutdown")


def _drift(state: GatewayState) -> float | None:
    """gateway_ledger_drift_calls as set by the last reconcile (None before any)."""
    for family in state.metrics.ledger_drift.collect():
        for sample in family.samples:
            return sample.value
    return None


async def _reclaim(state: GatewayState) -> None:
    """End the reservations of gateway processes that are gone (killed mid-call)."""
    try:
        done = await state.ledger.reclaim()
    except StoreUnavailable as exc:
        log.warning("housekeeping failed: %s", exc)
        return
    _log_reclaimed(done, "left by a gateway process that died")


def _log_reclaimed(done: Reclaimed, whose: str) -> None:
    if done.refunded:
        log.warning(
            "refunded %d quota reservations %s before their upstream call was sent",
            done.refunded,
            whose,
        )
    if done.undelivered:
        log.warning(
            "kept %d charges %s during their upstream calls: sent, so maybe billed, but no "
            "result was delivered (the undelivered column of `gateway usage`)",
            done.undelivered,
            whose,
        )


async def _purge_expired(state: GatewayState) -> None:
    """Drop entries past stale-if-error."""
    try:
        await state.store.purge(older_than=state.ledger.clock() - state.config.cache.keep_s)
    except StoreUnavailable as exc:
        log.warning("housekeeping failed: %s", exc)
