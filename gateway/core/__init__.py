"""Recognition core: service, key, quota, limits, usage reports; imports upstream, store, obs,
config; no aiohttp."""
