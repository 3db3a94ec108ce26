"""Per-team request rate limits: a token bucket per team (``rate_per_s``, ``burst``).

Answers 429 with ``Retry-After`` and the IETF ``RateLimit`` / ``RateLimit-Policy`` headers
(draft-ietf-httpapi-ratelimit-headers). Buckets live in the process: with ``server.workers = N``
each worker enforces the limit on its share of the traffic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import TeamConfig
from gateway.errors import RateLimited


@dataclass(slots=True)
class _Bucket:
    rate: float
    burst: float
    tokens: float
    stamp: float


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def check(self, team: TeamConfig) -> dict[str, str]:
        """Take one token or raise ``RateLimited``; returns headers for the answer."""
        if team.rate_per_s is None:
            return {}
        rate = team.rate_per_s
        burst = float(team.burst if team.burst is not None else max(1, math.ceil(rate)))
        now = self.clock()
        bucket = self._buckets.get(team.name)
        if bucket is None or bucket.rate != rate or bucket.burst != burst:
            bucket = self._buckets[team.name] = _Bucket(rate, burst, burst, now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        window = max(1, math.ceil(burst / rate))
        policy = f'"team";q={int(burst)};w={window}'
        if bucket.tokens < 1.0:
            wait = math.ceil((1.0 - bucket.tokens) / rate)
            raise RateLimited(
                headers={
                    "Retry-After": str(wait),
                    "RateLimit-Policy": policy,
                    "RateLimit": f'"team";r=0;t={wait}',
                }
            )
        bucket.tokens -= 1.0
        refill = math.ceil((burst - bucket.tokens) / rate)
        return {
            "RateLimit-Policy": policy,
            "RateLimit": f'"team";r={int(bucket.tokens)};t={refill}',
        }
