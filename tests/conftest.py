"""Shared fixtures: the simulator as upstream and gateways on real loopback sockets."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.config import Config, parse_config
from gateway.devtools.sim import SimState, start_sim
from gateway.http.app import create_app
from gateway.http.state import STATE, GatewayState

UPSTREAM_KEY = "UPSTREAM-SECRET-k3y-0f-the-acc0unt"
TEAM_KEYS = {"search": "search-team-key", "ads": "ads-team-key", "tiny": "tiny-team-key"}


@dataclass
class Sim:
    url: str
    state: SimState



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


def make_config(sim_url: str, db_path: str | Path, **overrides: Any) -> Config:
    teams = overrides.pop("teams", {
        "search": {"keys": [TEAM_KEYS["search"]], "quota": 1000},
        "ads": {"keys": [TEAM_KEYS["ads"]], "quota": 1000},
        "tiny": {"keys": [TEAM_KEYS["tiny"]], "quota": 3},
    })
    raw: dict[str, Any] = {
        "upstream": {"url": sim_url, "api_key_env": "TEST_UPSTREAM_KEY", "timeout_s": 5},
        "storage": {"backend": "sqlite", "path": str(db_path)},
        "quota": {"period": "month"},
        # No sampled audits unless a test asks: each is an upstream call made at random.
        "cache": {"audit_rate": 0},
        "teams": teams,
    }
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    return parse_config(raw, source="<test>", env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY})


@dataclass
class Gateway:
    url: str          # the /api/v2/ URL
    base: str         # http://127.0.0.1:PORT
    state: GatewayState
    runner: web.AppRunner


GatewayFactory = Callable[..., Awaitable[Gateway]]


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


async def post_requests(url: str, data: dict[str, Any], files: dict[str, Any] | None = None,
                        headers: dict[str, str] | None = None) -> requests.Response:
    """POST exactly as the seed's Python example does (requests, multipart), off the loop."""
    return await asyncio.to_thread(requests.post, url=url, data=data, files=files,
                                   headers=headers, timeout=30)


def objects_form(key: str, image: bytes, **extra: str) -> tuple[dict[str, str], dict[str, bytes]]:
    data = {"apikey": key, "type": "objects", "max_labels": "10", "min_confidence": "80"}
    data.update(extra)
    return data, {"file": image}


# -- subprocess gateways (end-to-end through the installed command) --------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway_command() -> list[str]:
    exe = Path(sys.executable).with_name("gateway")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "gateway"]


def write_config(path: Path, *, sim_url: str, db: Path, port: int, teams: dict[str, tuple[str, int]],
                 extra: str = "", server: str = "") -> Path:
    lines = [
        "[server]", 'host = "127.0.0.1"', f"port = {port}", server, "",
        "[upstream]", f'url = "{sim_url}"', 'api_key_env = "TEST_UPSTREAM_KEY"', "timeout_s = 10", "",
        "[storage]", 'backend = "sqlite"', f'path = "{db}"', "",
        "[quota]", 'period = "month"', "",
    ]
    for name, (key, quota) in teams.items():
        lines += [f"[teams.{name}]", f'keys = ["{key}"]', f"quota = {quota}", ""]
    path.write_text("\n".join(lines) + extra)
    return path


class GatewayProcess:
    def __init__(self, config: Path, port: int, log: Path, *args: str,
                 env: dict[str, str] | None = None):
        env = {**os.environ, "TEST_UPSTREAM_KEY": UPSTREAM_KEY, **(env or {})}
        self.log_path = log
        self._log = log.open("ab")
        self.port = port
        self.proc = subprocess.Popen([*gateway_command(), "serve", "--config", str(config), *args],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}/api/v2/"

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()}")
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise TimeoutError(self.log_path.read_text())

    def stop(self, sig: int | None = None) -> int:
        if self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def processes() -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for p in started:
        p.stop()
