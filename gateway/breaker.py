"""A circuit breaker for the upstream: after repeated failures answer 503 at once instead of
piling up waiters; after a cooldown let one probe through; close when it succeeds."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from gateway.errors import Unavailable

CLOSED, OPEN, HALF_OPEN = 0, 1, 2


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
        if state != self.state:
            self.state = state
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

    def _refusal(self, wait: float) -> Unavailable:
        return Unavailable(
            "Upstream failing; circuit open", headers={"Retry-After": str(max(1, math.ceil(wait)))}
        )
