"""``gateway demo``: the simulator and a gateway on free loopback ports with a temporary
store, a short workload from two teams with repeated images, and a table of what it saved."""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.config import parse_config
from gateway.devtools.sample_images import make_jpeg, make_png
from gateway.devtools.sim import start_sim
from gateway.http.app import create_app

UPSTREAM_KEY = "demo-upstream-key"
TEAMS = {"search": ("search-demo-key", 25), "ads": ("ads-demo-key", 4)}
# Each team its own threshold: search's stricter requests are derived from ads' looser answers.
MIN_CONFIDENCE = {"search": "80", "ads": "50"}


def run_demo(*, requests_per_team: int = 40, images: int = 14) -> int:
    return asyncio.run(_demo(requests_per_team, images))


async def _demo(requests_per_team: int, images: int) -> int:
    sim_runner, sim_port, sim_state = await start_sim(
        api_key=UPSTREAM_KEY, quota=5000, latency_ms=40
    )
    with tempfile.TemporaryDirectory(prefix="gateway-demo-") as tmp:
        config = parse_config(
            {
                "upstream": {
                    "url": f"http://127.0.0.1:{sim_port}/api/v2/",
                    "api_key_env": "DEMO_UPSTREAM_KEY",
                },
                "storage": {"path": str(Path(tmp) / "gateway.db")},
                "quota": {"period": "month"},
                "cache": {"audit_rate": 0},  # the table counts the teams' calls only
                "teams": {
                    name: {"keys": [key], "quota": quota} for name, (key, quota) in TEAMS.items()
                },
            },
            source="<demo>",
            env={"DEMO_UPSTREAM_KEY": UPSTREAM_KEY},
        )
        app = create_app(config, registry=CollectorRegistry())
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        url = f"http://127.0.0.1:{port}/api/v2/"
        print(
            f"upstream simulator on http://127.0.0.1:{sim_port}/api/v2/, "
            f"gateway on {url}, store {tmp}/gateway.db"
        )
        try:
            rows, elapsed = await _workload(url, requests_per_team, images)
        finally:
            await runner.cleanup()
            await sim_runner.cleanup()
    _print_table(rows, sim_state.calls, elapsed)
    return 0


async def _workload(url: str, per_team: int, images: int) -> tuple[dict[str, Counter[str]], float]:
    rng = random.Random(7)
    pool = [make_png(i) if i % 2 else make_jpeg(i) for i in range(images)]
    rows: dict[str, Counter[str]] = {team: Counter() for team in TEAMS}
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:

        async def one(team: str, image: bytes, n: int) -> None:
            # Multipart, like the seed's Python example; field order and filename vary.
            form = aiohttp.FormData()
            fields = [
                ("apikey", TEAMS[team][0]),
                ("type", "objects"),
                ("max_labels", "10"),
                ("min_confidence", MIN_CONFIDENCE[team]),
            ]
            rng.shuffle(fields)
            for name, value in fields:
                form.add_field(name, value)
            form.add_field("file", image, filename=f"upload-{n}.img")
            async with session.post(url, data=form) as response:
                body = await response.json(content_type=None)
                row = rows[team]
                row["requests"] += 1
                row[str(response.status)] += 1
                cache = response.headers.get("Cache-Status", "")
                if "detail=coalesced" in cache:
                    row["coalesced"] += 1
                elif "detail=derived" in cache:
                    row["derived"] += 1
                elif "; hit" in cache:
                    row["hits"] += 1
                elif "fwd=" in cache:
                    row["charged"] += 1
                if response.status == 200:
                    row["quota_left"] = body["data"]["quota"]

        # Waves of concurrent requests: repeats within a wave coalesce, later ones hit.
        jobs = [(team, rng.choice(pool), n) for n in range(per_team) for team in TEAMS]
        for i in range(0, len(jobs), 10):
            await asyncio.gather(*(one(*job) for job in jobs[i : i + 10]))
    return rows, time.perf_counter() - started


def _print_table(rows: dict[str, Counter[str]], upstream_calls: int, elapsed: float) -> None:
    header = (
        "team",
        "requests",
        "200",
        "402",
        "from store",
        "coalesced",
        "derived",
        "charged",
        "quota",
        "left",
    )
    lines = [header]
    total: Counter[str] = Counter()
    for team, row in rows.items():
        total.update(row)
        quota = TEAMS[team][1]
        lines.append(
            (
                team,
                str(row["requests"]),
                str(row["200"]),
                str(row["402"]),
                str(row["hits"]),
                str(row["coalesced"]),
                str(row["derived"]),
                str(row["charged"]),
                str(quota),
                str(quota - row["charged"]),
            )
        )
    lines.append(
        (
            "total",
            str(total["requests"]),
            str(total["200"]),
            str(total["402"]),
            str(total["hits"]),
            str(total["coalesced"]),
            str(total["derived"]),
            str(total["charged"]),
            "",
            "",
        )
    )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print()
    for n, line in enumerate(lines):
        print(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if n == 0 or n == len(lines) - 2:
            print("  ".join("-" * w for w in widths))
    saved = total["hits"] + total["coalesced"] + total["derived"]
    print(
        f"\n{total['requests']} requests in {elapsed:.2f}s; upstream called {upstream_calls} "
        f"times; {saved} upstream calls saved "
        f"({saved / max(total['requests'], 1):.0%} of requests answered without paying)."
    )
