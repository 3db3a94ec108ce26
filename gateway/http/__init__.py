"""HTTP layer: aiohttp app, handlers, admin, reload; imports core, upstream, store, obs, config."""
