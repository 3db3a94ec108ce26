"""``gateway serve``: load config, run until SIGTERM/SIGINT, drain, exit; SIGHUP reloads."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from gateway.app import create_app
from gateway.config import ConfigError, load_config
from gateway.logs import setup_logging
from gateway.state import STATE

log = logging.getLogger("gateway")


def reload_config(app: web.Application) -> tuple[bool, str]:
    """Re-read the config file; a bad one is refused and the running one kept."""
    state = app[STATE]
    path = state.config.source
    try:
        new = load_config(path)
    except ConfigError as exc:
        log.error("reload refused, keeping the running config: %s", exc)
        return False, str(exc)
    restart = state.apply_config(new)
    message = f"reloaded {path}: {len(new.teams)} teams"
    if restart:
        message += f" (changes to [{'], ['.join(restart)}] apply after a restart)"
    log.info(message)
    return True, message


def serve(config_path: str, *, host: str | None = None, port: int | None = None,
          log_format: str = "text", log_level: str = "INFO") -> int:
    config = load_config(config_path)
    setup_logging(log_format, log_level)
    host = host or config.server.host
    port = config.server.port if port is None else port
    _use_uvloop()
    app = create_app(config)

    async def on_startup(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, reload_config, app)

    app.on_startup.append(on_startup)
    log.info("gateway listening on http://%s:%s/api/v2/ (store %s)", host, port,
             config.storage.backend)
    web.run_app(app, host=host, port=port, print=None, access_log=None,
                shutdown_timeout=config.server.drain_timeout_s, handle_signals=True)
    log.info("gateway stopped")
    return 0


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
