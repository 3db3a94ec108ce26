"""An in-process tier in front of the store, so a hit needs no store round trip.

Entries are immutable results, so a copy in memory is only ever old, never wrong: it honours
the TTL, is bounded in bytes (least recently used out first), and is dropped whole when any
process purges the store (the store's ``cache_generation`` changes). The caller's remaining
quota shown on a hit comes from a per-team count at most ``usage_max_age_s`` old; admission
itself is always decided by the store, atomically.
"""

from __future__ import annotations

from collections import OrderedDict

from gateway.store.base import CachedResult


class HotCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[str, CachedResult] = OrderedDict()
        # (content_hash, type, scope) -> keys held: what a derived hit may answer from.
        self._variants: dict[tuple[str, str, str], set[str]] = {}

    def get(self, key: str) -> CachedResult | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def variants(self, content_hash: str, type_: str, scope: str) -> list[CachedResult]:
        """The entries held for one image, type and scope, any parameters."""
        keys = self._variants.get((content_hash, type_, scope))
        return [self._entries[k] for k in sorted(keys)] if keys else []

    def put(self, entry: CachedResult) -> None:
        if entry.size > self.max_bytes:
            return
        self.discard(entry.key)
        self._entries[entry.key] = entry
        self._variants.setdefault(_group(entry), set()).add(entry.key)
        self.size += entry.size
        while self.size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._unindex(evicted)
            self.size -= evicted.size

    def discard(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._unindex(old)
            self.size -= old.size

    def _unindex(self, entry: CachedResult) -> None:
        group = _group(entry)
        keys = self._variants.get(group)
        if keys is not None:
            keys.discard(entry.key)
            if not keys:
                del self._variants[group]

    def clear(self) -> None:
        self._entries.clear()
        self._variants.clear()
        self.size = 0

    def __len__(self) -> int:
        return len(self._entries)


def _group(entry: CachedResult) -> tuple[str, str, str]:
    return (entry.content_hash, entry.type, entry.scope)


class UsageCache:
    """Per-team charged counts for the ``quota`` field of answers that charge nothing."""

    def __init__(self, max_age_s: float):
        self.max_age_s = max_age_s
        self._seen: dict[tuple[str, str], tuple[int, float]] = {}

    def get(self, team: str, period: str, now: float) -> int | None:
        seen = self._seen.get((team, period))
        if seen is None or now - seen[1] > self.max_age_s:
            return None
        return seen[0]

    def put(self, team: str, period: str, used: int, now: float) -> None:
        self._seen[(team, period)] = (used, now)

    def clear(self) -> None:
        self._seen.clear()
