"""Per-team request rate limits: a token bucket per team (``rate_per_s``, ``burst``).

Answers 429 with ``Retry-After`` and the IETF ``RateLimit`` / ``RateLimit-Policy`` headers
(draft-ietf-httpapi-ratelimit-headers). Where the buckets live decides who shares them:

- the Redis store holds them (one Lua script per check, on the server's clock): every worker
  and replica on one prefix shares one bucket per team;
- with SQLite and ``server.workers > 1``: a table in a file the supervisor creates and every
  worker maps (``SharedBuckets``), under an ``flock`` the kernel releases if its holder dies;
- otherwise in the process.
"""

from __future__ import annotations

import fcntl
import logging
import math
import mmap
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import xxhash

from gateway.config import TeamConfig
from gateway.core.errors import RateLimited
from gateway.store.base import Store

log = logging.getLogger("gateway")

SHARED_BUCKETS_ENV = "GATEWAY_RATE_BUCKETS"  # the file, set by the supervisor for its workers


@dataclass(slots=True)
class _Bucket:
    rate: float
    burst: float
    tokens: float
    stamp: float


def take(bucket: _Bucket, rate: float, burst: float, now: float) -> tuple[bool, float]:
    """Refill ``bucket`` to ``now`` and take one token if there is one: (taken, tokens left).
    A bucket whose rate or burst changed (a reload) starts again full."""
    if bucket.rate != rate or bucket.burst != burst:
        bucket.rate, bucket.burst, bucket.tokens, bucket.stamp = rate, burst, burst, now
    bucket.tokens = min(burst, bucket.tokens + max(0.0, now - bucket.stamp) * rate)
    bucket.stamp = now
    if bucket.tokens < 1.0:
        return False, bucket.tokens
    bucket.tokens -= 1.0
    return True, bucket.tokens


class LocalBuckets:
    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}

    def take(self, team: str, rate: float, burst: float, now: float) -> tuple[bool, float]:
        bucket = self._buckets.get(team)
        if bucket is None:
            bucket = self._buckets[team] = _Bucket(rate, burst, burst, now)
        return take(bucket, rate, burst, now)


_SLOT = struct.Struct("<Qdddd")  # team name hash (0: free), rate, burst, tokens, stamp


class SharedBuckets:
    """One bucket per team in a file mapped by every worker of one supervisor.

    A fixed table of ``capacity`` slots, found by the xxh3-64 of the team name (open
    addressing); a slot once taken stays its team's. Every check holds an exclusive ``flock``
    on the file for a few microseconds: the kernel drops it when a holder dies, so a
    ``kill -9`` mid-check cannot wedge the others. The clock is CLOCK_MONOTONIC, one for all
    processes of the host."""

    CAPACITY = 1 << 16

    def __init__(self, path: str, *, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        size = capacity * _SLOT.size
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                if os.fstat(self._fd).st_size < size:
                    os.ftruncate(self._fd, size)  # zeros: every slot free
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._map = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        self._slots: dict[str, int] = {}
        self._full_warned = False

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def take(
        self, team: str, rate: float, burst: float, clock: Callable[[], float]
    ) -> tuple[bool, float] | None:
        """As ``take`` on the team's shared bucket; None when the table is full."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            offset = self._slots.get(team)
            if offset is None:
                offset = self._claim(team)
                if offset is None:
                    return None
                self._slots[team] = offset
            now = clock()  # under the lock: stamps never go backwards
            _, r, b, tokens, stamp = _SLOT.unpack_from(self._map, offset)
            bucket = _Bucket(r, b, tokens, stamp)
            taken = take(bucket, rate, burst, now)
            _SLOT.pack_into(
                self._map, offset, _name_hash(team), rate, burst, bucket.tokens, bucket.stamp
            )
            return taken
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _claim(self, team: str) -> int | None:
        h = _name_hash(team)
        start = h % self.capacity
        for i in range(self.capacity):
            offset = ((start + i) % self.capacity) * _SLOT.size
            (slot_hash,) = struct.unpack_from("<Q", self._map, offset)
            if slot_hash == h:
                return offset
            if slot_hash == 0:  # free: rate 0 never matches, so take() fills it full
                struct.pack_into("<Q", self._map, offset, h)
                return offset
        if not self._full_warned:
            self._full_warned = True
            log.warning(
                "rate limits: the shared table's %d slots are taken; teams beyond it are "
                "limited per worker",
                self.capacity,
            )
        return None


def _name_hash(team: str) -> int:
    return xxhash.xxh3_64_intdigest(team.encode()) or 1


class RateLimiter:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        store: Store | None = None,
        shared: SharedBuckets | None = None,
    ):
        self.clock = clock
        self.store = store  # asked first; a store that keeps no buckets answers None
        self.shared = shared
        self._local = LocalBuckets()

    @classmethod
    def for_process(cls, store: Store) -> RateLimiter:
        """Buckets shared as widely as this process can: the store's, else the supervisor's
        file (``SHARED_BUCKETS_ENV``), else this process's."""
        path = os.environ.get(SHARED_BUCKETS_ENV)
        shared = None
        if path:
            try:
                shared = SharedBuckets(path)
            except OSError as exc:
                log.warning("rate limits per worker: cannot map %s: %s", path, exc)
        return cls(store=store, shared=shared)

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()
            self.shared = None

    async def check(self, team: TeamConfig) -> dict[str, str]:
        """Take one token or raise ``RateLimited``; returns headers for the answer."""
        if team.rate_per_s is None:
            return {}
        rate = team.rate_per_s
        burst = float(team.burst if team.burst is not None else max(1, math.ceil(rate)))
        taken = None
        if self.store is not None:
            taken = await self.store.take_token(team.name, rate, burst)
            if taken is None:
                self.store = None  # this store keeps no buckets: don't ask again
        if taken is None and self.shared is not None:
            taken = self.shared.take(team.name, rate, burst, self.clock)
        if taken is None:
            taken = self._local.take(team.name, rate, burst, self.clock())
        allowed, tokens = taken
        window = max(1, math.ceil(burst / rate))
        policy = f'"team";q={int(burst)};w={window}'
        if not allowed:
            wait = math.ceil((1.0 - tokens) / rate)
            raise RateLimited(
                headers={
                    "Retry-After": str(wait),
                    "RateLimit-Policy": policy,
                    "RateLimit": f'"team";r=0;t={wait}',
                }
            )
        refill = math.ceil((burst - tokens) / rate)
        return {
            "RateLimit-Policy": policy,
            "RateLimit": f'"team";r={int(tokens)};t={refill}',
        }
