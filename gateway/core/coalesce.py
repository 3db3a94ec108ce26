"""Coalescing: the keys in flight in this process, and their locks across processes.

Concurrent requests for one key make one upstream call: the first (the leader) registers a
``Flight`` here, the others (followers) wait on its future. With a store that locks keys
across processes (Redis), a leader also takes the store's lock on its key, renewed while its
call runs; a process that finds the key locked polls the store for the holder's result
instead of calling. The service (``gateway.core.service``) decides who leads and what a
follower is answered; this module keeps the table and the locks.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from gateway.config import LiveConfig
from gateway.store.base import CachedResult, Store, StoreUnavailable

log = logging.getLogger("gateway.service")

FOLLOW_POLL_FIRST_S = 0.005
FOLLOW_POLL_MAX_S = 0.1


@dataclass(slots=True)
class Flight:
    """One key in flight in this process. With a store that locks keys across processes
    (Redis), it also holds that lock while its call runs (``token``, renewed by
    ``renewer``), or waits on the process that holds it, this process's followers behind."""

    future: asyncio.Future[CachedResult] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    token: str | None = None
    renewer: asyncio.Task[None] | None = None


class Flights:
    """The in-flight table of one process (key -> ``Flight``) and the cross-process locks."""

    def __init__(
        self,
        store: Store,
        live: LiveConfig,
        clock: Callable[[], float],
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ):
        self._store = store
        self._live = live
        self._clock = clock
        self._spawn = spawn
        self._table: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._table)

    def get(self, key: str) -> Flight | None:
        return self._table.get(key)

    def start(self, key: str) -> Flight:
        """A new leader's flight, registered under ``key`` (a no-cache leader may take over a
        plain one's key: the plain one's followers keep its future)."""
        flight = Flight()
        self._table[key] = flight
        return flight

    # -- across processes (a store that locks keys: Redis) -----------------------------------
    async def claim(self, key: str, flight: Flight) -> bool:
        """Whether this process is to call for ``key``: True when it took the store's lock
        on it (renewed from now until its call lands), when the store keeps no such locks
        (SQLite: coalescing stays per process) or cannot be asked (the ledger, which fails
        closed, decides then); False while another process holds it."""
        token = uuid.uuid4().hex
        ttl_ms = max(1, int(self._live.current.cache.coalesce_lock_s * 1000))
        try:
            claimed = await self._store.claim_flight(key, token, ttl_ms)
        except StoreUnavailable:
            return True
        if claimed is None:
            return True
        if not claimed:
            return False
        flight.token = token
        flight.renewer = asyncio.create_task(self._renew(key, token, ttl_ms))
        return True

    async def _renew(self, key: str, token: str, ttl_ms: int) -> None:
        while True:
            await asyncio.sleep(ttl_ms / 3000)
            try:
                if not await self._store.renew_flight(key, token, ttl_ms):
                    return  # lapsed and taken: the other holder's followers wait on it
            except StoreUnavailable:
                continue  # should it lapse meanwhile, another process calls too: no harm

    def release(self, key: str, flight: Flight) -> None:
        """Drop ``flight``'s lock across processes, off the answer's path (unreleased, it
        expires by itself)."""
        if flight.renewer is not None:
            flight.renewer.cancel()
            flight.renewer = None
        token, flight.token = flight.token, None
        if token is None:
            return
        self._spawn(self._release_lock(key, token))

    async def _release_lock(self, key: str, token: str) -> None:
        try:
            await self._store.release_flight(key, token)
        except StoreUnavailable as exc:
            log.warning("could not release a coalescing lock (it expires): %s", exc)

    async def follow_shared(self, key: str, flight: Flight) -> CachedResult | None:
        """Wait, polling with backoff, for the result of the process holding ``key``'s lock.
        None: this process calls itself, because it now holds the lock (the holder ended
        without a stored result: it failed, its team was over quota, or it died and its lock
        expired), or it waited ``coalesce_wait_s``, or the store cannot be asked."""
        wait_s = self._live.current.cache.coalesce_wait_s
        deadline = time.monotonic() + wait_s
        delay = FOLLOW_POLL_FIRST_S
        while True:
            try:
                result, held = await self._store.flight(key)
            except StoreUnavailable:
                return None
            fresh = result is not None and (
                self._clock() - result.created_at < self._live.current.cache.ttl_s
            )
            if fresh:
                return result
            if not held:
                if await self.claim(key, flight):
                    return None
                continue  # yet another process took it first: wait on that one
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "coalesced request waited %.0fs for another replica; forwarding on its own",
                    wait_s,
                )
                return None
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, FOLLOW_POLL_MAX_S)

    def land(self, key: str, flight: Flight) -> None:
        """Take ``flight`` off the in-flight table, unless another leader has taken its key."""
        if self._table.get(key) is flight:
            del self._table[key]
