"""Logging setup: plain text or one JSON object a line. Never a key in either."""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _quoted({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line


ACCESS = logging.getLogger("gateway.access")


def _quoted(fields: dict[str, Any]) -> dict[str, Any]:
    """A client's request id may hold spaces, quotes or ``=``: in a ``key=value`` line it is
    written as a JSON string, so the line still splits into its fields. Other values can't."""
    rid = fields.get("request_id")
    if isinstance(rid, str) and (" " in rid or '"' in rid or "=" in rid):
        return {**fields, "request_id": json.dumps(rid)}
    return fields


# Lines waiting (in memory, and in the write under way) past this many buffers are dropped
# and counted, so a sink that stops taking them costs bounded memory and no request time.
PENDING_BUFFERS = 32


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_text(stream: TextIO, data: bytes) -> None:
    stream.write(data.decode("utf-8"))
    stream.flush()


class AccessLog:
    """The access log: one line per request, formatted here (the line the formatters above
    make, ~9 us text / ~16 us JSON instead of the ~41-42 us of a LogRecord, its handler and
    formatter) and appended to a buffer in memory; a writer thread writes the buffer in one
    ``write`` when it holds ``buffer_kb``, and at least every ``flush_ms`` (nginx's
    ``access_log ... buffer=32k flush=1s``). The request path never waits on the sink: past
    ``PENDING_BUFFERS`` buffers waiting, lines are dropped and counted (``dropped``).
    ``flush()`` writes at once (SIGHUP, SIGTERM), ``close()`` at exit. A ``kill -9`` loses
    at most the last ``flush_ms`` of lines. Figures: ``python bench/log_bench.py``."""

    def __init__(
        self,
        fmt: str,
        sink: Callable[[bytes], object],
        *,
        buffer_kb: int = 32,
        flush_ms: int = 1000,
    ) -> None:
        self.json = fmt == "json"
        self._sink = sink
        self._second = -1
        self._stamp = ""
        self._lines: deque[str] = deque()
        self._buffer = buffer_kb * 1024
        self._bound = PENDING_BUFFERS * self._buffer
        self._interval = flush_ms / 1000
        # Each counter has one writer, so neither needs a lock: characters appended and
        # lines dropped by the request path, characters written and lines lost to a failed
        # write by the writer thread. Waiting = appended - written (the write under way too).
        self._appended = 0
        self._written = 0
        self._dropped = 0
        self._failed = 0
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="gateway-access-log", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Lines never written: dropped while the sink was behind, or lost by a failed write."""
        return self._dropped + self._failed

    def _time(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = (
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
                if self.json
                else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            )
        msecs = int((now - second) * 1000)
        return f"{self._stamp}.{msecs:03d}Z" if self.json else f"{self._stamp},{msecs:03d}"

    def line(self, fields: dict[str, Any]) -> str:
        now = time.time()
        if self.json:
            head = {"time": self._time(now), "level": "info", "logger": ACCESS.name}
            line = json.dumps({**head, "message": "request", **fields}, separators=(",", ":"))
        else:
            pairs = " ".join([f"{k}={v}" for k, v in _quoted(fields).items()])
            line = f"{self._time(now)} INFO {ACCESS.name}: request {pairs}"
        return line + "\n"

    def write(self, fields: dict[str, Any]) -> None:
        waiting = self._appended - self._written
        if waiting > self._bound:
            self._dropped += 1
            return
        line = self.line(fields)
        self._lines.append(line)
        self._appended += len(line)
        if waiting + len(line) >= self._buffer and not self._wake.is_set():
            self._wake.set()

    def flush(self) -> None:
        """Have the writer write what is buffered now (it does not wait for the write)."""
        self._wake.set()

    def close(self, timeout: float = 2.0) -> None:
        """Write what is buffered and stop the writer; a sink that takes nothing for
        ``timeout`` seconds keeps the rest."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            closing = self._closing  # read first: every line appended before close() is out
            self._write_waiting()
            if closing:
                return

    def _write_waiting(self) -> None:
        lines = []
        size = 0
        take = self._lines.popleft
        while True:
            try:
                line = take()
            except IndexError:
                break
            lines.append(line)
            size += len(line)
        if not lines:
            return
        try:
            self._sink("".join(lines).encode("utf-8", "backslashreplace"))
        except (OSError, ValueError):  # the sink is gone (EPIPE, closed): the lines are lost
            self._failed += len(lines)
        finally:
            self._written += size


_format = "text"
_access: AccessLog | None = None


def log_access(fields: dict[str, Any]) -> None:
    """One access line: into the batched log once ``start_access_log`` ran (the command),
    else through logging (embedded use, tests with caplog)."""
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    if _access is not None:
        _access.write(fields)
    else:
        ACCESS.info("request", extra=fields)


def access_lines_dropped() -> int:
    """Access lines this process never wrote (``gateway_access_log_dropped_total``)."""
    return _access.dropped if _access is not None else 0


def flush_access_log() -> None:
    """SIGHUP and SIGTERM: what is buffered goes out now, not at the next flush interval."""
    if _access is not None:
        _access.flush()


def start_access_log(buffer_kb: int, flush_ms: int) -> None:
    """The serving process's access log: batched to stderr, written at exit too."""
    global _access
    if _access is not None:
        return
    stream = sys.stderr
    stream.flush()
    try:
        sink: Callable[[bytes], object] = functools.partial(write_all, stream.fileno())
    except (AttributeError, OSError):  # stderr replaced by an object with no descriptor
        sink = functools.partial(_write_text, stream)
    _access = AccessLog(_format, sink, buffer_kb=buffer_kb, flush_ms=flush_ms)
    atexit.register(_access.close)


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    global _format
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    _format = fmt
