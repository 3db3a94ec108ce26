"""``gateway check-store`` on Redis: reachable, and what it holds (Redis repairs nothing here:
its persistence is the server's)."""

from __future__ import annotations

from gateway.config import Config
from gateway.store.base import StoreUnavailable
from gateway.store.redis.store import RedisStore


async def check_redis(config: Config) -> int:
    store = RedisStore(config.storage.redis_url, prefix=config.storage.redis_prefix)
    try:
        await store.open()
        entries, size = await store.totals()
    except StoreUnavailable as exc:
        print(f"redis: UNREACHABLE: {exc}")
        return 1
    finally:
        await store.close()
    print(f"redis: ok ({entries} entries, {size} bytes)")
    return 0
