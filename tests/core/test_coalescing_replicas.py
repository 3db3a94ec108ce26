"""Coalescing across replicas on one Redis: identical concurrent misses on two gateways make
one upstream call, and a lock left by a replica killed with -9 expires."""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.config import Config
from gateway.devtools.sample_images import make_png
from tests.support import (
    TEAM_KEYS,
    GatewayFactory,
    GatewayProcess,
    Sim,
    free_port,
    make_config,
    write_config,
)

REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(REDIS_URL)
    yield r
    await r.aclose()


@pytest.fixture
async def prefix(redis_client: aioredis.Redis) -> AsyncIterator[str]:
    name = f"coalesce:{uuid.uuid4().hex}:"
    yield name
    async for k in redis_client.scan_iter(match=name + "*"):
        await redis_client.delete(k)


def replica_config(sim: Sim, tmp_path: Path, prefix: str, **cache: float) -> Config:
    return make_config(sim.url, tmp_path / "unused.db",
                       storage={"backend": "redis", "redis_url": REDIS_URL,
                                "redis_prefix": prefix},
                       cache={"audit_rate": 0, **cache})


async def post(session: aiohttp.ClientSession, url: str, image: bytes) -> tuple[int, str]:
    form = aiohttp.FormData()
    for name, value in (("apikey", TEAM_KEYS["search"]), ("type", "objects"),
                        ("max_labels", "10"), ("min_confidence", "80")):
        form.add_field(name, value)
    form.add_field("file", image, filename="i.png", content_type="image/png")
    async with session.post(url, data=form) as r:
        await r.read()
        return r.status, r.headers.get("Cache-Status", "")


async def upstream_reached(sim: Sim, calls: int) -> None:
    """Wait until the simulator has received ``calls`` calls (at most 10 s)."""
    for _ in range(500):
        if sim.state.calls >= calls:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the upstream got {sim.state.calls} calls, not {calls}")


async def test_30_identical_misses_over_two_replicas_make_one_upstream_call(
        gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path, prefix: str) -> None:
    config = replica_config(sim, tmp_path, prefix)
    replicas = [await gateway_factory(config), await gateway_factory(config)]
    sim.state.latency_ms = 800  # every request arrives while the one call runs
    image = make_png(4242)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        answers = await asyncio.gather(*(post(session, replicas[i % 2].url, image)
                                         for i in range(30)))
    assert {status for status, _ in answers} == {200}
    assert sim.state.calls == 1
    statuses = sorted(cache for _, cache in answers)
    assert statuses.count("imagerecognize-gateway; hit; detail=coalesced") == 29, statuses
    assert statuses.count("imagerecognize-gateway; fwd=miss; stored") == 1, statuses
    # Counted as coalesced exactly as in one process: the metric label and the ledger,
    # free for every follower, whichever replica it was on.
    samples = [gw.state.metrics.registry.get_sample_value(
        "gateway_requests_total",
        {"team": "search", "type": "objects", "status": "200", "cache": "coalesced"}) or 0
        for gw in replicas]
    assert sum(samples) == 29 and all(samples), samples
    for gw in replicas:
        await gw.state.service.flush()
    (usage,) = await replicas[0].state.store.usage(replicas[0].state.ledger.period())
    assert (usage.charged, usage.hits, usage.coalesced) == (1, 0, 29)


async def test_a_lock_left_by_a_replica_killed_with_9_expires_and_the_next_request_proceeds(
        gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path, prefix: str,
        processes: list[GatewayProcess], redis_client: aioredis.Redis) -> None:
    port = free_port()
    path = write_config(tmp_path / "dying.toml", sim_url=sim.url, db=tmp_path / "unused.db",
                        port=port, teams={"search": (TEAM_KEYS["search"], 1000)},
                        extra="[cache]\ncoalesce_lock_s = 1\naudit_rate = 0\n")
    path.write_text(path.read_text().replace(
        'backend = "sqlite"',
        f'backend = "redis"\nredis_url = "{REDIS_URL}"\nredis_prefix = "{prefix}"'))
    dying = GatewayProcess(path, port, tmp_path / "dying.log")
    processes.append(dying)
    await asyncio.to_thread(dying.wait_ready)
    # The survivor would wait ten minutes for a live holder: it proceeds only because the
    # dead one's lock expires.
    survivor = await gateway_factory(replica_config(sim, tmp_path, prefix, coalesce_wait_s=600))
    sim.state.latency_ms = 3000
    image = make_png(777)
    r = redis_client
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        first = asyncio.create_task(post(session, dying.url, image))
        for _ in range(500):  # the dying replica holds the key's lock while its call runs
            locks = [k async for k in r.scan_iter(match=prefix + "fl:*")]
            if locks and sim.state.calls == 1:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"no lock across replicas for a key in flight ({locks})")
        assert await r.pttl(locks[0]) > 0  # it expires unless renewed
        dying.stop(signal.SIGKILL)
        with pytest.raises(aiohttp.ClientError):
            await first
        sim.state.latency_ms = 0
        status, cache = await post(session, survivor.url, image)
    assert (status, cache) == (200, "imagerecognize-gateway; fwd=miss; stored")
    assert sim.state.calls == 2  # the dead replica's call and the survivor's own
    assert [k async for k in r.scan_iter(match=prefix + "fl:*")] == []  # released


async def test_a_call_slower_than_the_lock_keeps_its_lock_and_its_followers(
        gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path, prefix: str,
        redis_client: aioredis.Redis) -> None:
    """The key's lock lives coalesce_lock_s unless renewed: a leader whose upstream call takes
    three times as long renews it, so a request on the other replica long after the lock's
    first expiry still follows the one call instead of paying a second."""
    config = replica_config(sim, tmp_path, prefix, coalesce_lock_s=1)
    a, b = await gateway_factory(config), await gateway_factory(config)
    sim.state.latency_ms = 3000
    image = make_png(9191)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        first = asyncio.create_task(post(session, a.url, image))
        await upstream_reached(sim, 1)
        await asyncio.sleep(1.8)  # past the lock's own 1 s: alive only because it is renewed
        assert [k async for k in redis_client.scan_iter(match=prefix + "fl:*")]
        second = await post(session, b.url, image)
        assert (await first)[0] == 200
    assert second == (200, "imagerecognize-gateway; hit; detail=coalesced")
    assert sim.state.calls == 1


async def test_a_follower_on_another_replica_waits_at_most_coalesce_wait_s(
        gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path, prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """A follower of another replica's call gives up after coalesce_wait_s and pays its own
    call (as a follower in the leader's process does), rather than wait for the slow one."""
    leader = await gateway_factory(replica_config(sim, tmp_path, prefix))
    follower = await gateway_factory(replica_config(sim, tmp_path, prefix, coalesce_wait_s=1))
    sim.state.latency_ms = 3500
    image = make_png(9292)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        first = asyncio.create_task(post(session, leader.url, image))
        await upstream_reached(sim, 1)
        sim.state.latency_ms = 0
        started = asyncio.get_running_loop().time()
        with caplog.at_level(logging.WARNING, logger="gateway.service"):
            second = await post(session, follower.url, image)
        waited = asyncio.get_running_loop().time() - started
        assert (await first)[0] == 200
    assert second == (200, "imagerecognize-gateway; fwd=miss; stored")
    assert waited < 3, waited  # not the leader's 3.5 s
    assert sim.state.calls == 2
    assert [r.getMessage() for r in caplog.records if "another replica" in r.getMessage()] == [
        "coalesced request waited 1s for another replica; forwarding on its own"]
