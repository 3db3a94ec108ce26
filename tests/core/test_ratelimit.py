"""Per-team rate limits: 429 with Retry-After and the IETF RateLimit headers, one bucket per
team across the workers of one supervisor and across replicas on one Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import aiohttp
import requests

from gateway.devtools.sample_images import make_png
from gateway.store.redis import RedisStore
from tests.support import (
    REDIS_URL,
    GatewayFactory,
    GatewayProcess,
    Sim,
    free_port,
    make_config,
    objects_form,
    post_requests,
    write_config,
)


async def test_team_over_its_rate_gets_429_without_charge(gateway_factory: GatewayFactory,
                                                          sim: Sim) -> None:
    gw = await gateway_factory(teams={
        "slow": {"keys": ["slow-key"], "quota": 100, "rate_per_s": 0.5, "burst": 3},
        "free": {"keys": ["free-key"], "quota": 100},
    })
    codes = []
    for i in range(5):
        r = await post_requests(gw.url, *objects_form("slow-key", make_png(i)))
        codes.append(r.status_code)
        if r.status_code == 200:
            assert r.headers["RateLimit-Policy"] == '"team";q=3;w=6'
            assert r.headers["RateLimit"].startswith('"team";r=')
        else:
            limited = r
    assert codes == [200, 200, 200, 429, 429]
    assert limited.json() == {"status": 429, "status_message": "Rate limit exceeded", "data": None}
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.headers["RateLimit"].startswith('"team";r=0;t=')
    assert sim.state.calls == 3
    assert await gw.state.store.used("slow", gw.state.ledger.period()) == 3
    # Another team is not limited.
    other = await post_requests(gw.url, *objects_form("free-key", make_png(9)))
    assert other.status_code == 200 and "RateLimit" not in other.headers


async def test_team_limited_to_some_types(gateway_factory: GatewayFactory, sim: Sim) -> None:
    gw = await gateway_factory(teams={"t": {"keys": ["k"], "quota": 10, "types": ["nsfw"]}})
    r = await post_requests(gw.url, *objects_form("k", make_png(1)))
    assert r.status_code == 420 and sim.state.calls == 0
    ok = await post_requests(gw.url, {"apikey": "k", "type": "nsfw", "nsfw_min_confidence": "10"},
                             {"file": make_png(1)})
    assert ok.status_code == 200


# -- one bucket per team, however many processes answer ---------------------------------------
def admitted_over(url: str, key: str, *, count: int, seconds: float) -> tuple[int, float]:
    """`count` requests spread evenly over `seconds`, each on a new connection (so that
    SO_REUSEPORT hands them to every worker): (answered 200, seconds from first to last)."""
    data, files = objects_form(key, make_png(7))
    ok, started = 0, time.monotonic()
    for i in range(count):
        time.sleep(max(0.0, started + i * seconds / count - time.monotonic()))
        r = requests.post(url, data=data, files=files, timeout=30,
                          headers={"Connection": "close"})
        assert r.status_code in (200, 429), r.text
        ok += r.status_code == 200
    return ok, time.monotonic() - started


async def test_two_workers_share_one_bucket_per_team(tmp_path: Path, sim: Sim,
                                                     processes: list[GatewayProcess]) -> None:
    """rate_per_s = 2, burst = 4: 60 requests over 3.2 s may pass 4 + 2 x 3.2 = 10.4, however
    many workers answer them (each worker with its own bucket passed 20)."""
    port = free_port()
    config = write_config(tmp_path / "w.toml", sim_url=sim.url, db=tmp_path / "gw.db", port=port,
                          teams={}, server="workers = 2",
                          extra='[teams.t]\nkeys = ["team-key"]\nquota = 100\n'
                                'rate_per_s = 2\nburst = 4\n')
    gw = GatewayProcess(config, port, tmp_path / "gw.log")
    processes.append(gw)
    await asyncio.to_thread(gw.wait_ready)
    deadline = time.monotonic() + 30
    while gw.log_path.read_text().count("gateway listening") < 2:
        assert time.monotonic() < deadline, gw.log_path.read_text()
        await asyncio.sleep(0.05)
    ok, elapsed = await asyncio.to_thread(admitted_over, gw.url, "team-key", count=60,
                                          seconds=3.2)
    # Within one token of the bucket's bound; at least what the rate alone refills.
    assert 2 * elapsed <= ok <= 4 + 2 * elapsed + 1, (ok, elapsed)


async def test_two_gateways_on_one_redis_prefix_share_one_bucket(
        gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path) -> None:
    """rate_per_s = 10 on two replicas of one Redis: about 10/s in total, not 10/s each."""
    prefix = f"rl:{uuid.uuid4().hex}:"
    config = make_config(
        sim.url, tmp_path / "unused.db",
        storage={"backend": "redis", "redis_url": REDIS_URL, "redis_prefix": prefix},
        teams={"t": {"keys": ["team-key"], "quota": 1000, "rate_per_s": 10}})
    a = await gateway_factory(config)
    b = await gateway_factory(config)
    try:
        async with aiohttp.ClientSession() as session:
            async def post(url: str) -> int:
                form = aiohttp.FormData()
                for name, value in objects_form("team-key", make_png(3))[0].items():
                    form.add_field(name, value)
                form.add_field("file", make_png(3), filename="i.png", content_type="image/png")
                async with session.post(url, data=form) as r:
                    await r.read()
                    if r.status == 200:
                        assert r.headers["RateLimit-Policy"] == '"team";q=10;w=1'
                    return r.status

            started = time.monotonic()
            codes: list[int] = []
            for i in range(80):  # 40/s for 2 s, alternating replicas
                await asyncio.sleep(max(0.0, started + i * 0.025 - time.monotonic()))
                codes.append(await post((a if i % 2 else b).url))
            elapsed = time.monotonic() - started
        ok = codes.count(200)
        assert set(codes) <= {200, 429}
        # burst 10 (ceil of the rate) plus 10/s; apart, the two buckets passed twice that.
        assert 10 * elapsed <= ok <= 10 + 10 * elapsed + 1, (ok, elapsed)
    finally:
        store = a.state.store
        assert isinstance(store, RedisStore)
        async for k in store._r.scan_iter(match=prefix + "*"):
            await store._r.delete(k)
