"""HTTP layer: aiohttp app, handlers, admin; imports core, upstream, store, config."""
