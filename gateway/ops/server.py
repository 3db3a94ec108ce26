"""One serving process of ``gateway serve`` (``gateway.ops.serve``): run until SIGTERM/SIGINT,
drain, exit; SIGHUP reloads. With ``server.workers > 1`` each worker of the supervisor
(``gateway.ops.supervisor``) runs ``run_worker``, as the single process does otherwise.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_runner import GracefulExit

from gateway.config import Config, load_config
from gateway.event_loop import use_event_loop
from gateway.http.app import create_app
from gateway.http.http_errors import EnvelopeAppRunner, redact_aiohttp_logs
from gateway.http.reload import Reloads
from gateway.http.state import STATE
from gateway.obs.logs import flush_access_log, start_access_log
from gateway.ops.occupancy import orphaned_workers, port_holders, store_id

log = logging.getLogger("gateway")


@dataclass(frozen=True)
class Options:
    config_path: str
    host: str
    port: int
    log_format: str
    log_level: str


def refuse_if_occupied(config: Config, options: Options) -> None:
    """An OSError (one line, exit 1) while workers of a gateway whose supervisor is gone still
    hold the store, or, with several workers (SO_REUSEPORT would share it), while anything
    else listens on the port. Two live gateways may share a store on purpose, not a port."""
    orphans = orphaned_workers(store_id(config.storage))
    if orphans:
        raise OSError(
            errno.EBUSY,
            f"the store is still held by pid {_pids(orphans)}: workers of a gateway whose "
            "supervisor is gone; stop them first",
        )
    if config.server.workers > 1:
        holders = port_holders(options.host, options.port)
        if holders:
            raise OSError(
                errno.EADDRINUSE,
                f"{http_host(options.host)}:{options.port} is already in use by "
                f"pid {_pids(holders)}; stop it first (with server.workers > 1 the port "
                "would be shared with it)",
            )


def _pids(pids: list[int]) -> str:
    return ", ".join("(not visible)" if pid < 0 else str(pid) for pid in pids)


def http_host(host: str) -> str:
    """``host`` as it goes in a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def run_worker(
    options: Options,
    *,
    reuse_port: bool,
    on_ready: Callable[[], None] | None = None,
    on_startup: Callable[[web.Application, asyncio.AbstractEventLoop], None] | None = None,
) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until on_startup handles it (see cli)
    redact_aiohttp_logs()
    config = load_config(options.config_path)
    use_event_loop(config.server.event_loop)
    start_access_log(config.server.access_log_buffer_kb, config.server.access_log_flush_ms)
    app = create_app(config)

    async def install_handlers(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, Reloads(app).request)
        # A worker starts with SIGHUP blocked (see gateway.ops.supervisor): pending ones now reload.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        # Replaces aiohttp's SIGTERM handler: mark the gateway draining first (/readyz 503,
        # new API requests 503) while still listening for server.drain_grace_s, so a load
        # balancer polling /readyz stops sending here; then aiohttp's graceful exit stops
        # accepting and gives in-flight requests drain_timeout_s.
        loop.add_signal_handler(signal.SIGTERM, begin_drain, app, loop)
        if on_startup is not None:
            on_startup(app, loop)

    app.on_startup.append(install_handlers)
    bound = False

    async def say_draining(app: web.Application) -> None:
        # aiohttp has stopped listening. A socket that was never bound (the port is taken)
        # drained nothing: its one line is the bind error.
        if bound:
            log.info("draining: finishing in-flight requests")

    app.on_shutdown.append(say_draining)

    def listening() -> None:
        # Called once the store is open and the socket bound, not before.
        nonlocal bound
        bound = True
        log.info(
            "gateway listening on http://%s:%s/api/v2/ (store %s, pid %d)",
            http_host(options.host),
            options.port,
            config.storage.backend,
            os.getpid(),
        )
        if on_ready is not None:
            on_ready()

    runner = EnvelopeAppRunner(
        app, access_log=None, shutdown_timeout=config.server.drain_timeout_s, handle_signals=True
    )
    _run(_serve(runner, options, reuse_port, listening))
    if bound:  # a worker stopped while still starting never served: nothing stopped
        log.info("gateway stopped (pid %d)", os.getpid())


async def _serve(
    runner: web.AppRunner, options: Options, reuse_port: bool, listening: Callable[[], None]
) -> None:
    await runner.setup()
    try:
        site = web.TCPSite(runner, options.host, options.port, reuse_port=reuse_port)
        await site.start()
        listening()
        await asyncio.Event().wait()  # until GracefulExit (SIGTERM/SIGINT) ends the loop
    finally:
        await runner.cleanup()


def _run(main: Coroutine[Any, Any, None]) -> None:
    """What ``web.run_app`` does with its loop, for a runner of our own (``EnvelopeAppRunner``):
    run until GracefulExit, then let the serving task clean up and close the loop."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    task = loop.create_task(main)
    try:
        loop.run_until_complete(task)
    except (GracefulExit, KeyboardInterrupt):
        pass
    finally:
        task.cancel()
        loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
        rest = asyncio.all_tasks(loop)
        for other in rest:
            other.cancel()
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        asyncio.set_event_loop(None)


def begin_drain(app: web.Application, loop: asyncio.AbstractEventLoop) -> None:
    flush_access_log()
    state = app[STATE]
    if state.draining:
        return
    state.draining = True
    grace = state.config.server.drain_grace_s
    log.info("SIGTERM: draining; /readyz answers 503; closing the listener in %.1f s", grace)
    loop.call_later(grace, _graceful_exit)  # 0: on the loop's next turn


def _graceful_exit() -> None:
    raise GracefulExit()  # a SystemExit: the loop lets it through, run_app shuts down
