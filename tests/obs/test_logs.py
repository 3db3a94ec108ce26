"""The access log: the formatters' own line, written in batches off the request path, out on
SIGHUP, SIGTERM and exit, at most the last flush interval lost to kill -9, never stalling
requests on a sink that takes nothing, never a secret."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from gateway.config import ConfigError
from gateway.devtools.sample_images import make_png
from gateway.obs.logs import AccessLog, JsonFormatter, TextFormatter
from tests.support import (
    UPSTREAM_KEY,
    GatewayProcess,
    Sim,
    free_port,
    gateway_command,
    make_config,
    objects_form,
    post_requests,
    write_config,
)

FIELDS = {"team": "search", "type": "objects", "status": 200, "cache": "hit",
          "hash": "abcdef012345", "bytes": 100000, "gateway_ms": 0.31, "upstream_ms": None,
          "request_id": "4f1c0b6e2a9d4e7f8a1b2c3d4e5f6a7b", "client": "127.0.0.1",
          "method": "POST", "path": "/api/v2/"}
STAMP = re.compile(r"^\S+ \S+ |^\{\"time\":\"[^\"]+\",")
TEAM_KEY = "team-key-n0t-f0r-logs"
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO gateway\.access: request team=\S+ "
                  r"type=\S+ status=\d+ cache=\S+ hash=\S+ bytes=\d+ gateway_ms=[0-9.]+ "
                  r"upstream_ms=\S+ request_id=\S+ client=\S+ method=[A-Z]+ path=/\S*$")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_access_line_matches_the_formatter(fmt: str) -> None:
    written: list[bytes] = []
    log = AccessLog(fmt, written.append)
    log.write(FIELDS)
    log.close()
    direct = b"".join(written).decode()
    record = logging.LogRecord("gateway.access", logging.INFO, "", 0, "request", (), None)
    record.__dict__.update(FIELDS)
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    via_logging = formatter.format(record) + "\n"
    assert direct.endswith("\n") and direct.count("\n") == 1
    assert STAMP.sub("", direct) == STAMP.sub("", via_logging)
    if fmt == "json":
        assert json.loads(direct)["time"].endswith("Z")
    else:
        assert LINE.match(direct.rstrip("\n"))


def test_a_full_buffer_goes_out_in_one_write() -> None:
    written: list[bytes] = []
    log = AccessLog("text", written.append, buffer_kb=1, flush_ms=60_000)
    n = 1 + 1024 // len(log.line(FIELDS))  # the line that fills the buffer
    for _ in range(n):
        log.write(FIELDS)
    deadline = time.monotonic() + 10
    while not written and time.monotonic() < deadline:
        time.sleep(0.01)
    log.close()
    assert [chunk.count(b"\n") for chunk in written] == [n]


# -- the command, as an operator runs it --------------------------------------------------------
def start(tmp_path: Path, sim: Sim, server: str) -> GatewayProcess:
    port = free_port()
    config = write_config(tmp_path / "g.toml", sim_url=sim.url, db=tmp_path / "g.db", port=port,
                          teams={"t": (TEAM_KEY, 1000)}, server=server)
    return GatewayProcess(config, port, tmp_path / "g.log")


def access_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines(keepends=True)
            if "gateway.access" in line]


def wait_for_lines(path: Path, n: int, within: float = 15) -> list[str]:
    deadline = time.monotonic() + within
    while len(lines := access_lines(path)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return lines


async def test_lines_wait_in_the_buffer_and_are_all_out_after_sighup_and_sigterm(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess]) -> None:
    gw = start(tmp_path, sim, "access_log_flush_ms = 60000")  # only a signal flushes here
    processes.append(gw)
    await asyncio.to_thread(gw.wait_ready)
    statuses = [(await post_requests(gw.url, *objects_form(TEAM_KEY, make_png(i)))).status_code
                for i in range(3)]
    statuses.append((await post_requests(gw.url, *objects_form("wrong-key", make_png(0))))
                    .status_code)
    assert statuses == [200, 200, 200, 401]
    assert access_lines(gw.log_path) == []  # answered, not yet written: batched

    gw.proc.send_signal(signal.SIGHUP)
    after_hup = await asyncio.to_thread(wait_for_lines, gw.log_path, 4)
    assert len(after_hup) == 4 and gw.proc.poll() is None

    for i in range(3, 5):
        assert (await post_requests(gw.url, *objects_form(TEAM_KEY, make_png(i)))).ok
    assert gw.stop() == 0  # SIGTERM: drained, flushed, exit 0
    lines = access_lines(gw.log_path)
    assert lines[:4] == after_hup and len(lines) == 6
    assert all(LINE.match(line.rstrip("\n")) and line.endswith("\n") for line in lines)
    assert [re.search(r"status=(\d+)", line)[1] for line in lines] == [  # type: ignore[index]
        "200", "200", "200", "401", "200", "200"]
    text = gw.log_path.read_text()
    for secret in (UPSTREAM_KEY, TEAM_KEY, "wrong-key"):
        assert secret not in text


async def test_kill_9_loses_at_most_the_last_flush_interval(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess]) -> None:
    gw = start(tmp_path, sim, "access_log_flush_ms = 200")
    processes.append(gw)
    await asyncio.to_thread(gw.wait_ready)
    early = []
    for i in range(20):
        r = await post_requests(gw.url, *objects_form(TEAM_KEY, make_png(100 + i)))
        assert r.ok
        early.append(r.headers["X-Content-Hash"][:12])
    await asyncio.sleep(2.0)  # ten flush intervals
    for i in range(5):
        assert (await post_requests(gw.url, *objects_form(TEAM_KEY, make_png(200 + i)))).ok
    gw.proc.kill()
    gw.proc.wait(10)
    lines = access_lines(gw.log_path)
    logged = [m[1] for line in lines if (m := re.search(r"hash=(\w+)", line))]
    assert logged[:20] == early
    assert all(LINE.match(line.rstrip("\n")) and line.endswith("\n") for line in lines)


def dropped_total(port: int) -> float:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    m = re.search(r"^gateway_access_log_dropped_total (\S+)$", text, re.M)
    assert m, "no gateway_access_log_dropped_total on /metrics"
    return float(m[1])


def hits_with_a_blocked_log(config: Path, port: int) -> tuple[float, list[int], float]:
    """400 hits on a gateway whose stderr is a pipe nobody reads: dropped lines before and
    after, and the statuses."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # full after ~20 lines
    env = {**os.environ, "TEST_UPSTREAM_KEY": UPSTREAM_KEY}
    proc = subprocess.Popen([*gateway_command(), "serve", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=write_end)
    os.close(write_end)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "gateway did not start"
            try:
                if requests.get(f"{base}/readyz", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.05)
        before = dropped_total(port)
        data, files = objects_form(TEAM_KEY, make_png(7))
        with requests.Session() as session:
            statuses = [session.post(f"{base}/api/v2/", data=data, files=files, timeout=10)
                        .status_code for _ in range(400)]
        return before, statuses, dropped_total(port)
    finally:
        proc.kill()  # not SIGTERM: its "draining" line would wait on the pipe (see README)
        proc.wait(10)
        os.close(read_end)


async def test_a_sink_nobody_reads_stalls_no_request(tmp_path: Path, sim: Sim) -> None:
    port = free_port()
    config = write_config(tmp_path / "g.toml", sim_url=sim.url, db=tmp_path / "g.db", port=port,
                          teams={"t": (TEAM_KEY, 1000)},
                          server="access_log_buffer_kb = 1\naccess_log_flush_ms = 20")
    # ~200 bytes a line: the pipe holds ~20, the writer's bound (32 x 1 KB) ~160 more.
    before, statuses, after = await asyncio.to_thread(hits_with_a_blocked_log, config, port)
    assert before == 0 and statuses == [200] * 400
    assert after > 100


BAD = [
    pytest.param("access_log_buffer_kb = 0", "server.access_log_buffer_kb: must be an integer >= 1",
                 id="buffer-zero"),
    pytest.param("access_log_buffer_kb = '32k'",
                 "server.access_log_buffer_kb: must be an integer, got str", id="buffer-text"),
    pytest.param("access_log_buffer_kb = 100000", "server.access_log_buffer_kb: must be <= 65536",
                 id="buffer-big"),
    pytest.param("access_log_flush_ms = 0", "server.access_log_flush_ms: must be an integer >= 1",
                 id="flush-zero"),
    pytest.param("access_log_flush_ms = 1.5",
                 "server.access_log_flush_ms: must be an integer, got float", id="flush-float"),
    pytest.param("access_log_flush_ms = 3600000", "server.access_log_flush_ms: must be <= 60000",
                 id="flush-hour"),
]


@pytest.mark.parametrize(("line", "problem"), BAD)
def test_bad_access_log_settings_are_refused_in_one_line(
        tmp_path: Path, line: str, problem: str) -> None:
    config = write_config(tmp_path / "g.toml", sim_url="http://127.0.0.1:9/api/v2/",
                          db=tmp_path / "g.db", port=free_port(), teams={"t": (TEAM_KEY, 1)},
                          server=line)
    result = subprocess.run([*gateway_command(), "check-config", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "TEST_UPSTREAM_KEY": UPSTREAM_KEY})
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert problem in result.stderr and "Traceback" not in result.stderr


def test_good_access_log_settings_load(tmp_path: Path) -> None:
    config = make_config("http://127.0.0.1:9/api/v2/", tmp_path / "g.db",
                         server={"access_log_buffer_kb": 4, "access_log_flush_ms": 250})
    assert (config.server.access_log_buffer_kb, config.server.access_log_flush_ms) == (4, 250)
    with pytest.raises(ConfigError, match="unknown key"):
        make_config("http://127.0.0.1:9/api/v2/", tmp_path / "g.db",
                    server={"access_log_buffer": 4})
