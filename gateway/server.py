"""``gateway serve``: load config, run the app until SIGTERM/SIGINT, drain, exit."""

from __future__ import annotations

import logging

from aiohttp import web

from gateway.app import create_app
from gateway.config import load_config
from gateway.logs import setup_logging

log = logging.getLogger("gateway")


def serve(config_path: str, *, host: str | None = None, port: int | None = None,
          log_format: str = "text", log_level: str = "INFO") -> int:
    config = load_config(config_path)
    setup_logging(log_format, log_level)
    host = host or config.server.host
    port = config.server.port if port is None else port
    try:
        import uvloop  # noqa: PLC0415

        uvloop.install()
    except ImportError:
        pass
    app = create_app(config)
    log.info("gateway listening on http://%s:%s/api/v2/ (upstream %s, store %s)",
             host, port, config.upstream.url, config.storage.backend)
    web.run_app(app, host=host, port=port, print=None, access_log=None,
                shutdown_timeout=config.server.drain_timeout_s, handle_signals=True)
    return 0
