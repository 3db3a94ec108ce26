"""One access-log line, per request: gateway.logs.AccessLog against the logging module.

    python bench/log_bench.py            # 50,000 lines each
    python bench/log_bench.py --quick    # CI smoke: 500 lines, judges nothing

Both write the same line (tests/test_logs.py) to /dev/null with a flush per line, as the
gateway does to its stderr. Microseconds per line.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import time

from gateway.logs import AccessLog, JsonFormatter, TextFormatter

FIELDS = {"team": "search", "type": "objects", "status": 200, "cache": "hit",
          "hash": "abcdef012345", "bytes": 100000, "gateway_ms": 0.31, "upstream_ms": None}


def per_line(write: object, n: int) -> float:
    assert callable(write)
    t0 = time.perf_counter()
    for _ in range(n):
        write()
    return 1e6 * (time.perf_counter() - t0) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--quick", action="store_true", help="500 lines, for CI")
    args = parser.parse_args()
    n = 500 if args.quick else args.lines
    rows = []
    with open(os.devnull, "w") as sink:
        for fmt, formatter in (("text", TextFormatter()), ("json", JsonFormatter())):
            handler = logging.StreamHandler(sink)
            handler.setFormatter(formatter)
            logger = logging.getLogger(f"bench.{fmt}")
            logger.handlers[:] = [handler]
            logger.propagate = False
            logger.setLevel(logging.INFO)
            via_logging = per_line(functools.partial(logger.info, "request", extra=FIELDS), n)
            direct = AccessLog(fmt, sink)
            rows.append((fmt, via_logging, per_line(functools.partial(direct.write, FIELDS), n)))
    print(f"{n} lines each, us per line")
    print(f"{'format':<7} {'logging':>8} {'AccessLog':>10}")
    for fmt, via_logging, direct_us in rows:
        print(f"{fmt:<7} {via_logging:>8.1f} {direct_us:>10.1f}")


if __name__ == "__main__":
    main()
