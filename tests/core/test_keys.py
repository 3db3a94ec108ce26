"""Team keys issued through the store: `gateway keys new --store|list|revoke|rotate` and
/admin/keys, against running gateways (in-process on loopback, and the installed command)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import requests

from gateway.config import AdminConfig, Secret, hash_key, load_config
from gateway.core.keys import REVOKE_BOUND_S, STALE_AFTER_S
from gateway.devtools.sample_images import make_png
from tests.support import (
    TEAM_KEYS,
    UPSTREAM_KEY,
    Gateway,
    GatewayFactory,
    GatewayProcess,
    Sim,
    free_port,
    make_config,
    objects_form,
    post_requests,
)
from tests.support.admin import ADMIN, BEARER, TOKEN, acli, call, config_for

REDIS_URL = "redis://127.0.0.1:6379/15"
KEY_INVALID = {"status": 401, "status_message": "APIkey invalid", "data": None}


def shown_key(stdout: str) -> tuple[str, str]:
    """(key id, plaintext) from what `keys new --store` or `keys rotate` printed."""
    found = re.search(r"^New key (key_[0-9a-f]{12}) ", stdout, re.M)
    assert found, stdout
    plaintext = next(line.strip() for line in stdout.splitlines() if line.startswith("  "))
    return found.group(1), plaintext


async def lookup(url: str, key: str) -> requests.Response:
    """A type=cache lookup: authorized like any request, costs no upstream call."""
    return await post_requests(url, {"apikey": key, "type": "cache", "hash": "0" * 32})


async def until(check: Callable[[], Awaitable[bool]], within: float) -> float:
    """Seconds until ``check`` holds; fails past ``within``."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < within, f"not within {within} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def status_is(url: str, key: str, status: int) -> bool:
    return (await lookup(url, key)).status_code == status


async def listed(path: Path) -> dict[str, Any]:
    out = await acli("keys", "list", "--format", "json", "--config", str(path))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


# -- the CLI against a running gateway ---------------------------------------------------------
async def test_a_key_made_by_the_cli_works_at_once_counts_its_uses_and_ends_when_revoked(
    gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config_for(tmp_path, sim)
    monkeypatch.setenv("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
    gw = await gateway_factory(load_config(path))
    out = await acli("keys", "new", "ads", "--store", "--label", "batch job", "--expires", "90d",
                     "--config", str(path))
    assert out.returncode == 0 and out.stderr == "", out.stderr
    key_id, key = shown_key(out.stdout)
    assert len(key) >= 43 and 'label "batch job"' in out.stdout

    await until(lambda: status_is(gw.url, key, 200), REVOKE_BOUND_S + 3)
    r = await post_requests(gw.url, *objects_form(key, make_png(41)))
    assert r.status_code == 200 and r.json()["data"]["quota"] == 999  # charged to ads
    assert sim.state.calls == 1
    # Only its hash is kept. Read by another process: closing a file descriptor on the
    # database here would drop the gateway's SQLite locks (POSIX locks are per process).
    found = await asyncio.to_thread(subprocess.run, ["grep", "-rlF", key, str(tmp_path)],
                                    capture_output=True, check=False)
    assert (found.returncode, found.stdout) == (1, b"")

    async def two_uses() -> bool:
        mine = [k for k in (await listed(path))["keys"] if k["id"] == key_id]
        return bool(mine) and mine[0]["uses"] == 2

    await until(two_uses, 10)
    report = await listed(path)
    (entry,) = report["keys"]
    assert (entry["team"], entry["label"], entry["state"]) == ("ads", "batch job", "active")
    assert entry["last_used_at"] is not None and entry["expires_at"] is not None
    assert report["config_keys"] == {"search": 1, "ads": 1, "tiny": 1}
    assert hash_key(key) not in json.dumps(report) and key not in json.dumps(report)
    table = (await acli("keys", "list", "--team", "ads", "--config", str(path))).stdout
    row = next(line for line in table.splitlines() if line.startswith(key_id))
    assert re.search(r"ads .*batch job .*active .*\d{4}-\d\d-\d\dT.* 2$", row), row
    assert "never" not in row
    assert "keys in the config" in table

    out = await acli("keys", "revoke", key_id, "--config", str(path))
    assert out.returncode == 0 and f"revoked {key_id} (team ads)" in out.stdout
    await until(lambda: status_is(gw.url, key, 401), REVOKE_BOUND_S + 3)
    r = await post_requests(gw.url, *objects_form(key, make_png(42)))
    assert (r.status_code, r.json()) == (401, KEY_INVALID)
    assert sim.state.calls == 1  # refused: no upstream call, no charge
    assert await gw.state.store.used("ads", gw.state.ledger.period()) == 1
    assert (await listed(path))["keys"][0]["state"] == "revoked"
    r = await post_requests(gw.url, *objects_form(TEAM_KEYS["ads"], make_png(43)))
    assert r.status_code == 200  # the config's key is untouched


async def test_an_expired_key_is_refused_and_a_rotated_key_lasts_its_grace(
    gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config_for(tmp_path, sim)
    monkeypatch.setenv("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
    now = [time.time()]
    gw = await gateway_factory(load_config(path), clock=lambda: now[0])
    out = await acli("keys", "new", "search", "--store", "--expires", "1d", "--config", str(path))
    _, short = shown_key(out.stdout)
    out = await acli("keys", "new", "search", "--store", "--label", "api", "--expires", "30d",
                     "--config", str(path))
    old_id, old = shown_key(out.stdout)
    await until(lambda: status_is(gw.url, old, 200), REVOKE_BOUND_S + 3)

    out = await acli("keys", "rotate", old_id, "--grace", "1h", "--config", str(path))
    assert out.returncode == 0, out.stderr
    new_id, new = shown_key(out.stdout)
    assert new_id != old_id and new != old and 'label "api"' in out.stdout
    assert f"The old key {old_id} works until " in out.stdout
    await until(lambda: status_is(gw.url, new, 200), REVOKE_BOUND_S + 3)
    assert (await lookup(gw.url, old)).status_code == 200  # within its grace

    now[0] += 3600 - 60
    for key in (short, old, new):
        assert (await lookup(gw.url, key)).status_code == 200
    now[0] += 120  # past the grace: the old key is refused at once, the new one is not
    r = await lookup(gw.url, old)
    assert (r.status_code, r.json()) == (401, KEY_INVALID)
    assert (await lookup(gw.url, new)).status_code == 200

    now[0] += 86400  # a day on: the 1d key has expired, the rotated one lives 30d
    assert (await lookup(gw.url, short)).status_code == 401
    assert (await lookup(gw.url, new)).status_code == 200
    keys = {k["id"]: k for k in (await listed(path))["keys"]}
    assert keys[new_id]["label"] == "api"
    lifetime = [datetime_s(keys[new_id][f]) for f in ("created_at", "expires_at")]
    assert abs(lifetime[1] - lifetime[0] - 30 * 86400) <= 1  # the old key's lifetime

    out = await acli("keys", "revoke", new_id, "--config", str(path))
    assert out.returncode == 0
    out = await acli("keys", "rotate", new_id, "--config", str(path))
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.strip() == (f"gateway keys: key {new_id} is revoked: make a new one with "
                                  "`gateway keys new`")


def datetime_s(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def test_the_cli_refuses_what_it_cannot_do_and_prints_no_key(
    sim: Sim, tmp_path: Path, gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config_for(tmp_path, sim)
    monkeypatch.setenv("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
    await gateway_factory(load_config(path))  # the store exists
    cases = {
        ("new", "ads", "--label", "x"): "--label and --expires need --store",
        ("new", "ads", "--expires", "1d"): "--label and --expires need --store",
        ("new", "ads", "--store", "--new-team"): "--store needs a team in the config",
        ("new", "marketing", "--store"): "team marketing is not in",
        ("new", "ads", "--store", "--expires", "soon"): "--expires: age 'soon'",
        ("new", "ads", "--store", "--expires", "0s"): "expires: give a positive age",
        ("revoke", "key_000000000000"): "no store-issued key 'key_000000000000'",
        ("rotate", "key_000000000000"): "no store-issued key 'key_000000000000'",
        ("rotate", "key_000000000000", "--grace", "week"): "--grace: age 'week'",
    }
    for args, message in cases.items():
        out = await acli("keys", *args, "--config", str(path))
        assert (out.returncode, out.stdout) == (2, ""), args
        assert out.stderr.startswith("gateway keys: ") and message in out.stderr, out.stderr
    assert (await listed(path))["keys"] == []


# -- two replicas on one Redis ----------------------------------------------------------------
@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    prefix = f"keys:{uuid.uuid4().hex}:"
    yield prefix
    r = aioredis.Redis.from_url(REDIS_URL)
    async for k in r.scan_iter(match=prefix + "*"):
        await r.delete(k)
    await r.aclose()


async def test_a_revoke_on_one_replica_is_refused_by_both_within_the_bound(
    gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path, client: aiohttp.ClientSession,
    redis_prefix: str
) -> None:
    config = make_config(sim.url, tmp_path / "unused.db", storage={
        "backend": "redis", "redis_url": REDIS_URL, "redis_prefix": redis_prefix})
    config = replace(config, admin=AdminConfig("GW_ADMIN_TOKEN", Secret(TOKEN)))
    a, b = await gateway_factory(config), await gateway_factory(config)

    status, made, r = await call(client, "POST", f"{a.base}/admin/keys", headers=BEARER,
                                 json={"team": "search", "label": "svc", "expires": "90d"})
    assert status == 201 and r.headers["Cache-Control"] == "no-store"
    key = made["key"]
    assert (made["team"], made["label"], made["state"], made["uses"]) == ("search", "svc",
                                                                           "active", 0)
    assert (await lookup(a.url, key)).status_code == 200  # the replica that made it: at once
    await until(lambda: status_is(b.url, key, 200), REVOKE_BOUND_S + 3)
    for gw, image in ((a, 51), (b, 52)):
        r = await post_requests(gw.url, *objects_form(key, make_png(image)))
        assert r.status_code == 200
    assert sim.state.calls == 2

    async def uses_of_both() -> bool:
        _, listing, _ = await call(client, "GET", f"{a.base}/admin/keys?team=search",
                                   headers=BEARER)
        return bool(listing["keys"][0]["uses"] >= 4 and listing["keys"][0]["last_used_at"])

    await until(uses_of_both, 10)  # b wrote its uses to the store within a second or so

    status, revoked, _ = await call(client, "POST", f"{a.base}/admin/keys/{made['id']}/revoke",
                                    headers=BEARER)
    assert (status, revoked["state"]) == (200, "revoked")
    r = await lookup(a.url, key)
    assert (r.status_code, r.json()) == (401, KEY_INVALID)  # at once where it was revoked
    took = await until(lambda: status_is(b.url, key, 401), REVOKE_BOUND_S + 3)
    assert took <= REVOKE_BOUND_S + 0.5, took
    r = await post_requests(b.url, *objects_form(key, make_png(53)))
    assert (r.status_code, r.json()) == (401, KEY_INVALID)
    assert sim.state.calls == 2
    assert (await lookup(b.url, TEAM_KEYS["search"])).status_code == 200


# -- the admin API ----------------------------------------------------------------------------
@pytest.fixture
async def keys_gw(gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path) -> Gateway:
    config = make_config(sim.url, tmp_path / "gateway.db")
    return await gateway_factory(replace(config, admin=AdminConfig("GW_ADMIN_TOKEN",
                                                                   Secret(TOKEN))))


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), [
    pytest.param("POST", "/admin/keys", {}, 400, "team is required", id="no-team"),
    pytest.param("POST", "/admin/keys", {"team": "marketing"}, 400,
                 "team marketing is not in <test>", id="unknown-team"),
    pytest.param("POST", "/admin/keys", {"team": "ads", "expires": "soon"}, 400,
                 "expires: age 'soon'", id="bad-expires"),
    pytest.param("POST", "/admin/keys", {"team": "ads", "label": "x" * 101}, 400,
                 "label: at most 100", id="long-label"),
    pytest.param("POST", "/admin/keys/key_000000000000/revoke", {}, 404,
                 "no store-issued key 'key_000000000000'", id="revoke-unknown"),
    pytest.param("POST", "/admin/keys/key_000000000000/rotate", {}, 404,
                 "no store-issued key 'key_000000000000'", id="rotate-unknown"),
    pytest.param("POST", "/admin/keys/key_000000000000/rotate", {"grace": "later"}, 400,
                 "grace: age 'later'", id="bad-grace"),
])
async def test_admin_keys_refusals_are_envelopes_and_make_no_key(
    keys_gw: Gateway, client: aiohttp.ClientSession, method: str, path: str,
    body: dict[str, str], status: int, message: str
) -> None:
    got, answer, _ = await call(client, method, keys_gw.base + path, headers=BEARER, json=body)
    assert got == status and answer["status"] == status and answer["data"] is None
    assert message in answer["status_message"], answer
    assert await keys_gw.state.store.list_keys() == []


async def test_admin_rotate_keeps_the_old_key_for_its_grace_and_lists_no_secret(
    gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    now = [time.time()]
    config = replace(make_config(sim.url, tmp_path / "gateway.db"),
                     admin=AdminConfig("GW_ADMIN_TOKEN", Secret(TOKEN)))
    gw = await gateway_factory(config, clock=lambda: now[0])
    _, made, _ = await call(client, "POST", f"{gw.base}/admin/keys", headers=BEARER,
                            data={"team": "tiny"})
    assert made["expires_at"] is None and made["label"] == ""
    status, rotated, r = await call(client, "POST", f"{gw.base}/admin/keys/{made['id']}/rotate",
                                    headers=BEARER, data={"grace": "10m"})
    assert status == 201 and r.headers["Cache-Control"] == "no-store"
    assert rotated["old"]["id"] == made["id"] and rotated["old"]["expires_at"] is not None
    assert rotated["team"] == "tiny" and rotated["expires_at"] is None
    for key in (made["key"], rotated["key"]):
        assert (await lookup(gw.url, key)).status_code == 200
    now[0] += 601
    assert (await lookup(gw.url, made["key"])).status_code == 401
    assert (await lookup(gw.url, rotated["key"])).status_code == 200
    _, listing, _ = await call(client, "GET", f"{gw.base}/admin/keys", headers=BEARER)
    states = {k["id"]: k["state"] for k in listing["keys"]}
    assert states == {made["id"]: "expired", rotated["id"]: "active"}
    assert listing["config_keys"] == {"search": 1, "ads": 1, "tiny": 1}
    text = json.dumps(listing)
    for key in (made["key"], rotated["key"]):
        assert key not in text and hash_key(key) not in text


# -- the installed command: a refused key is never logged --------------------------------------
def test_a_refused_store_key_is_never_logged(
    sim: Sim, tmp_path: Path, processes: list[GatewayProcess]
) -> None:
    port = free_port()
    path = config_for(tmp_path, sim, extra=ADMIN, port=port)
    proc = GatewayProcess(path, port, tmp_path / "gateway.log", env={"GW_ADMIN_TOKEN": TOKEN})
    processes.append(proc)
    proc.wait_ready()
    base = f"http://127.0.0.1:{port}"
    made = requests.post(f"{base}/admin/keys", headers=BEARER, timeout=10,
                         data={"team": "ads", "label": "ci"}).json()
    key = made["key"]
    assert requests.post(proc.url, data={"apikey": key, "type": "cache", "hash": "0" * 32},
                         timeout=10).status_code == 200
    assert requests.post(f"{base}/admin/keys/{made['id']}/revoke", headers=BEARER,
                         timeout=10).status_code == 200
    guess = "x" + key[1:]
    for refused in (key, guess):
        r = requests.post(proc.url, data={"apikey": refused, "type": "cache", "hash": "0" * 32},
                          timeout=10)
        assert (r.status_code, r.json()) == (401, KEY_INVALID)
        assert refused not in r.text
    proc.stop()
    log = proc.log_path.read_text()
    assert f"key {made['id']} issued for team ads" in log and f"key {made['id']}" in log
    for secret in (key, guess, hash_key(key), hash_key(guess)[7:], TOKEN):
        assert secret not in log
    refusals = [line for line in log.splitlines() if "status=401" in line]
    assert len(refusals) == 2 and all("team=unknown" in line for line in refusals)


async def test_store_keys_fail_closed_when_the_store_cannot_be_reread(
    keys_gw: Gateway, client: aiohttp.ClientSession
) -> None:
    """A process that could not re-read the store's keys for STALE_AFTER_S can't know of a
    revoke: its store-issued keys get 503 (no upstream call), its config keys still work."""
    _, made, _ = await call(client, "POST", f"{keys_gw.base}/admin/keys", headers=BEARER,
                            data={"team": "ads"})
    assert (await lookup(keys_gw.url, made["key"])).status_code == 200
    ring = keys_gw.state.keyring
    await ring.close()  # no more re-reads, as when every read fails
    ring.read_at = time.monotonic() - STALE_AFTER_S - 1
    r = await lookup(keys_gw.url, made["key"])
    assert (r.status_code, r.json()["status_message"]) == (503, "Gateway store unavailable")
    assert (await lookup(keys_gw.url, TEAM_KEYS["ads"])).status_code == 200
    await ring.refresh()  # a good read ends it
    assert (await lookup(keys_gw.url, made["key"])).status_code == 200
