"""What operators feed the installed command: reserved team names, secrets mounted from files
(a trailing newline), an IPv6 listen address."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest
import requests

from gateway.devtools.sample_images import make_png
from tests.support import (
    UPSTREAM_KEY,
    GatewayProcess,
    Sim,
    free_port,
    gateway_command,
    objects_form,
    post_requests,
    write_config,
)


def test_check_config_refuses_a_team_named_like_unauthenticated_requests(
        tmp_path: Path, sim: Sim) -> None:
    """Requests without a valid key are labelled team "unknown" in metrics and logs: a team of
    that name would mix its numbers with theirs."""
    config = write_config(tmp_path / "c.toml", sim_url=sim.url, db=tmp_path / "c.db",
                          port=free_port(), teams={"search": ("k1", 5), "Unknown": ("k2", 5)})
    run = subprocess.run([*gateway_command(), "check-config", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr.splitlines() == [
        f"gateway: config error: {config}: teams.Unknown: the name is reserved (metrics and "
        'logs label requests without a valid key as team "unknown"); choose another']


async def test_secrets_mounted_with_a_trailing_newline_still_work(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A token read from a mounted secret file ends in a newline: the gateway and the admin CLI
    both trim it, so Bearer auth and `gateway reload` work; the upstream key likewise."""
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "admin-token-from-a-file\n")
    monkeypatch.setenv("TEST_UPSTREAM_KEY", UPSTREAM_KEY + "\n")
    port = free_port()
    config = write_config(tmp_path / "g.toml", sim_url=sim.url, db=tmp_path / "g.db", port=port,
                          teams={"t": ("team-key", 5)},
                          extra='[admin]\ntoken_env = "TEST_ADMIN_TOKEN"\n')
    gw = GatewayProcess(config, port, tmp_path / "g.log")
    processes.append(gw)
    await asyncio.to_thread(gw.wait_ready)
    stats = await asyncio.to_thread(
        requests.get, f"http://127.0.0.1:{port}/admin/cache/stats", timeout=5,
        headers={"Authorization": "Bearer admin-token-from-a-file"})
    assert stats.status_code == 200, stats.text
    reload = await asyncio.to_thread(
        subprocess.run, [*gateway_command(), "reload", "--config", str(config)],
        capture_output=True, text=True, timeout=60, env=os.environ)
    assert reload.returncode == 0, reload.stderr
    assert "reloaded" in reload.stdout
    answer = await post_requests(gw.url, *objects_form("team-key", make_png(1)))
    assert answer.status_code == 200, answer.text  # the upstream took the trimmed key


def test_an_ipv6_listen_address_is_logged_as_a_url_that_works(
        tmp_path: Path, sim: Sim) -> None:
    port = free_port()
    config = write_config(tmp_path / "g.toml", sim_url=sim.url, db=tmp_path / "g.db", port=port,
                          teams={"t": ("team-key", 5)})
    log = tmp_path / "g.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*gateway_command(), "serve", "--config", str(config),
                                 "--host", "::1"], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TEST_UPSTREAM_KEY": UPSTREAM_KEY})
    try:
        deadline = time.monotonic() + 30
        while "listening" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        line = next(x for x in log.read_text().splitlines() if "listening" in x)
        url = line.split("listening on ")[1].split()[0]
        assert url == f"http://[::1]:{port}/api/v2/"
        assert requests.get(url.replace("/api/v2/", "/readyz"), timeout=5).ok
    finally:
        proc.terminate()
        proc.wait(15)


def test_check_config_says_when_a_blank_admin_token_leaves_the_admin_api_off(
        tmp_path: Path, sim: Sim) -> None:
    config = write_config(tmp_path / "c.toml", sim_url=sim.url, db=tmp_path / "c.db",
                          port=free_port(), teams={"t": ("k", 5)},
                          extra='[admin]\ntoken_env = "TEST_ADMIN_TOKEN"\n')
    run = subprocess.run([*gateway_command(), "check-config", "--config", str(config)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TEST_ADMIN_TOKEN": " \n",
                              "TEST_UPSTREAM_KEY": UPSTREAM_KEY})
    assert run.returncode == 0
    assert run.stderr.splitlines() == [
        "note: TEST_ADMIN_TOKEN is not set here (or only whitespace): the admin API is off "
        "and the status page off (403)"]
