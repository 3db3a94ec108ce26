"""A/B of two checkouts in one run: cache hits and the miss path, measured side by side.

    python bench/ab.py --before ../old-checkout            # 5 alternating rounds
    python bench/ab.py --before ../old-checkout --quick    # 1 round, short runs

`bench/run.py --gateway-src` measures another checkout in a separate run, minutes apart,
and this machine's speed moves by a third from one minute to the next. Here both gateways
(the shipped settings, as bench/run.py starts them) run at once, beside one simulator, and
each round measures "before" and "after" back to back, the order swapped every round:

    hits   wrk -c16 on a 100 KB cache hit, req/s of each
    miss   new 100 KB and 10 KB images, one at a time; per round the p50 of each gateway
           minus the p50 of the same images sent straight to the simulator in that round

Prints one table; the medians of the rounds, their spread, and after / before.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import (
    Bench,
    Table,
    _miss_run,
    human,
    multipart,
    percentile,
    warm_hit,
    wrk,
)
from gateway.devtools.sample_images import make_png_of_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the other checkout")
    parser.add_argument("--after", type=Path, help="another checkout instead of this one")
    parser.add_argument("--hits-only", action="store_true", help="leave out the miss rows")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 round, 1 s runs")
    parser.add_argument("--secs", type=float, default=5.0)
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    secs = 1.0 if args.quick else args.secs
    b = Bench(argparse.Namespace(quick=args.quick, secs=secs, gateway_src=None,
                                 event_loop="auto", wait_quiet=0))
    try:
        b.src = args.before.resolve()
        before = b.gateway("before")
        b.src = args.after.resolve() if args.after else None
        after = b.gateway("after")
        proxy = b.floor("proxy", proxy_to=b.sim.url)
        b.sim.control("control", latency_ms=0)
        t = Table("hit", ["measure", "before", "after", "after / before",
                          "rounds (before | after)"])
        image = make_png_of_size(100_000, 4242)
        body = multipart(image)
        path = b.body_file(body)
        for gw, label in ((before, "before"), (after, "after")):
            if not warm_hit(t, gw, body, label):
                print("\n".join(t.problems), file=sys.stderr)
                return 1
            wrk(gw, 16, 1, body=path)
        hits: dict[str, list[float]] = {"before": [], "after": []}
        miss: dict[int, dict[str, list[float]]] = {s: {"before": [], "after": []}
                                                   for s in (10_000, 100_000)}
        n = 20 if args.quick else 60
        for r in range(rounds):
            order = [("before", before), ("after", after)]
            if r % 2:
                order.reverse()
            for name, gw in order:
                hits[name].append(wrk(gw, 16, secs, body=path).rps)
            for size in [] if args.hits_only else miss:
                for name, gw in order:
                    direct, via, _, problems = asyncio.run(
                        _miss_run(gw, b.sim, proxy, size, n, 50_000 + size + r * 1000
                                  + (500 if name == "after" else 0), 5))
                    if problems:
                        print(f"{name}: {problems[:3]}", file=sys.stderr)
                    miss[size][name].append(percentile(via, 50) - percentile(direct, 50))

        def row(measure: str, values: dict[str, list[float]], fmt: str, scale: float) -> None:
            med = {k: statistics.median(v) for k, v in values.items()}
            t.add(measure, fmt.format(med["before"] * scale), fmt.format(med["after"] * scale),
                  f"{med['after'] / med['before']:.2f}",
                  " / ".join(fmt.format(x * scale) for x in values["before"]) + " | "
                  + " / ".join(fmt.format(x * scale) for x in values["after"]))

        row(f"hit req/s ({human(len(image))}, 16 conns)", hits, "{:,.0f}", 1)
        for size, values in [] if args.hits_only else miss.items():
            row(f"miss added p50 ({human(size)})", values, "{:.2f} ms", 1000)
        print("| " + " | ".join(t.columns) + " |")
        print("|" + "|".join("---" for _ in t.columns) + "|")
        for cells in t.rows:
            print("| " + " | ".join(cells) + " |")
        return 0
    finally:
        b.close()


if __name__ == "__main__":
    raise SystemExit(main())
