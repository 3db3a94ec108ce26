"""What tests share: the team keys, the simulator handle, configs, clients and gateway
processes, and waiting on a condition (never on a fixed sleep). Fixtures are in conftest.py;
helpers are imported from here, never from conftest."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from aiohttp import web

from gateway.config import Config, parse_config
from gateway.devtools.sim import SimState
from gateway.http.state import GatewayState

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository
REDIS_URL = "redis://127.0.0.1:6379/15"  # the tests' Redis database (CI starts the server)

UPSTREAM_KEY = "UPSTREAM-SECRET-k3y-0f-the-acc0unt"
TEAM_KEYS = {"search": "search-team-key", "ads": "ads-team-key", "tiny": "tiny-team-key"}


@dataclass
class Sim:
    url: str
    state: SimState


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


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on ``port`` (a server is up)."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# -- waiting ----------------------------------------------------------------------------------
def wait_until(condition: Callable[[], object], *, timeout: float = 10.0, every: float = 0.01,
               what: str = "the condition") -> Any:
    """Poll ``condition`` until it returns something true (returned), or fail after
    ``timeout``: a test waits for what it needs, not for a guessed time."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


async def eventually(condition: Callable[[], object | Awaitable[object]], *,
                     timeout: float = 10.0, every: float = 0.01,
                     what: str = "the condition") -> Any:
    """``wait_until`` on the event loop; ``condition`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(every)
