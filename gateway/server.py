"""``gateway serve``: load config, run until SIGTERM/SIGINT, drain, exit; SIGHUP reloads."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_runner import GracefulExit

from gateway.app import create_app
from gateway.config import ConfigError, load_config
from gateway.event_loop import use_event_loop
from gateway.logs import flush_access_log, setup_logging, start_access_log
from gateway.state import STATE

log = logging.getLogger("gateway")


def reload_config(app: web.Application) -> tuple[bool, str]:
    """Re-read the config file; a bad one is refused and the running one kept."""
    flush_access_log()
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
        message += f" (changes to {', '.join(restart)} apply after a restart)"
    log.info(message)
    return True, message


def serve(
    config_path: str,
    *,
    host: str | None = None,
    port: int | None = None,
    log_format: str = "text",
    log_level: str = "INFO",
) -> int:
    config = load_config(config_path)
    setup_logging(log_format, log_level)
    options = _Options(
        config_path,
        host or config.server.host,
        config.server.port if port is None else port,
        log_format,
        log_level,
    )
    if config.server.workers > 1:
        return _supervise(options, config.server.workers)
    _run_worker(options, reuse_port=False)
    return 0


@dataclass(frozen=True)
class _Options:
    config_path: str
    host: str
    port: int
    log_format: str
    log_level: str


def _run_worker(options: _Options, *, reuse_port: bool) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until on_startup handles it (see cli)
    config = load_config(options.config_path)
    use_event_loop(config.server.event_loop)
    start_access_log(config.server.access_log_buffer_kb, config.server.access_log_flush_ms)
    app = create_app(config)

    async def on_startup(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, reload_config, app)
        # Replaces aiohttp's SIGTERM handler: mark the gateway draining first (/readyz 503,
        # new API requests 503) while still listening for server.drain_grace_s, so a load
        # balancer polling /readyz stops sending here; then aiohttp's graceful exit stops
        # accepting and gives in-flight requests drain_timeout_s.
        loop.add_signal_handler(signal.SIGTERM, _begin_drain, app, loop)

    app.on_startup.append(on_startup)

    def listening(_message: str) -> None:
        # run_app calls this once the store is open and the socket bound, not before.
        log.info(
            "gateway listening on http://%s:%s/api/v2/ (store %s, pid %d)",
            options.host,
            options.port,
            config.storage.backend,
            os.getpid(),
        )

    web.run_app(
        app,
        host=options.host,
        port=options.port,
        print=listening,
        access_log=None,
        shutdown_timeout=config.server.drain_timeout_s,
        handle_signals=True,
        reuse_port=reuse_port,
    )
    log.info("gateway stopped (pid %d)", os.getpid())


def _begin_drain(app: web.Application, loop: asyncio.AbstractEventLoop) -> None:
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


def _worker_main(options: _Options) -> None:
    setup_logging(options.log_format, options.log_level)
    try:
        _run_worker(options, reuse_port=True)
    except KeyboardInterrupt:
        pass


def _supervise(options: _Options, workers: int) -> int:
    """N worker processes share the port (SO_REUSEPORT) and the store; quotas stay exact
    because reservations are atomic in the store. Metrics are whole across workers through
    prometheus-client's multiprocess mode, set up here before any worker imports it."""
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    context = multiprocessing.get_context("spawn")
    procs: list[multiprocessing.process.BaseProcess] = []
    stopping = False

    def spawn() -> multiprocessing.process.BaseProcess:
        proc = context.Process(target=_worker_main, args=(options,), daemon=False)
        proc.start()
        return proc

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    procs.extend(spawn() for _ in range(workers))
    log.info("supervising %d workers on port %d", workers, options.port)
    try:
        while not stopping:
            for i, proc in enumerate(procs):
                if not proc.is_alive() and not stopping:
                    log.error(
                        "worker pid %s exited with %s; starting another", proc.pid, proc.exitcode
                    )
                    _mark_dead(proc.pid)
                    procs[i] = spawn()
            time.sleep(0.2)
        for proc in procs:
            proc.join()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _mark_dead(pid: int | None) -> None:
    if pid is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
