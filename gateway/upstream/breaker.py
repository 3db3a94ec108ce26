"""A circuit breaker for the upstream: after repeated failures answer 503 at once instead of
piling up waiters; after a cooldown let one probe through; close when it succeeds.

The caller ends every admitted call with exactly one of ``success()``, ``failure()`` or
``abandon()`` (``UpstreamClient.recognize`` does it in a ``finally``), so the single probe of
the half-open state is always given back: a probe that raised can never leave the breaker
refusing every call while the upstream is healthy. Every state change is logged once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from gateway.core.errors import Unavailable

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half-open"}

log = logging.getLogger("gateway.breaker")


class CircuitBreaker:
    def __init__(
        self,
        failures: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[int], None] | None = None,
    ):
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.on_change = on_change
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._probing = False

    def _set(self, state: int) -> None:
        if state == self.state:
            return
        before, self.state = self.state, state
        if state == OPEN:
            log.warning(
                "upstream circuit breaker %s -> open after %d consecutive failures; "
                "refusing upstream calls for %gs",
                NAMES[before],
                self.failures,
                self.cooldown_s,
            )
        elif state == HALF_OPEN:
            log.info("upstream circuit breaker open -> half-open: letting one probe call through")
        else:
            log.info("upstream circuit breaker %s -> closed: the upstream answers", NAMES[before])
        if self.on_change is not None:
            self.on_change(state)

    def is_open(self) -> bool:
        """Cheap check before charging quota: True while calls would be refused."""
        if self.state == OPEN:
            return self.clock() - self.opened_at < self.cooldown_s
        return self.state == HALF_OPEN and self._probing

    def before_call(self) -> None:
        if self.state == CLOSED:
            return
        if self.state == OPEN:
            waited = self.clock() - self.opened_at
            if waited < self.cooldown_s:
                raise self._refusal(self.cooldown_s - waited)
            self._set(HALF_OPEN)
        if self._probing:
            raise self._refusal(1.0)
        self._probing = True  # this call is the probe

    def success(self) -> None:
        self._probing = False
        self.failures = 0
        self._set(CLOSED)

    def failure(self) -> None:
        self._probing = False
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.threshold:
            self.opened_at = self.clock()
            self._set(OPEN)

    def abandon(self) -> None:
        """An admitted call that ended before it could tell anything about the upstream
        (cancelled, or stopped before sending): no verdict, but the probe is given back."""
        self._probing = False

    def _refusal(self, wait: float) -> Unavailable:
        return Unavailable(
            "Upstream failing; circuit open", headers={"Retry-After": str(max(1, math.ceil(wait)))}
        )
