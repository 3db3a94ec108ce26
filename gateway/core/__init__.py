"""Recognition core: service, key, quota, limits; imports upstream, store, config; no aiohttp."""
