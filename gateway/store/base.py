"""The storage protocol. One implementation a module (``sqlite``, ``redis``); one contract
test suite (``tests/store/test_store_contract.py``) runs over every implementation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from gateway.store.owners import Owner


class StoreUnavailable(Exception):
    """The store cannot be reached or written: the gateway answers 503 and forwards nothing."""


@dataclass(frozen=True, slots=True)
class CachedResult:
    key: str
    content_hash: str
    type: str
    params: str  # canonical parameter text, e.g. "max_labels=10&min_confidence=80"
    scope: str  # "" when shared across teams, else the owning team
    data_prefix: bytes  # the upstream's data object, re-encoded to end in '"quota":' (splice)
    created_at: float

    @property
    def size(self) -> int:
        return len(self.data_prefix) + len(self.key)


@dataclass(frozen=True, slots=True)
class CacheStats:
    entries: int
    size_bytes: int
    oldest: float | None = None
    by_type: tuple[tuple[str, int, int], ...] = ()  # (type, entries, bytes)
    hits: int = 0
    # type -> why the audit switched derived hits off for it (gateway.core.usage.cache_report)
    derive_off: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TeamUsage:
    team: str
    period: str
    charged: int  # upstream calls charged to the team
    hits: int  # answered from the store
    coalesced: int  # rode on another request's upstream call
    undelivered: int = 0  # of ``charged``: sent upstream (maybe billed), no result delivered
    derived: int = 0  # of ``hits``: derived from a looser stored result (gateway.core.derive)


@dataclass(frozen=True, slots=True)
class Reservation:
    """One unit of a team's quota, charged before forwarding.

    Pending until it ends one of three ways: settled (a result was delivered), kept as
    undelivered (the call was sent and may have been billed, but no result came back), or
    refunded (the upstream provably did not bill). It is marked *sent*, durably, before the
    request leaves; so when its owner process dies, housekeeping refunds it if it was never
    sent and keeps the charge (undelivered) if it was (``gateway.store.owners``)."""

    id: str
    team: str
    period: str
    used: int  # the team's charged count, this unit included
    at: float
    owner: str = ""  # the owning process (gateway.store.owners.Owner.id)


@dataclass(frozen=True, slots=True)
class Reclaimed:
    """What housekeeping did with a gone owner's pending reservations."""

    refunded: int = 0  # never sent: given back
    undelivered: int = 0  # sent: kept charged, counted as undelivered


@dataclass(frozen=True, slots=True)
class Hit:
    key: str
    team: str
    period: str
    at: float
    coalesced: bool = False
    derived: bool = False  # answered from another entry's result (the entry is that one)


@dataclass(slots=True)
class HitSummary:
    """A batch of hits folded into one row per entry and one per team and period."""

    per_key: dict[str, tuple[int, float]]  # key -> (hits, last hit time)
    # (team, period) -> (hits, coalesced, derived); derived hits are counted in hits too
    per_team: dict[tuple[str, str], tuple[int, int, int]]

    @classmethod
    def of(cls, hits: list[Hit]) -> HitSummary:
        per_key: dict[str, tuple[int, float]] = {}
        per_team: dict[tuple[str, str], tuple[int, int, int]] = {}
        for h in hits:
            if not h.coalesced:
                n, at = per_key.get(h.key, (0, 0.0))
                per_key[h.key] = (n + 1, max(at, h.at))
            direct, coalesced, derived = per_team.get((h.team, h.period), (0, 0, 0))
            per_team[(h.team, h.period)] = (
                direct + (not h.coalesced), coalesced + h.coalesced, derived + h.derived)
        return cls(per_key, per_team)


class Store(Protocol):
    generation: int
    """Bumped by every purge in this process (other processes see ``cache_generation``)."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...

    async def lookup(self, key: str, team: str, period: str) -> tuple[CachedResult | None, int]:
        """The entry for ``key`` (or None) and the team's charged count, in one round trip."""

    async def save_result(
        self, result: CachedResult, *, max_bytes: int, settle: Reservation | None = None
    ) -> None:
        """Commit ``result`` (replacing any entry with its key) and settle ``settle`` in one
        transaction before returning; evict least recently hit entries while the store holds
        more than ``max_bytes``."""

    async def results_for_hash(self, content_hash: str, scope: str) -> list[CachedResult]: ...

    async def reserve(
        self, team: str, period: str, limit: int, *, at: float, owner: str = ""
    ) -> Reservation | None:
        """Atomically charge one unit if the team is under ``limit`` (pending, not sent), or
        None when that would exceed the limit."""

    async def mark_sent(self, reservation: Reservation) -> bool:
        """Record, before the upstream request leaves, that it may be billed. False when the
        reservation is no longer pending (housekeeping took its owner for dead): then the
        request must not be sent."""

    async def settle(self, reservation: Reservation) -> None:
        """End a pending reservation as charged and delivered; a no-op if it is not pending."""

    async def keep_undelivered(self, reservation: Reservation) -> None:
        """End a pending reservation as charged without a delivered result (the call was
        sent and may have been billed); a no-op if it is not pending."""

    async def refund(self, reservation: Reservation) -> bool:
        """Give the unit back if it is still pending; False if it has already ended."""

    async def register_owner(self, owner: Owner) -> None: ...
    async def beat(self, owner: Owner) -> None:
        """Bump the owner's beat counter (creating its row if another process dropped it)."""

    async def pending_owners(self) -> list[Owner]:
        """Owners with pending reservations (an unknown owner id comes back with pid 0)."""

    async def reclaim_owner(self, owner_id: str) -> Reclaimed:
        """End every pending reservation of a gone owner (never sent: refunded; sent: kept
        as undelivered) and forget the owner."""

    async def used(self, team: str, period: str) -> int: ...
    async def charged_total(self) -> int:
        """Every unit charged and not refunded, all teams and periods (for the drift against
        the upstream's own count)."""

    async def record_hits(self, hits: list[Hit]) -> None: ...
    async def usage(self, period: str) -> list[TeamUsage]: ...
    async def stats(self) -> CacheStats: ...

    async def totals(self) -> tuple[int, int]:
        """(entries, bytes) held, cheap enough for every scrape."""

    async def purge(
        self,
        *,
        content_hash: str | None = None,
        type_: str | None = None,
        older_than: float | None = None,
    ) -> int: ...
    async def get_meta(self, name: str) -> str | None: ...
    async def set_meta(self, name: str, value: str) -> None: ...

    async def results_of_type(
        self, content_hash: str, type_: str, scope: str
    ) -> list[CachedResult]:
        """The results held for one image, type and scope (fresh or not), in one indexed
        lookup: what a derived hit chooses from (``gateway.core.derive``)."""

    async def take_token(self, team: str, rate: float, burst: float) -> tuple[bool, float] | None:
        """Refill the team's shared token bucket and take one token if there is one:
        (taken, tokens left), atomically for every process on this store; None when the
        store keeps no buckets (the caller then keeps them itself)."""

    async def set_meta_if_absent(self, name: str, value: str) -> bool:
        """Set ``name`` only if it is not set yet, atomically for every process on the store:
        True for the one caller that set it (a notification is sent once across replicas)."""

    async def claim_flight(self, key: str, token: str, ttl_ms: int) -> bool | None:
        """Take the lock on a cache key whose upstream call is about to run, for every
        process on the store (``SET NX PX``, idempotent by ``token``): True for the one
        caller that holds it, False while another holds it; it expires after ``ttl_ms``
        unless renewed. None when the store keeps no such locks (SQLite: each process
        coalesces its own requests)."""

    async def renew_flight(self, key: str, token: str, ttl_ms: int) -> bool:
        """Extend the lock if ``token`` still holds it (False: it expired or was taken)."""

    async def release_flight(self, key: str, token: str) -> None:
        """Drop the lock if ``token`` still holds it."""

    async def flight(self, key: str) -> tuple[CachedResult | None, bool]:
        """The result held for ``key`` and whether a lock on it is held, in one round trip:
        what a follower on another process polls."""

    async def save_key(self, key: KeyRecord) -> None:
        """Insert or replace a store-issued team key (all but its uses and last use, which
        only ``record_key_uses`` moves) and change the meta row ``keys_generation`` in the
        same transaction, so every process on the store re-reads the keys."""

    async def list_keys(self) -> list[KeyRecord]:
        """Every store-issued key, revoked and expired ones included, oldest first."""

    async def record_key_uses(self, uses: dict[str, tuple[int, float]]) -> None:
        """Per key id, add its uses and move its last use forward (never back); an id the
        store does not hold is ignored."""

    # -- migrate-store (gateway.store.migrate) ---------------------------------------------
    async def owners(self) -> list[Owner]:
        """Every registered owner (a gateway process that stopped cleanly leaves none)."""

    async def ledger_rows(self) -> list[TeamUsage]:
        """Every team's row of every period, ordered by period and team."""

    async def put_ledger_row(self, row: TeamUsage) -> None:
        """Set one team's row of one period to exactly ``row`` (charged, hits, coalesced,
        undelivered): a copy, so writing it twice is writing it once."""

    async def results_page(self, cursor: str, limit: int) -> tuple[list[CachedResult], str]:
        """About ``limit`` cached results from ``cursor`` ("" at first) and the cursor that
        goes on ("" once done). An entry may come twice; none changed meanwhile is missed."""

    async def meta_items(self) -> dict[str, str]:
        """Every meta row."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A team key issued through the store (``gateway.core.keys``): only its hash is kept."""

    id: str
    team: str
    key_hash: str  # "sha256:<hex>", as hash_key makes it
    label: str
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    last_used_at: float | None = None
    uses: int = 0  # requests it authorized
