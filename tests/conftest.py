"""Shared fixtures: the simulator as upstream and gateways on real loopback sockets."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.config import Config
from gateway.devtools.sim import start_sim
from gateway.http.app import create_app
from gateway.http.state import STATE
from tests.support import UPSTREAM_KEY, Gateway, GatewayFactory, GatewayProcess, Sim, make_config

# The test files that stop a private redis-server under a gateway's live pool.
KILLS_REDIS = {"test_redis_scale", "test_store_faults", "test_compose_sentinel"}
# What such a kill leaves: redis-py drops the connections whose server is gone unclosed, and
# their ResourceWarnings come whenever the last reference goes, often inside a gateway's
# teardown. Expected in those files' tests, through all of setup, call and teardown (a filter
# around one gc.collect() missed the asyncio transports a teardown freed: a CI run failed on
# four).
_KILLED_REDIS_LEFTOVERS = pytest.mark.filterwarnings(
    r"ignore:unclosed (<socket|Connection|transport)|loop is closed:ResourceWarning")


def _kills_redis(item: pytest.Item) -> bool:
    module = getattr(item, "module", None)
    return module is not None and module.__name__.rpartition(".")[2] in KILLS_REDIS


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _kills_redis(item):
            item.add_marker(_KILLED_REDIS_LEFTOVERS)


@pytest.fixture(autouse=True)
def _collect_what_a_killed_server_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Collects those leftovers right after their own test, under its filter: left to a later
    test's garbage collection they failed that test (filterwarnings = error) for something it
    did not do. Only after those files' tests: a collection after every test doubled the
    suite's time."""
    yield
    if _kills_redis(request.node):
        gc.collect()


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    runner, port, state = await start_sim(api_key=UPSTREAM_KEY, quota=100_000)
    yield Sim(f"http://127.0.0.1:{port}/api/v2/", state)
    await runner.cleanup()


@pytest.fixture
async def gateway_factory(sim: Sim, tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    runners: list[web.AppRunner] = []

    async def start(config: Config | None = None, **kwargs: Any) -> Gateway:
        clock = kwargs.pop("clock", None)
        config = config or make_config(sim.url, tmp_path / "gateway.db", **kwargs)
        extra = {"clock": clock} if clock else {}
        app = create_app(config, registry=CollectorRegistry(), spool_dir=str(tmp_path), **extra)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        base = f"http://127.0.0.1:{port}"
        return Gateway(f"{base}/api/v2/", base, app[STATE], runner)

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory) -> Gateway:
    return await gateway_factory()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def processes() -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for p in started:
        p.stop()
