"""Storage behind a small protocol: cached results and the quota ledger."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.store.base import (
    CachedResult,
    CacheStats,
    Hit,
    Reservation,
    Store,
    StoreUnavailable,
    TeamUsage,
)

if TYPE_CHECKING:
    from gateway.config import StorageConfig

__all__ = [
    "CacheStats",
    "CachedResult",
    "Hit",
    "Reservation",
    "Store",
    "StoreUnavailable",
    "TeamUsage",
    "open_store",
]


def open_store(
    config: StorageConfig, *, repair_cache: bool = True, max_inflight: int = 1024
) -> Store:
    """The configured backend, not yet opened. ``repair_cache=False`` (reports, admin
    commands): a corrupt cache file is refused, not moved aside; only the gateway and
    ``check-store --repair`` change the files."""
    if config.backend == "redis":
        from gateway.store.redis import RedisStore

        return RedisStore(
            config.redis_url,
            prefix=config.redis_prefix,
            # Enough for every admitted request plus the background work, unless set.
            max_connections=config.redis_max_connections or max_inflight + 64,
            require_persistence=config.require_persistence,
            sentinels=config.redis_sentinels,
            master_name=config.redis_master_name,
            min_replicas_ack=(
                config.redis_min_replicas_ack
                if config.redis_min_replicas_ack >= 0
                else (1 if config.redis_sentinels else 0)
            ),
        )
    from gateway.store.sqlite import SQLiteStore

    return SQLiteStore(
        config.path,
        cache_path=config.cache_path or None,
        synchronous=config.synchronous,
        busy_timeout_ms=config.busy_timeout_ms,
        repair_cache=repair_cache,
    )
