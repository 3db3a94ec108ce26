"""Store operations on the request path, per call: the event loop's own connection vs the
writer thread, side by side in one run.

    python bench/store_bench.py            # 2,000 calls of each
    python bench/store_bench.py --quick    # CI smoke: 50 calls, judges nothing

Columns, in microseconds per awaited call (one at a time, as a lone miss makes them):

    reserve        QuotaLedger's one unit: the INSERT ... ON CONFLICT ... RETURNING and the
                   pending reservation, one BEGIN IMMEDIATE transaction
    save + settle  the result row and the settlement of its reservation, one transaction
    lookup         the cache-hit read (inline read connection in both rows)

"inline" is the shipped path for synchronous = normal: the transaction runs on the event loop
when no other connection holds the write lock. "writer thread" is the same store with the
inline writer switched off, every transaction one round trip to the writer thread (the path
for synchronous = full, and the fallback when the lock is held elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from gateway.store.base import CachedResult
from gateway.store.sqlite import SQLiteStore


async def measure(path: Path, n: int, *, inline: bool) -> tuple[float, float, float]:
    store = SQLiteStore(str(path))
    await store.open()
    if not inline:
        assert store._inline_writer is not None
        store._inline_writer.close()
        store._inline_writer = None
    try:
        data = b'{"error":0,"type":"objects","objects":[' + b"x" * 400 + b'],"quota":'
        t0 = time.perf_counter()
        held = [await store.reserve("t", "2026-12", 10**9, at=time.time()) for _ in range(n)]
        t1 = time.perf_counter()
        for i, reservation in enumerate(held):
            result = CachedResult(key=f"k{i}", content_hash=f"{i:032x}", type="objects",
                                  params="max_labels=5&min_confidence=10", scope="",
                                  data_prefix=data, created_at=time.time())
            await store.save_result(result, max_bytes=10**9, settle=reservation)
        t2 = time.perf_counter()
        for i in range(n):
            await store.lookup(f"k{i}", "t", "2026-12")
        t3 = time.perf_counter()
    finally:
        await store.close()
    return tuple(1e6 * d / n for d in (t1 - t0, t2 - t1, t3 - t2))  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="50 calls, for CI")
    args = parser.parse_args()
    n = 50 if args.quick else args.calls
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, inline in (("inline", True), ("writer thread", False)):
            rows.append((name, *asyncio.run(measure(Path(tmp) / f"{name[0]}.db", n,
                                                    inline=inline))))
    print(f"{n} calls each, us per call")
    print(f"{'path':<14} {'reserve':>8} {'save + settle':>14} {'lookup':>7}")
    for name, reserve, save, lookup in rows:
        print(f"{name:<14} {reserve:>8.0f} {save:>14.0f} {lookup:>7.0f}")


if __name__ == "__main__":
    main()
