"""Config reload for a running app: ``POST /admin/reload`` and SIGHUP (``gateway.ops.server``
installs the handler) both end in ``_apply``, which swaps the config into the process state."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from gateway.config import Config, ConfigError, load_config
from gateway.http.state import STATE
from gateway.obs.logs import flush_access_log

log = logging.getLogger("gateway")


def reload_config(app: web.Application) -> tuple[bool, str]:
    """Re-read the config file; a bad one is refused and the running one kept."""
    flush_access_log()
    path = app[STATE].config.source
    try:
        new = load_config(path)
    except ConfigError as exc:
        log.error("reload refused, keeping the running config: %s", exc)
        return False, str(exc)
    return _apply(app, new, path)


class Reloads:
    """SIGHUPs coalesced: one reload runs at a time and at most one more is pending behind
    it, however many signals arrive meanwhile. The file is read and parsed in a thread (the
    heavy part with thousands of teams); only the swap runs on the loop, so requests and
    SIGTERM are served throughout. Once draining, pending reloads are dropped."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.done = 0
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def request(self) -> None:
        flush_access_log()  # at once, coalesced or not
        if self.app[STATE].draining:
            return
        if self._task is not None:
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                self._again = False
                path = self.app[STATE].config.source
                try:
                    new = await asyncio.to_thread(load_config, path)
                except ConfigError as exc:
                    log.error("reload refused, keeping the running config: %s", exc)
                else:
                    if self.app[STATE].draining:
                        return
                    _apply(self.app, new, path)
                self.done += 1
                if not self._again or self.app[STATE].draining:
                    return
        finally:
            self._task = None


def _apply(app: web.Application, new: Config, path: str) -> tuple[bool, str]:
    restart = app[STATE].apply_config(new)
    message = f"reloaded {path}: {len(new.teams)} teams"
    if restart:
        message += f" (changes to {', '.join(restart)} apply after a restart)"
    log.info(message)
    return True, message
