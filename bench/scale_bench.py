"""Many teams: what a scrape, a reload and a burst of SIGHUPs cost a real gateway process.

    python bench/scale_bench.py                # 10 and 5,000 teams
    python bench/scale_bench.py --teams 2000   # other counts
    python bench/scale_bench.py --quick        # CI smoke: 10 and 200 teams, judges nothing

Per team count, one `gateway serve` (one worker, SQLite, no upstream needed):

    scrape ms      one GET /metrics, median of 5 spaced 1.2 s apart (size and lines beside it)
    healthz p99    GET /healthz every 10 ms on one keep-alive connection, alone and then while
                   another client scrapes /metrics every 0.5 s (p50 / p99, ms)
    reload ms      SIGHUP to the "reloaded" log line
    20 SIGHUPs     a burst: reloads actually run (coalesced), the slowest /healthz in the 2 s
                   after, and the time from SIGTERM to exit
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

GATEWAY = [str(Path(sys.executable).with_name("gateway"))]
if not Path(GATEWAY[0]).exists():
    GATEWAY = [sys.executable, "-m", "gateway"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, teams: int, port: int) -> None:
    lines = [
        "[server]", 'host = "127.0.0.1"', f"port = {port}", "",
        "[upstream]", 'url = "http://127.0.0.1:9/api/v2/"', 'api_key_env = "BENCH_KEY"', "",
        "[storage]", 'backend = "sqlite"', f'path = "{path.with_suffix(".db")}"', "",
    ]
    for i in range(teams):
        lines += [f"[teams.team{i:05d}]", f'keys = ["bench-key-{i:05d}-0123456789"]',
                  f"quota = {1000 + i}", ""]
    path.write_text("\n".join(lines))


class Gateway:
    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.log = log
        self.base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "BENCH_KEY": "bench-upstream-key"}
        with log.open("wb") as out:
            self.proc = subprocess.Popen([*GATEWAY, "serve", "--config", str(config)], env=env,
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.base}/readyz", timeout=1).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise TimeoutError(log.read_text())

    def reloads(self) -> int:
        return self.log.read_text().count("reloaded ")

    def stop(self) -> float:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        return time.monotonic() - started


def healthz_latencies(base: str, count: int) -> list[float]:
    out = []
    with requests.Session() as s:
        for _ in range(count):
            started = time.perf_counter()
            s.get(f"{base}/healthz", timeout=10).raise_for_status()
            out.append(time.perf_counter() - started)
            time.sleep(0.01)
    return out


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def scrape_every(base: str, interval: float, stop: threading.Event) -> None:
    with requests.Session() as s:
        while not stop.is_set():
            started = time.monotonic()
            s.get(f"{base}/metrics", timeout=30).raise_for_status()
            stop.wait(max(0.0, interval - (time.monotonic() - started)))


def measure(teams: int, samples: int, tmp: Path) -> dict[str, str]:
    port = free_port()
    config = tmp / f"teams-{teams}.toml"
    write_config(config, teams, port)
    gw = Gateway(config, port, tmp / f"teams-{teams}.log")
    try:
        times, body = [], b""
        for _ in range(5):
            time.sleep(1.2)
            started = time.perf_counter()
            body = requests.get(f"{gw.base}/metrics", timeout=30).content
            times.append(time.perf_counter() - started)
        alone = healthz_latencies(gw.base, samples)
        stop = threading.Event()
        scraper = threading.Thread(target=scrape_every, args=(gw.base, 0.5, stop))
        scraper.start()
        try:
            scraped = healthz_latencies(gw.base, samples)
        finally:
            stop.set()
            scraper.join()
        before = gw.reloads()
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGHUP)
        while gw.reloads() == before:
            time.sleep(0.002)
        reload_ms = (time.monotonic() - started) * 1000
        time.sleep(0.5)
        before = gw.reloads()
        for _ in range(20):
            gw.proc.send_signal(signal.SIGHUP)
        after_burst = healthz_latencies(gw.base, 100)  # about 2 s
        time.sleep(1.0)
        ran = gw.reloads() - before
    finally:
        exit_s = gw.stop()
    lines = body.count(b"\n")
    return {
        "teams": f"{teams:,}",
        "scrape ms": f"{statistics.median(times) * 1000:.0f}",
        "size": f"{len(body) / 1024:.0f} KB, {lines:,} lines",
        "healthz p50/p99 alone": f"{p(alone, 0.5):.1f} / {p(alone, 0.99):.1f}",
        "... scraped every 0.5 s": f"{p(scraped, 0.5):.1f} / {p(scraped, 0.99):.1f}",
        "reload ms": f"{reload_ms:.0f}",
        "20 SIGHUPs: reloads, max healthz ms, SIGTERM exit s":
            f"{ran}, {max(after_burst) * 1000:.0f}, {exit_s:.2f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teams", type=int, nargs="*", default=[10, 5000],
                        help="team counts to measure (default: 10 5000)")
    parser.add_argument("--samples", type=int, default=400,
                        help="/healthz requests per phase (default: 400)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 10 and 200 teams, 50 samples")
    args = parser.parse_args()
    counts, samples = ([10, 200], 50) if args.quick else (args.teams, args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(n, samples, Path(tmp)) for n in counts]
    for column in rows[0]:
        print(f"{column:>52}  " + "  ".join(f"{row[column]:>24}" for row in rows))


if __name__ == "__main__":
    main()
