"""GET /team through the installed command: each team sees its own quota, spend and savings
with its own key, nothing of another team's; a wrong key is the API's 401 envelope; the rate
limit is the team's own; no key reaches the log."""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

from gateway.config import load_config
from gateway.core.keys import create_key
from gateway.devtools.sample_images import make_png
from gateway.store import open_store
from tests.support import (
    UPSTREAM_KEY,
    GatewayProcess,
    Sim,
    free_port,
    objects_form,
    post_requests,
    write_config,
)

KEYS = {"search": "search-k3y-never-logged", "ads": "ads-k3y-never-logged",
        "slow": "slow-k3y-never-logged"}
WRONG_KEY = "wrong-k3y-never-logged"
EXTRA = f"""
[teams.slow]
keys = ["{KEYS["slow"]}"]
quota = 7
rate_per_s = 0.001
burst = 2

[pricing]
per_call = 0.25
currency = "EUR"
"""


async def team(port: int, *, bearer: str | None = None, query: str | None = None
               ) -> requests.Response:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer is not None else {}
    params = {"apikey": query} if query is not None else {}
    return await asyncio.to_thread(requests.get, f"http://127.0.0.1:{port}/team",
                                   headers=headers, params=params, timeout=10)


async def test_each_team_sees_its_own_figures_and_no_other_teams(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess]) -> None:
    port = free_port()
    config = write_config(tmp_path / "c.toml", sim_url=sim.url, db=tmp_path / "g.db", port=port,
                          teams={"search": (KEYS["search"], 5), "ads": (KEYS["ads"], 10)},
                          extra=EXTRA)
    gw = GatewayProcess(config, port, tmp_path / "gw.log")
    processes.append(gw)
    await asyncio.to_thread(gw.wait_ready)
    for seed in (1, 2, 3, 1):  # search: three paid misses, then a hit
        assert (await post_requests(gw.url, *objects_form(KEYS["search"], make_png(seed)))
                ).status_code == 200
    for seed in (2, 4):  # ads: a hit on search's result, then its own miss
        assert (await post_requests(gw.url, *objects_form(KEYS["ads"], make_png(seed)))
                ).status_code == 200
    assert sim.state.calls == 4

    search = await team(port, bearer=KEYS["search"])
    assert search.status_code == 200, search.text
    assert search.headers["Content-Type"].startswith("application/json")
    assert search.headers["Cache-Control"] == "no-store"
    s: dict[str, Any] = search.json()
    assert s["team"] == "search" and s["quota_period"] == "month"
    assert {k: s["quota"][k] for k in ("limit", "used", "remaining")} == {
        "limit": 5, "used": 3, "remaining": 2}
    resets = datetime.fromisoformat(s["quota"]["resets_at"].replace("Z", "+00:00"))
    assert (resets.day, resets.hour, resets.minute, resets.second) == (1, 0, 0, 0)
    assert 0 < s["quota"]["resets_in_s"] <= 31 * 86400
    assert s["calls"] == {"charged": 3, "cache_hits": 1, "derived_hits": 0, "coalesced": 0,
                          "calls_saved": 1, "undelivered": 0}
    assert s["hit_ratio"] == 0.25
    assert (s["spend"], s["savings"], s["currency"]) == (0.75, 0.25, "EUR")
    assert s["refused_since_start"] == {"402": 0, "429": 0}

    ads = await team(port, query=KEYS["ads"])  # the query string works too
    assert ads.status_code == 200, ads.text
    a = ads.json()
    assert a["team"] == "ads"
    assert (a["quota"]["limit"], a["quota"]["used"], a["quota"]["remaining"]) == (10, 1, 9)
    assert a["calls"]["cache_hits"] == 1 and a["hit_ratio"] == 0.5
    assert (a["spend"], a["savings"]) == (0.25, 0.25)
    # Nothing of another team: no other team's name or key, anywhere in the answer.
    for answer, others in ((search.text, ("ads", "slow")), (ads.text, ("search", "slow"))):
        for other in others:
            assert other not in answer and KEYS[other] not in answer
    # The header wins over the query: one key, one team.
    both = await team(port, bearer=KEYS["ads"], query=KEYS["search"])
    assert both.json()["team"] == "ads"

    # A wrong key is the API's 401 envelope; no key is the API's 400.
    for wrong in (await team(port, bearer=WRONG_KEY), await team(port, query=WRONG_KEY),
                  await team(port, bearer=KEYS["search"] + "x")):
        assert wrong.status_code == 401
        assert wrong.json() == {"status": 401, "status_message": "APIkey invalid", "data": None}
        assert wrong.headers["WWW-Authenticate"] == "Bearer"
    missing = await team(port)
    assert missing.status_code == 400 and missing.json()["status"] == 400

    # The team's own rate limit: burst 2, shared with /api/v2/.
    assert (await post_requests(gw.url, *objects_form(KEYS["slow"], make_png(1)))
            ).status_code == 200
    assert (await team(port, bearer=KEYS["slow"])).status_code == 200
    limited = await team(port, bearer=KEYS["slow"])
    assert limited.status_code == 429 and limited.json()["status"] == 429
    assert int(limited.headers["Retry-After"]) > 0
    assert (await team(port, bearer=KEYS["search"])).status_code == 200  # others unaffected

    assert gw.stop(signal.SIGTERM) == 0  # the access log is flushed at exit
    log = gw.log_path.read_text()
    for secret in (*KEYS.values(), WRONG_KEY, UPSTREAM_KEY):
        assert secret not in log, f"{secret} in the log"
    team_lines = [line for line in log.splitlines() if "path=/team" in line]
    assert any("team=search" in line and "status=200" in line for line in team_lines), log
    assert any("team=unknown" in line and "status=401" in line for line in team_lines), log


async def test_a_team_sees_its_own_store_keys_last_use_and_no_other_teams(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess]) -> None:
    port = free_port()
    config_path = write_config(tmp_path / "c.toml", sim_url=sim.url, db=tmp_path / "g.db",
                               port=port, teams={"search": (KEYS["search"], 5),
                                                 "ads": (KEYS["ads"], 10)})
    config = load_config(config_path, {"TEST_UPSTREAM_KEY": UPSTREAM_KEY})
    store = open_store(config.storage)
    await store.open()
    try:
        now = time.time()
        used, used_record = await create_key(store, config, "search", now=now, label="batch")
        _, idle_record = await create_key(store, config, "search", now=now, label="old-batch",
                                          lifetime_s=86400)
        ads_key, ads_record = await create_key(store, config, "ads", now=now, label="ads-web")
    finally:
        await store.close()
    gw = GatewayProcess(config_path, port, tmp_path / "gw.log")
    processes.append(gw)
    await asyncio.to_thread(gw.wait_ready)
    assert (await post_requests(gw.url, *objects_form(used, make_png(1)))).status_code == 200
    assert (await post_requests(gw.url, *objects_form(ads_key, make_png(2)))).status_code == 200

    answer = await team(port, bearer=used)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["team"] == "search" and body["config_keys"] == 1
    keys = {k["id"]: k for k in body["keys"]}
    assert set(keys) == {used_record.id, idle_record.id}  # not ads' key
    batch, idle = keys[used_record.id], keys[idle_record.id]
    assert (batch["label"], batch["state"], batch["this_request"]) == ("batch", "active", True)
    assert batch["uses"] == 2  # its recognition and this request
    assert batch["last_used_at"] is not None and batch["expires_at"] is None
    assert (idle["label"], idle["uses"], idle["last_used_at"], idle["this_request"]) == (
        "old-batch", 0, None, False)
    assert idle["expires_at"] is not None
    assert ads_record.id not in answer.text and "ads" not in answer.text
    for record in (used_record, idle_record, ads_record):
        assert record.key_hash not in answer.text  # a hash is never shown
    assert used not in answer.text

    assert gw.stop(signal.SIGTERM) == 0
    log = gw.log_path.read_text()
    assert used not in log and ads_key not in log
