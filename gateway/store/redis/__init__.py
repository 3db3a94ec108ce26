"""The Redis backend: ``store`` (the Store, for replicas sharing one cache and ledger),
``scripts`` (its Lua scripts), ``check`` (``gateway check-store`` on Redis)."""

from gateway.store.redis.store import WAIT_MS, RedisStore

__all__ = ["WAIT_MS", "RedisStore"]
