"""Per-team sub-quotas over calendar UTC periods, derived from timestamps (no reset job)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from gateway.config import Config, LiveConfig, TeamConfig, live
from gateway.core.errors import QuotaReached
from gateway.store.base import Reclaimed, Reservation, Store
from gateway.store.owners import Liveness, Owner, this_process

Clock = Callable[[], float]


def period_key(period: str, now: float) -> str:
    """The ledger row a moment belongs to: ``2026-11-24``, ``2026-W48``, ``2026-11``, ``total``."""
    moment = datetime.fromtimestamp(now, UTC)
    if period == "day":
        return moment.strftime("%Y-%m-%d")
    if period == "week":
        year, week, _ = moment.isocalendar()
        return f"{year}-W{week:02d}"
    if period == "month":
        return moment.strftime("%Y-%m")
    return "total"


class QuotaLedger:
    """Reserve one unit before forwarding, refund it if the upstream call does not succeed.

    The store makes the reservation atomic, so neither concurrency nor a second gateway
    process on the same store can admit a request past the limit.
    """

    def __init__(
        self,
        store: Store,
        config: Config | LiveConfig,
        *,
        clock: Clock = time.time,
        owner: Owner | None = None,
    ):
        self.store = store
        self.live = live(config)
        self.clock = clock
        self.owner = owner if owner is not None else this_process()
        self.liveness = Liveness(self.owner)
        self._period_second = -1
        self._period_kind = ""
        self._period_key = ""

    @property
    def config(self) -> Config:
        return self.live.current

    def period(self) -> str:
        # Formatting a date costs more than the rest of a cache hit: once a second is enough
        # (a period boundary is a whole second).
        now = self.clock()
        second = int(now)
        if second != self._period_second or self.config.quota.period != self._period_kind:
            self._period_kind = self.config.quota.period
            self._period_second = second
            self._period_key = period_key(self._period_kind, now)
        return self._period_key

    async def reserve(self, team: TeamConfig) -> Reservation:
        """Charge one unit now (pending until settled or refunded)."""
        now = self.clock()
        reservation = await self.store.reserve(
            team.name,
            period_key(self.config.quota.period, now),
            team.quota,
            at=now,
            owner=self.owner.id,
        )
        if reservation is None:
            raise QuotaReached()
        return reservation

    async def refund(self, reservation: Reservation) -> None:
        await self.store.refund(reservation)

    async def reclaim(self) -> Reclaimed:
        """End the pending reservations of owner processes that are gone: refund those never
        sent, keep the charge of those sent (billed, undelivered). A live owner's are never
        touched, however old (``gateway.store.owners``)."""
        refunded = undelivered = 0
        for owner in await self.store.pending_owners():
            if self.liveness.gone(owner):
                done = await self.store.reclaim_owner(owner.id)
                self.liveness.forget(owner.id)
                refunded += done.refunded
                undelivered += done.undelivered
        return Reclaimed(refunded, undelivered)

    @staticmethod
    def left(team: TeamConfig, used: int) -> int:
        """What a team may still spend this period, given what it has been charged."""
        return max(team.quota - used, 0)
