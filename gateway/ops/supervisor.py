"""``server.workers = N``: a supervisor process and N workers sharing the port and the store.

Quotas stay exact because reservations are atomic in the store. Metrics are whole across
workers through prometheus-client's multiprocess mode, set up here before any worker imports it;
rate limits through a table of buckets every worker maps (``gateway.core.ratelimit``), in the same
folder.

- A worker dies with its supervisor: on Linux the kernel sends it SIGTERM when the supervisor
  ends (``PR_SET_PDEATHSIG``), anywhere it also watches multiprocessing's parent sentinel (a
  pipe the supervisor holds). Either way it drains as on SIGTERM (new requests 503), exits, and
  the last worker out removes the metrics folder the dead supervisor could not.
- A SIGHUP never kills a starting worker: the supervisor blocks SIGHUP while it starts one (the
  mask survives the exec), the worker ignores it first thing and unblocks it once its reload
  handler is in place.
- A worker that exits before it is ready is started again after 0.5 s, 1 s, 2 s; the
  fourth failed start in a row of the same worker stops the gateway (exit 1, one line saying why).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

from gateway.config import Config, ConfigError
from gateway.core.ratelimit import SHARED_BUCKETS_ENV
from gateway.ops.occupancy import STORE_ID, WORKER_OF, store_id
from gateway.ops.server import Options, begin_drain, run_worker
from gateway.store.base import StoreUnavailable

log = logging.getLogger("gateway")

MAX_FAILED_STARTS = 4
FIRST_RETRY_S = 0.5
STARTUP_FAILED = 3  # a worker's exit code for a startup failure it has reported
_PR_SET_PDEATHSIG = 1
Connection = multiprocessing.connection.Connection


@dataclass
class _Slot:
    proc: multiprocessing.process.BaseProcess | None = None
    ready: bool = False
    failures: int = 0
    start_at: float = 0.0
    reason: str = ""


def supervise(options: Options, config: Config) -> int:
    workers = config.server.workers
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    # Rate-limit buckets every worker maps (the Redis store keeps its own; see ratelimit).
    os.environ[SHARED_BUCKETS_ENV] = os.path.join(metrics_dir, "rate-buckets")
    # Started before the markers below, so that only workers carry them (see occupancy).
    resource_tracker.ensure_running()
    os.environ[WORKER_OF] = str(os.getpid())
    os.environ[STORE_ID] = store_id(config.storage)
    context = multiprocessing.get_context("spawn")
    reports, report_end = context.Pipe(duplex=False)
    slots = [_Slot() for _ in range(workers)]
    stopping = False

    def spawn(slot: _Slot) -> None:
        proc = context.Process(target=worker_main, args=(options, report_end), daemon=False)
        # Blocked, not ignored: a SIGHUP meant for the supervisor is delivered once it unblocks.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        slot.proc, slot.ready, slot.reason = proc, False, ""

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for slot in slots:
            proc = slot.proc
            if proc is not None and proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for slot in slots:
        spawn(slot)
    log.info("supervising %d workers on port %d", workers, options.port)
    gave_up = ""
    try:
        while not stopping and not gave_up:
            now = time.monotonic()
            for slot in slots:
                proc = slot.proc
                if proc is None:
                    if now >= slot.start_at and not stopping:
                        spawn(slot)
                    continue
                if proc.is_alive() or stopping:
                    continue
                _take_reports(reports, slots)
                _mark_dead(proc.pid)
                slot.proc = None
                if slot.ready:
                    log.error(
                        "worker pid %s exited with %s; starting another", proc.pid, proc.exitcode
                    )
                    slot.failures, slot.start_at = 0, now
                    continue
                slot.failures += 1
                reason = slot.reason or f"exited with {proc.exitcode} while starting"
                if slot.failures >= MAX_FAILED_STARTS:
                    gave_up = (
                        f"{reason} (a worker failed to start {slot.failures} times in "
                        "a row; giving up)"
                    )
                    break
                delay = FIRST_RETRY_S * 2 ** (slot.failures - 1)
                log.warning(
                    "worker pid %s failed to start: %s; starting another in %g s",
                    proc.pid,
                    reason,
                    delay,
                )
                slot.start_at = now + delay
            if gave_up:
                break
            sentinels = [s.proc.sentinel for s in slots if s.proc is not None]
            multiprocessing.connection.wait([reports, *sentinels], timeout=0.2)
            _take_reports(reports, slots)
        if gave_up:
            for slot in slots:
                if slot.proc is not None and slot.proc.is_alive() and slot.proc.pid is not None:
                    os.kill(slot.proc.pid, signal.SIGTERM)
        for slot in slots:
            if slot.proc is not None:
                slot.proc.join()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if gave_up:
        print(f"gateway: {gave_up}", file=sys.stderr)
        return 1
    return 0


def _take_reports(reports: Connection, slots: list[_Slot]) -> None:
    while reports.poll():
        kind, pid, reason = reports.recv()
        for slot in slots:
            if slot.proc is not None and slot.proc.pid == pid:
                slot.ready = kind == "ready"
                slot.reason = reason


def _mark_dead(pid: int | None) -> None:
    if pid is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


# -- in the worker ----------------------------------------------------------------------------
def worker_main(options: Options, report: Connection) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # first: SIGHUP is blocked until ready
    supervisor = int(os.environ.get(WORKER_OF, "0")) or os.getppid()
    _die_with_parent()
    if os.getppid() != supervisor:  # it died before the line above
        _leave_metrics_dir()
        return
    from gateway.obs.logs import setup_logging

    setup_logging(options.log_format, options.log_level)
    ready = False

    def on_ready() -> None:
        nonlocal ready
        ready = True
        report.send(("ready", os.getpid(), ""))

    def watch_parent(app: Any, loop: Any) -> None:
        parent = multiprocessing.parent_process()
        if parent is None or parent.sentinel is None:
            return
        sentinel = parent.sentinel

        def parent_gone() -> None:
            loop.remove_reader(sentinel)
            # The kernel's SIGTERM for the same death may come a moment later: held back, it
            # can't find the loop closed (SIGTERM's default again) and end us before cleanup.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            log.warning("the supervisor is gone: draining and exiting")
            begin_drain(app, loop)

        loop.add_reader(sentinel, parent_gone)  # readable (EOF) once the supervisor is gone

    try:
        run_worker(options, reuse_port=True, on_ready=on_ready, on_startup=watch_parent)
    except KeyboardInterrupt:
        pass
    except (ConfigError, StoreUnavailable, OSError) as exc:
        if ready:
            raise
        # A known startup failure: one line, through the supervisor, not a traceback.
        report.send(("failed", os.getpid(), _failure_line(exc)))
        sys.exit(STARTUP_FAILED)
    finally:
        if os.getppid() != supervisor:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            _leave_metrics_dir()


def _failure_line(exc: BaseException) -> str:
    if isinstance(exc, ConfigError):
        return f"config error: {exc}"
    if isinstance(exc, StoreUnavailable):
        return f"store error: {exc}"
    return str(getattr(exc, "strerror", None) or exc)


def _die_with_parent() -> None:
    """Linux: the kernel sends this process SIGTERM when its parent ends."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _leave_metrics_dir() -> None:
    """An orphaned worker's exit: remove its own metrics files; the last live worker out (the
    others' files name only dead pids) removes the folder. Under a lock on the folder, so two
    workers leaving at once can't both see the other still there."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path or not os.path.isdir(path):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        others = set()
        for file in Path(path).glob("*.db"):
            pid = file.stem.rpartition("_")[2]
            if pid == str(os.getpid()):
                file.unlink(missing_ok=True)
            elif pid.isdigit():
                others.add(int(pid))
        if not any(_alive(pid) for pid in others):
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:  # a zombie has exited: it holds no metrics any more
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
