"""HTTP layer: aiohttp app, handlers, admin, reload, webhooks; imports core, upstream, store,
obs, config."""
