"""A bounded soak: mixed traffic from several teams while the upstream keeps failing.

Starts the simulator in this process and ``gateway serve`` as a subprocess on free loopback
ports, plays traffic for ``--seconds`` (repeats, unique images, bad inputs, Cache-Control
variants, type=cache lookups) while switching simulator faults through ``/_sim/control``, and
samples the gateway's RSS and open fds every second. Then it prints a table and checks:

* every request got an answer, and every answer is the envelope with status == HTTP status;
* no 500;
* per team, the charged count equals the successful answers the upstream served (not hits)
  plus the calls it may have billed without an answer (the ledger's undelivered column);
* RSS growth after warm-up is bounded (+50 MB) and the open fds stay flat (+10);
* the gateway logged no unexpected error and drained cleanly on SIGTERM.

Exit status 1 if a check fails.

    python bench/soak.py                 # 120 s, 8 clients
    python bench/soak.py --seconds 600 --clients 16
    python bench/soak.py --quick         # CI: 8 s, 3 clients
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import xxhash

from gateway.devtools.sample_images import make_jpeg, make_png
from gateway.devtools.sim import start_sim

UPSTREAM_KEY = "soak-upstream-key"
KEY_ENV = "SOAK_UPSTREAM_KEY"
TEAMS = {"alpha": ("alpha-team-key", 1_000_000), "beta": ("beta-team-key", 1_000_000),
         "gamma": ("gamma-team-key", 20)}  # gamma runs out of quota: 402s are played too
POOL = 30  # images every client repeats
ENVELOPE_STATUSES = {200, 300, 400, 401, 402, 412, 413, 415, 420, 429, 430, 502, 503, 504}
FAULTS = [("500", 0), ("timeout", 0), ("reset", 0), ("garbage", 0), ("503", 0), ("none", 300)]
RSS_GROWTH_MB = 50
FD_GROWTH = 10


@dataclass
class Tally:
    by_status: Counter[str] = field(default_factory=Counter)
    by_cache: Counter[str] = field(default_factory=Counter)
    by_action: Counter[str] = field(default_factory=Counter)
    served: Counter[str] = field(default_factory=Counter)  # team -> 200s the upstream served
    problems: list[str] = field(default_factory=list)
    sent: int = 0
    enveloped: int = 0

    def problem(self, text: str) -> None:
        if len(self.problems) < 10:
            self.problems.append(text)


@dataclass
class Sample:
    at: float
    rss_kb: int
    fds: int


def outcome(cache_status: str | None) -> str:
    if cache_status is None:
        return "none"
    if "detail=coalesced" in cache_status:
        return "coalesced"
    if "stale-if-error" in cache_status:
        return "stale"
    if "; hit" in cache_status:
        return "hit"
    if "fwd=request" in cache_status:
        return "forwarded"
    return "miss"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def image_of(seed: int) -> bytes:
    return make_jpeg(seed) if seed % 4 == 0 else make_png(seed)


def write_config(path: Path, sim_port: int, port: int, db: Path) -> None:
    lines = [
        "[server]", 'host = "127.0.0.1"', f"port = {port}", "access_log = false",
        "drain_timeout_s = 5", "",
        "[upstream]", f'url = "http://127.0.0.1:{sim_port}/api/v2/"', f'api_key_env = "{KEY_ENV}"',
        "timeout_s = 1.0", "breaker_failures = 5", "breaker_cooldown_s = 0.5", "",
        "[storage]", 'backend = "sqlite"', f'path = "{db}"', "",
        "[quota]", 'period = "total"', "",
    ]
    for name, (key, quota) in TEAMS.items():
        lines += [f"[teams.{name}]", f'keys = ["{key}"]', f"quota = {quota}", ""]
    path.write_text("\n".join(lines))


def sample(pid: int) -> Sample:
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return Sample(time.monotonic(), rss, len(os.listdir(f"/proc/{pid}/fd")))


class Traffic:
    """One closed-loop client: picks an action, sends it, checks and counts the answer."""

    ACTIONS: ClassVar[list[tuple[str, int]]] = [
        ("repeat", 30), ("unique", 14), ("nsfw", 6), ("faces", 4), ("urlencoded", 6),
        ("no-cache", 3), ("no-store", 3), ("only-if-cached", 4), ("max-age=0", 2), ("lookup", 8),
        ("bad", 12), ("burst", 3)]

    def __init__(self, url: str, session: aiohttp.ClientSession, tally: Tally,
                 rng: random.Random, unique_base: int, think_s: float) -> None:
        self.url, self.session, self.tally, self.rng = url, session, tally, rng
        self.think_s = think_s  # mean pause between requests: a 2-core box stays usable
        self.unique = unique_base
        names, weights = zip(*self.ACTIONS, strict=True)
        self.names, self.weights = list(names), list(weights)

    async def run(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            action = self.rng.choices(self.names, self.weights)[0]
            team = self.rng.choices(list(TEAMS), [5, 4, 1])[0]
            self.tally.by_action[action] += 1
            await self.play(action, team)
            await asyncio.sleep(self.rng.uniform(0, 2 * self.think_s))

    async def play(self, action: str, team: str) -> None:
        key = TEAMS[team][0]
        seed = self.rng.randrange(POOL)
        fields = {"apikey": key, "type": "objects", "max_labels": "10", "min_confidence": "50"}
        headers: dict[str, str] = {}
        if action == "unique":
            self.unique += 1
            seed = self.unique
        elif action == "nsfw":
            fields = {"apikey": key, "type": "nsfw", "nsfw_min_confidence": "40"}
        elif action == "faces":
            fields = {"apikey": key, "type": "detect_faces"}
        elif action in ("no-cache", "no-store", "only-if-cached", "max-age=0"):
            headers["Cache-Control"] = action
        elif action == "urlencoded":
            body = "&".join(f"{k}={v}" for k, v in fields.items()).encode() + b"&file="
            body += "".join(f"%{b:02X}" for b in image_of(seed)).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            await self.send("POST", team, data=body, headers=headers)
            return
        elif action == "lookup":
            digest = xxhash.xxh3_128_hexdigest(image_of(seed))
            await self.send("GET", team, params={"apikey": key, "type": "cache", "hash": digest})
            return
        elif action == "bad":
            await self.bad(team, key)
            return
        elif action == "burst":  # concurrent identical misses from several teams: coalesced
            self.unique += 1
            image = image_of(self.unique)
            teams = self.rng.choices(list(TEAMS), k=3)
            await asyncio.gather(*(self.send("POST", t, data=self.multipart(
                {**fields, "apikey": TEAMS[t][0]}, image)) for t in teams))
            return
        await self.send("POST", team, data=self.multipart(fields, image_of(seed)),
                        headers=headers)

    @staticmethod
    def multipart(fields: dict[str, str], image: bytes | None,
                  content_type: str = "image/png") -> aiohttp.FormData:
        form = aiohttp.FormData()
        for name, value in fields.items():
            form.add_field(name, value)
        if image is not None:
            form.add_field("file", image, filename="image", content_type=content_type)
        return form

    async def bad(self, team: str, key: str) -> None:
        good = {"apikey": key, "type": "objects", "max_labels": "10", "min_confidence": "50"}
        image = image_of(self.rng.randrange(POOL))
        kind = self.rng.randrange(9)
        if kind == 0:
            form = self.multipart({k: v for k, v in good.items() if k != "apikey"}, image)
            await self.send("POST", "unknown", data=form)
        elif kind == 1:
            await self.send("POST", "unknown", data=self.multipart({**good, "apikey": "x"}, image))
        elif kind == 2:
            await self.send("POST", team, data=self.multipart({**good, "type": "colour"}, image))
        elif kind == 3:
            await self.send("POST", team, data=self.multipart(good, None))
        elif kind == 4:
            await self.send("POST", team, data=self.multipart(good, b"GIF89a not an image"))
        elif kind == 5:
            form = self.multipart({**good, "min_confidence": self.rng.choice(["101", "-1", "x"])},
                                  image)
            await self.send("POST", team, data=form)
        elif kind == 6:
            body = b"--b\r\nContent-Disposition: form-data; name=\"apikey\"\r\n\r\n" + key.encode()
            await self.send("POST", team, data=body + b"\r\n--b\r\nbroken",
                            headers={"Content-Type": "multipart/form-data; boundary=b"})
        elif kind == 7:
            await self.send("GET", team, params={**good})
        else:
            await self.send("POST", team, data=b"\x00" * 64,
                            headers={"Content-Type": "application/octet-stream"})

    async def send(self, method: str, team: str, **kwargs: Any) -> None:
        tally = self.tally
        tally.sent += 1
        try:
            async with self.session.request(method, self.url, **kwargs) as response:
                raw = await response.read()
                status, cache_status = response.status, response.headers.get("Cache-Status")
        except (aiohttp.ClientError, TimeoutError) as exc:
            tally.by_status["no answer"] += 1
            tally.problem(f"{method} {team}: no answer ({type(exc).__name__})")
            return
        tally.by_status[str(status)] += 1
        try:
            envelope = json.loads(raw)
            ok = isinstance(envelope, dict) and envelope.get("status") == status
        except ValueError:
            ok = False
        if ok and status in ENVELOPE_STATUSES:
            tally.enveloped += 1
        else:
            tally.problem(f"{method} {team}: HTTP {status} {raw[:120]!r}")
        kind = outcome(cache_status)
        tally.by_cache[kind] += 1
        if status == 200 and kind in ("miss", "forwarded"):
            tally.served[team] += 1


async def switch_faults(control: str, session: aiohttp.ClientSession, deadline: float,
                        phase_s: float, rng: random.Random, applied: Counter[str]) -> None:
    """A fault for half a phase, then none for a phase, until the deadline; every fault
    comes once before any comes twice."""
    plan: list[tuple[str, int]] = []
    while time.monotonic() < deadline:
        if not plan:
            plan = rng.sample(FAULTS, len(FAULTS))
        fault, latency = plan.pop()
        for (name, latency_ms), share in (((fault, latency), 0.5), (("none", 0), 1.0)):
            async with session.post(control, json={"fault": name, "fault_count": -1,
                                                   "latency_ms": latency_ms}) as r:
                r.raise_for_status()
            applied[name if latency_ms == 0 else f"latency {latency_ms}ms"] += 1
            await asyncio.sleep(min(share * phase_s, max(deadline - time.monotonic(), 0)))


async def sample_process(pid: int, stop: asyncio.Event, samples: list[Sample]) -> None:
    while not stop.is_set():
        samples.append(sample(pid))
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass


def metric_values(text: str, name: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            team = labels.split('team="', 1)[1].split('"', 1)[0]
            values[team] = float(value)
    return values


def start_gateway(config: Path, log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    with log.open("wb") as out:
        return subprocess.Popen(command, env={**os.environ, KEY_ENV: UPSTREAM_KEY},
                                stdout=out, stderr=subprocess.STDOUT)


def read_log(log: Path) -> str:
    return log.read_text(errors="replace")


async def wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(400):  # 20 s
            if proc.poll() is not None:
                raise SystemExit(f"gateway exited at start:\n{read_log(log)}")
            try:
                async with session.get(f"{base}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise SystemExit(f"gateway not ready after 20 s:\n{read_log(log)}")


async def soak(seconds: float, clients: int, think_s: float, seed: int, workdir: Path) -> bool:
    rng = random.Random(seed)
    sim_runner, sim_port, sim_state = await start_sim(api_key=UPSTREAM_KEY, quota=10**9)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config, log = workdir / "soak.toml", workdir / "gateway.log"
    write_config(config, sim_port, port, workdir / "soak.db")
    proc = start_gateway(config, log)
    tally, applied, samples = Tally(), Counter[str](), []
    try:
        await wait_ready(base, proc, log)
        started = time.monotonic()
        deadline = started + seconds
        stop_sampling = asyncio.Event()
        sampler = asyncio.create_task(sample_process(proc.pid, stop_sampling, samples))
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            players = [Traffic(f"{base}/api/v2/", session, tally, random.Random(rng.random()),
                               (i + 1) * 10_000_000, think_s).run(deadline)
                       for i in range(clients)]
            faults = switch_faults(f"http://127.0.0.1:{sim_port}/_sim/control", session,
                                   deadline, min(3.0, seconds / (1.5 * len(FAULTS))), rng,
                                   applied)
            await asyncio.gather(faults, *players)
            async with session.post(f"http://127.0.0.1:{sim_port}/_sim/control",
                                    json={"fault": "none", "latency_ms": 0}) as r:
                r.raise_for_status()
            async with session.get(f"{base}/metrics") as r:
                metrics = await r.text()
        elapsed = time.monotonic() - started
        await asyncio.sleep(1.5)  # idle: the connections the clients held are gone
        stop_sampling.set()
        await sampler
        samples.append(sample(proc.pid))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            exit_code = await asyncio.to_thread(proc.wait, 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            exit_code = await asyncio.to_thread(proc.wait)
        await sim_runner.cleanup()
    charged = metric_values(metrics, "gateway_quota_used")
    undelivered = read_undelivered(workdir / "soak.db")
    return report(seconds=elapsed, clients=clients, seed=seed, tally=tally, applied=applied,
                  samples=samples, charged=charged, undelivered=undelivered,
                  sim_calls=sim_state.calls,
                  sim_successes=sim_state.successes, exit_code=exit_code,
                  log_text=read_log(log))


def read_undelivered(db: Path) -> dict[str, int]:
    """Per team, the charged calls that were sent but delivered no result (all periods)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT team, SUM(undelivered) FROM quota_usage GROUP BY team")
        return {str(team): int(n) for team, n in rows}


def report(*, seconds: float, clients: int, seed: int, tally: Tally, applied: Counter[str],
           samples: list[Sample], charged: dict[str, float], undelivered: dict[str, int],
           sim_calls: int, sim_successes: int,
           exit_code: int, log_text: str) -> bool:
    warm_at = samples[0].at + min(10.0, seconds / 4)
    warm = next((s for s in samples if s.at >= warm_at), samples[-1])
    end = samples[-1]
    peak = max(s.rss_kb for s in samples)
    answered = sum(n for status, n in tally.by_status.items() if status != "no answer")
    mb = 1024

    def row(*cells: object) -> None:
        print(f"  {cells[0]!s:<28}" + "".join(f"{c!s:>12}" for c in cells[1:]))

    print(f"\nsoak: {seconds:.0f} s, {clients} clients, teams {', '.join(TEAMS)}, seed {seed}")
    print(f"\nrequests: {tally.sent} sent, {answered} answered ({tally.sent / seconds:.0f}/s)")
    print("\nrequests by status")
    for status, n in sorted(tally.by_status.items()):
        row(status, n)
    print("\nrequests by cache outcome")
    for kind, n in tally.by_cache.most_common():
        row(kind, n)
    print("\nrequests by action")
    for action, n in tally.by_action.most_common():
        row(action, n)
    print("\nupstream")
    row("calls (simulator)", sim_calls)
    row("successes (simulator)", sim_successes)
    row("faults switched", " ".join(f"{k}x{v}" for k, v in sorted(applied.items())))
    print("\ncharged per team")
    row("team", "charged", "served", "undelivered", "quota")
    for team, (_, quota) in TEAMS.items():
        row(team, int(charged.get(team, -1)), tally.served[team], undelivered.get(team, 0),
            quota)
    print("\ngateway process")
    row("", "start", "peak", "end")
    row("RSS MB (start after warm-up)", f"{warm.rss_kb / mb:.1f}", f"{peak / mb:.1f}",
        f"{end.rss_kb / mb:.1f}")
    row("open fds", warm.fds, max(s.fds for s in samples), end.fds)

    unexpected = [line for line in log_text.splitlines()
                  if "unexpected error" in line or line.startswith("Traceback")]
    checks = [
        (f"every request answered with the envelope ({tally.enveloped}/{tally.sent})",
         tally.enveloped == tally.sent),
        ("no 500", tally.by_status["500"] == 0),
        # A call the upstream may have billed stays charged (undelivered) without an answer.
        ("charged == upstream-served answers + undelivered, per team",
         all(charged.get(t, -1) == tally.served[t] + undelivered.get(t, 0) for t in TEAMS)),
        (f"RSS growth after warm-up <= {RSS_GROWTH_MB} MB "
         f"({(end.rss_kb - warm.rss_kb) / mb:+.1f} MB)",
         end.rss_kb <= warm.rss_kb + RSS_GROWTH_MB * mb),
        (f"open fds flat, growth <= {FD_GROWTH} ({end.fds - warm.fds:+d})",
         end.fds <= warm.fds + FD_GROWTH),
        (f"no unexpected error in the gateway log ({len(unexpected)})", not unexpected),
        (f"gateway drained and exited 0 on SIGTERM (exit {exit_code})", exit_code == 0),
    ]
    print("\nchecks")
    for text, ok in checks:
        print(f"  [{'ok' if ok else 'FAIL'}] {text}")
    for problem in tally.problems:
        print(f"  problem: {problem}")
    for line in unexpected[:5]:
        print(f"  log: {line}")
    return all(ok for _, ok in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--think-ms", type=float, default=10.0,
                        help="mean pause of a client between requests")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="8 s, 3 clients (for CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.clients = 8.0, 3
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    with tempfile.TemporaryDirectory(prefix="gateway-soak-") as workdir:
        ok = asyncio.run(soak(args.seconds, args.clients, args.think_ms / 1000, seed,
                              Path(workdir)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
