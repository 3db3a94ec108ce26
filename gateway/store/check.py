"""``gateway check-store``: the backend's own check (``gateway.store.sqlite.check``,
``gateway.store.redis.check``)."""

from __future__ import annotations

import asyncio

from gateway.config import Config


def check_store(config: Config, *, repair: bool) -> int:
    """0: healthy (or repaired); 1: damage left for the operator; prints one line a finding."""
    if config.storage.backend == "redis":
        from gateway.store.redis.check import check_redis  # redis-py loads only for Redis

        return asyncio.run(check_redis(config))
    from gateway.store.sqlite.check import check_sqlite

    return check_sqlite(config, repair=repair)
