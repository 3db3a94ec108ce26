"""The admin API's and the admin CLI's shared test pieces: tokens, a known workload and what it
leaves in the ledger, and the CLI run as a user runs it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import aiohttp

from gateway.devtools.sample_images import make_jpeg, make_png
from tests.support import (
    TEAM_KEYS,
    Gateway,
    Sim,
    free_port,
    gateway_command,
    objects_form,
    post_requests,
    write_config,
)

TOKEN = "admin-t0ken-for-tests-only-9f8e7d"


BEARER = {"Authorization": f"Bearer {TOKEN}"}


# What play_workload leaves in the ledger: (charged, quota, remaining, hits, coalesced, saved)
EXPECTED = {
    "search": (2, 1000, 998, 3, 0, 3),
    "ads": (1, 1000, 999, 1, 2, 3),
    "tiny": (3, 3, 0, 1, 0, 1),
    "(total)": (6, 2003, 1997, 5, 2, 7),
}


IMAGES = {name: make_png(700 + i) for i, name in enumerate("ABCDEG")} | {"F": make_jpeg(706)}


async def play_workload(gw: Gateway, sim: Sim) -> None:
    """A known mix: misses, hits, a coalesced burst, a team running out of quota. Leaves six
    results stored (five objects, one nsfw)."""
    search, ads, tiny = TEAM_KEYS["search"], TEAM_KEYS["ads"], TEAM_KEYS["tiny"]

    async def send(key: str, image: str, status: int = 200, **extra: str) -> None:
        r = await post_requests(gw.url, *objects_form(key, IMAGES[image], **extra))
        assert r.status_code == status, r.text

    for image in "AABBA":                       # search: 2 charged, 3 hits
        await send(search, image)
    await send(ads, "A")                        # ads: a hit on search's paid result
    sim.state.latency_ms = 400                  # ads: 3 at once -> 1 charged, 2 coalesced
    await asyncio.gather(*(send(ads, "C") for _ in range(3)))
    sim.state.latency_ms = 0
    await send(tiny, "D")                       # tiny: 3 charged (its whole quota)...
    await send(tiny, "E")
    await send(tiny, "F", type="nsfw", nsfw_min_confidence="50")
    await send(tiny, "G", 402)                  # ...then 402, not charged
    await send(tiny, "A")                       # a hit stays free with no quota left
    await gw.state.service.flush()              # hit counters are written in batches


async def call(client: aiohttp.ClientSession, method: str, url: str,
               **kwargs: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with client.request(method, url, **kwargs) as r:
        text = await r.text()
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text
        return r.status, body, r


TEAMS = {"search": (TEAM_KEYS["search"], 1000), "ads": (TEAM_KEYS["ads"], 1000),
         "tiny": (TEAM_KEYS["tiny"], 3)}


ADMIN = '\n[admin]\ntoken_env = "GW_ADMIN_TOKEN"\n'


NO_UPSTREAM = "http://127.0.0.1:9/api/v2/"   # reload tests make no upstream call


def cli(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GW_ADMIN_TOKEN"}
    if token is not None:
        env["GW_ADMIN_TOKEN"] = token
    return subprocess.run([*gateway_command(), *args], capture_output=True, text=True,
                          timeout=60, env=env, check=False)


async def acli(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI off the event loop, so an in-process gateway keeps answering meanwhile."""
    return await asyncio.to_thread(cli, *args, token=token)


def config_for(tmp_path: Path, sim: Sim | None, *, period: str = "month", extra: str = "",
               port: int | None = None) -> Path:
    """A config file on the store the test's gateway uses (``tmp_path / "gateway.db"``)."""
    url = sim.url if sim is not None else NO_UPSTREAM
    path = write_config(tmp_path / "config.toml", sim_url=url, db=tmp_path / "gateway.db",
                        port=port or free_port(), teams=TEAMS, extra=extra)
    path.write_text(path.read_text().replace('period = "month"', f'period = "{period}"'))
    return path
