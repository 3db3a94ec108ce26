"""One access-log line, as the request path pays for it: gateway.obs.logs.AccessLog (batched)
against a write and flush per line, and against the logging module.

    python bench/log_bench.py            # 50,000 lines each
    python bench/log_bench.py --quick    # CI smoke: 500 lines, judges nothing

All write the same line (tests/obs/test_logs.py) to a real file in a temporary directory, as
``gateway serve 2>> gateway.log`` does. Microseconds per line on the calling thread: the
batched log formats and appends there, its writer thread writes (and is waited for at the
end, so a writer that cannot keep up shows here too).
"""

from __future__ import annotations

import argparse
import functools
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.obs.logs import AccessLog, JsonFormatter, TextFormatter, write_all

FIELDS = {"team": "search", "type": "objects", "status": 200, "cache": "hit",
          "hash": "abcdef012345", "bytes": 100000, "gateway_ms": 0.31, "upstream_ms": None}


def per_line(write: Callable[[], object], n: int, done: Callable[[], object] = lambda: None,
             ) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        write()
    done()
    return 1e6 * (time.perf_counter() - t0) / n


def flushed_per_line(log: AccessLog, stream: Any) -> Callable[[], None]:
    """What the gateway did before batching: format, write, flush, per request."""
    def write() -> None:
        stream.write(log.line(FIELDS))
        stream.flush()
    return write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--quick", action="store_true", help="500 lines, for CI")
    args = parser.parse_args()
    n = 500 if args.quick else args.lines
    rows = []
    with tempfile.TemporaryDirectory(prefix="log-bench-") as tmp:
        path = Path(tmp) / "gateway.log"
        with path.open("a") as stream:
            for fmt, formatter in (("text", TextFormatter()), ("json", JsonFormatter())):
                handler = logging.StreamHandler(stream)
                handler.setFormatter(formatter)
                logger = logging.getLogger(f"bench.{fmt}")
                logger.handlers[:] = [handler]
                logger.propagate = False
                logger.setLevel(logging.INFO)
                via_logging = per_line(functools.partial(logger.info, "request", extra=FIELDS), n)
                stream.flush()
                sink = functools.partial(write_all, stream.fileno())
                flushed = per_line(flushed_per_line(AccessLog(fmt, sink), stream), n)
                batched_log = AccessLog(fmt, sink)
                batched = per_line(functools.partial(batched_log.write, FIELDS), n,
                                   batched_log.close)
                assert batched_log.dropped == 0
                rows.append((fmt, via_logging, flushed, batched))
        lines = sum(1 for _ in path.open())
        assert lines == 6 * n, f"{lines} lines written, expected {6 * n}"
    print(f"{n} lines each to a file, us per line")
    print(f"{'format':<7} {'logging':>8} {'write+flush':>12} {'batched':>8}")
    for fmt, via_logging, flushed, batched in rows:
        print(f"{fmt:<7} {via_logging:>8.1f} {flushed:>12.1f} {batched:>8.1f}")


if __name__ == "__main__":
    main()
