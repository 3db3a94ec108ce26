"""Store faults: disk full, locked, corrupt files, Redis down. Spend fails closed; a damaged
cache never blocks the quota ledger; `gateway check-store` finds and repairs what it can."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.devtools.sample_images import make_png
from tests.support import (
    TEAM_KEYS,
    Gateway,
    GatewayFactory,
    GatewayProcess,
    Sim,
    free_port,
    gateway_command,
    objects_form,
    post_requests,
    write_config,
)

SEARCH = TEAM_KEYS["search"]


def corrupt(path: Path) -> None:
    """Overwrite the pages after the header: SQLite will report the file malformed."""
    data = bytearray(path.read_bytes())
    for i in range(100, len(data)):
        data[i] = (data[i] * 7 + 13) & 0xFF
    path.write_bytes(bytes(data))


def checkpoint(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB filesystem (tmpfs), to be filled up."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_disk_full_fails_closed_with_503_and_no_upstream_call(
        gateway_factory: GatewayFactory, sim: Sim, small_disk: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    gw = await gateway_factory(storage={"path": str(small_disk / "gateway.db")})
    image = make_png(1)
    assert (await post_requests(gw.url, *objects_form(SEARCH, image))).status_code == 200
    with (small_disk / "filler").open("wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 4096)
        except OSError:
            pass  # ENOSPC: the disk is full
    calls = sim.state.calls
    statuses = [(await post_requests(gw.url, *objects_form(SEARCH, make_png(seed)))).status_code
                for seed in range(2, 40)]
    assert set(statuses) == {503}
    assert sim.state.calls == calls  # nothing forwarded unmetered
    assert "full" in caplog.text  # the log line says what is wrong
    hit = await post_requests(gw.url, *objects_form(SEARCH, image))
    assert hit.status_code == 200  # reads still work: hits are served


async def test_locked_ledger_answers_503_after_busy_timeout(gateway_factory: GatewayFactory,
                                                            sim: Sim, tmp_path: Path) -> None:
    gw = await gateway_factory(storage={"busy_timeout_ms": 200})
    other = sqlite3.connect(tmp_path / "gateway.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        r = await post_requests(gw.url, *objects_form(SEARCH, make_png(1)))
        assert r.status_code == 503 and sim.state.calls == 0
    finally:
        other.execute("ROLLBACK")
        other.close()
    again = await post_requests(gw.url, *objects_form(SEARCH, make_png(1)))
    assert again.status_code == 200


async def test_a_briefly_locked_ledger_is_waited_for_not_refused(
        gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path) -> None:
    """Writes are tried on the event loop first without waiting for a lock; a lock held
    elsewhere (another worker) sends them to the writer thread, which waits busy_timeout."""
    gw = await gateway_factory(storage={"busy_timeout_ms": 5000})
    other = sqlite3.connect(tmp_path / "gateway.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    request = asyncio.create_task(post_requests(gw.url, *objects_form(SEARCH, make_png(2))))
    await asyncio.sleep(0.5)
    assert not request.done()  # waiting for the lock, in a thread: the loop still answers
    import requests

    health = await asyncio.to_thread(requests.get, gw.base + "/healthz", timeout=2)
    assert health.status_code == 200
    other.execute("ROLLBACK")
    other.close()
    r = await request
    assert r.status_code == 200 and sim.state.calls == 1
    assert await gw.state.store.used("search", gw.state.ledger.period()) == 1


async def serve_process(tmp_path: Path, sim: Sim, processes: list[GatewayProcess], *,
                        quota: int, log: str) -> tuple[GatewayProcess, Path, Path]:
    """`gateway serve` on g.db (its config g.toml, one team "t"), ready."""
    port = free_port()
    db = tmp_path / "g.db"
    config = write_config(tmp_path / "g.toml", sim_url=sim.url, db=db, port=port,
                          teams={"t": ("team-key", quota)})
    gw = GatewayProcess(config, port, tmp_path / log)
    processes.append(gw)
    await asyncio.to_thread(gw.wait_ready)
    return gw, config, db


async def test_corrupt_cache_is_moved_aside_and_quota_data_survives(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess]) -> None:
    first, config, _ = await serve_process(tmp_path, sim, processes, quota=10, log="1.log")
    port = first.port
    for seed in range(3):
        await post_requests(first.url, *objects_form("team-key", make_png(seed)))
    first.stop()
    cache = tmp_path / "g-cache.db"
    checkpoint(cache)
    corrupt(cache)

    check = subprocess.run([*gateway_command(), "check-store", "--config", str(config)],
                           capture_output=True, text=True)
    assert check.returncode == 1 and "DAMAGED" in check.stdout and "cache" in check.stdout
    # A report reads; it does not move the operator's files (only serve and --repair do).
    usage = subprocess.run([*gateway_command(), "usage", "--config", str(config)],
                           capture_output=True, text=True)
    assert usage.returncode == 1 and "check-store --repair" in usage.stderr
    assert not list(tmp_path.glob("g-cache.db.corrupt-*"))

    second = GatewayProcess(config, port, tmp_path / "2.log")
    processes.append(second)
    await asyncio.to_thread(second.wait_ready)
    r = await post_requests(second.url, *objects_form("team-key", make_png(0)))
    assert r.status_code == 200
    assert "fwd=miss" in r.headers["Cache-Status"]  # the cache started empty
    assert r.json()["data"]["quota"] == 6  # 3 charges before + this one: the ledger survived
    assert "moved to" in second.log_path.read_text()
    assert list(tmp_path.glob("g-cache.db.corrupt-*"))


async def test_corrupt_ledger_refuses_to_start_and_check_store_repairs(
        tmp_path: Path, sim: Sim) -> None:
    port = free_port()
    db = tmp_path / "g.db"
    config = write_config(tmp_path / "g.toml", sim_url=sim.url, db=db, port=port,
                          teams={"t": ("team-key", 10)})
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE filler (x BLOB)")
    conn.executemany("INSERT INTO filler VALUES (?)", [(b"x" * 4000,) for _ in range(50)])
    conn.commit()
    conn.close()
    data = bytearray(db.read_bytes())
    data[0:16] = b"not a database!!"
    db.write_bytes(bytes(data))

    env = {"TEST_UPSTREAM_KEY": "k", "PATH": "/usr/bin:/bin"}
    served = subprocess.run([*gateway_command(), "serve", "--config", str(config)],
                            capture_output=True, text=True, env=env, timeout=30)
    assert served.returncode == 1
    assert "check-store" in served.stderr and "ledger" in served.stderr
    check = subprocess.run([*gateway_command(), "check-store", "--config", str(config)],
                           capture_output=True, text=True)
    assert check.returncode == 1 and "ledger" in check.stdout and "DAMAGED" in check.stdout
    repair = subprocess.run([*gateway_command(), "check-store", "--config", str(config),
                             "--repair"], capture_output=True, text=True)
    # A file whose header is gone cannot be copied: the operator is told to restore a backup.
    assert repair.returncode == 1 and "restore a backup" in repair.stdout


def test_check_store_on_a_healthy_store_and_on_a_missing_one(tmp_path: Path) -> None:
    from gateway.store.sqlite import SQLiteStore

    config = write_config(tmp_path / "g.toml", sim_url="http://127.0.0.1:9/api/v2/",
                          db=tmp_path / "g.db", port=1, teams={"t": ("k", 1)})
    check = [*gateway_command(), "check-store", "--config", str(config)]
    missing = subprocess.run(check, capture_output=True, text=True)
    # A mistyped path is not a healthy store.
    assert missing.returncode == 1 and "MISSING" in missing.stdout

    async def create() -> None:
        store = SQLiteStore(str(tmp_path / "g.db"))
        await store.open()
        await store.close()

    asyncio.run(create())
    result = subprocess.run(check, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ledger" in result.stdout and ": ok" in result.stdout


@pytest.mark.parametrize("backend", ["redis"])
def test_unreachable_redis_refuses_to_start(tmp_path: Path, backend: str) -> None:
    config = tmp_path / "r.toml"
    config.write_text(f"""
[upstream]
url = "http://127.0.0.1:9/api/v2/"
api_key_env = "TEST_UPSTREAM_KEY"
[storage]
backend = "{backend}"
redis_url = "redis://127.0.0.1:{free_port()}/0"
[teams.t]
keys = ["team-key"]
quota = 1
""")
    result = subprocess.run([*gateway_command(), "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=30,
                            env={"TEST_UPSTREAM_KEY": "k", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1 and "Redis unavailable" in result.stderr


async def test_readyz_and_requests_turn_503_when_the_store_goes_away(
        gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path) -> None:
    """A Redis store of the test's own, killed under a running gateway: /readyz says why, a
    request is refused 503 (fail closed: nothing forwarded unmetered), /healthz stays up."""
    import requests

    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                             stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                              text=True).stdout.strip() == "PONG":
                break
            await asyncio.sleep(0.05)
        gw = await gateway_factory(storage={"backend": "redis",
                                            "redis_url": f"redis://127.0.0.1:{port}/0"})
        ready = await asyncio.to_thread(requests.get, gw.base + "/readyz", timeout=5)
        assert ready.status_code == 200
        redis.kill()
        redis.wait()
        ready = await asyncio.to_thread(requests.get, gw.base + "/readyz", timeout=10)
        assert ready.status_code == 503 and "store unreachable" in ready.json()["problems"]
        r = await post_requests(gw.url, *objects_form(SEARCH, make_png(500)))
        assert r.status_code == 503 and r.json()["data"] is None
        assert sim.state.calls == 0
        health = await asyncio.to_thread(requests.get, gw.base + "/healthz", timeout=5)
        assert health.status_code == 200
        gw.state.draining = True  # as on SIGTERM
        ready = await asyncio.to_thread(requests.get, gw.base + "/readyz", timeout=10)
        assert "draining" in ready.json()["problems"]
    finally:
        if redis.poll() is None:
            redis.kill()
            redis.wait()


async def test_damaged_ledger_index_refuses_to_start_and_repair_keeps_the_spend(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess]) -> None:
    """An index page of the ledger damaged while the team is spent: read through the index,
    the team would look unspent and be let through again. The gateway refuses to start;
    check-store --repair rebuilds the index from the table, keeping the charges, and leaves
    no readable copy behind."""
    gw, config, db = await serve_process(tmp_path, sim, processes, quota=3, log="g.log")
    port = gw.port
    codes = [(await post_requests(gw.url, *objects_form("team-key", make_png(800 + i))))
             .status_code for i in range(4)]
    assert codes == [200, 200, 200, 402]
    assert gw.stop() == 0
    checkpoint(db)
    conn = sqlite3.connect(db)
    (root,) = conn.execute("SELECT rootpage FROM sqlite_master "
                           "WHERE name = 'sqlite_autoindex_quota_usage_1'").fetchone()
    (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    conn.close()
    data = bytearray(db.read_bytes())
    page = (root - 1) * page_size
    at = page + bytes(data[page:page + page_size]).rindex(b"t")  # the team in the index cell
    data[at] = ord("u")  # the index now names another team than the table row it points to
    db.write_bytes(bytes(data))

    env = {"TEST_UPSTREAM_KEY": "k", "PATH": "/usr/bin:/bin"}
    served = subprocess.run([*gateway_command(), "serve", "--config", str(config)],
                            capture_output=True, text=True, env=env, timeout=30)
    assert served.returncode == 1, served.stderr
    assert "integrity check failed" in served.stderr and "check-store" in served.stderr
    repair = subprocess.run([*gateway_command(), "check-store", "--config", str(config),
                             "--repair"], capture_output=True, text=True)
    assert repair.returncode == 0, repair.stdout
    assert "rebuilt" in repair.stdout
    assert not list(tmp_path.glob("g.db.repair-*"))
    assert all(p.stat().st_mode & 0o077 == 0 for p in tmp_path.glob("g.db*"))

    again = GatewayProcess(config, port, tmp_path / "g2.log")
    processes.append(again)
    await asyncio.to_thread(again.wait_ready)
    r = await post_requests(again.url, *objects_form("team-key", make_png(900)))
    assert r.status_code == 402  # the three charges survived the repair
    assert sim.state.calls == 3


async def test_an_unreadable_cache_does_not_freeze_the_spend_gauges(
        gateway: Gateway, sim: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache's totals failing (injected: a damaged page reads as an error) must not stop
    gateway_quota_used from following the ledger."""
    import requests

    from gateway.store.base import StoreUnavailable

    async def unreadable() -> tuple[int, int]:
        raise StoreUnavailable("SQLite read failed: database disk image is malformed")

    monkeypatch.setattr(gateway.state.store, "totals", unreadable)
    for i in range(2):
        r = await post_requests(gateway.url, *objects_form(SEARCH, make_png(600 + i)))
        assert r.status_code == 200
    scrape = (await asyncio.to_thread(requests.get, gateway.base + "/metrics", timeout=5)).text
    assert 'gateway_quota_used{team="search"} 2.0' in scrape


def _prepare_at(path: str, start: float, results: Any) -> None:
    from gateway.store.sqlite import LEDGER_MIGRATIONS, LEDGER_PROBE, prepare_file

    while time.time() < start:  # both processes switch the new file to WAL at once
        pass
    try:
        prepare_file(path, LEDGER_MIGRATIONS, LEDGER_PROBE, verify=True)
        results.put("ok")
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")


def test_two_processes_preparing_a_new_store_at_once_both_start(tmp_path: Path) -> None:
    """Two workers (or two gateways) starting together on a new ledger: SQLite refused the
    WAL switch of one of them at once ("database is locked") about half the time."""
    context = multiprocessing.get_context("fork")
    outcomes = []
    for i in range(12):
        path = str(tmp_path / f"new-{i}.db")
        results = context.Queue()
        start = time.time() + 0.05
        procs = [context.Process(target=_prepare_at, args=(path, start, results))
                 for _ in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(30)
        outcomes += [results.get(timeout=5) for _ in procs]
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert outcomes == ["ok"] * 24
