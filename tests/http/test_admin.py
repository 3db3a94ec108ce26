"""The admin HTTP API (/admin/...) and the status page (/status, /status.json)."""

from __future__ import annotations

import base64
import calendar
import json
import logging
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import AdminConfig, PricingConfig, Secret, load_config
from gateway.core.usage import iso_utc, period_resets_at
from gateway.devtools.sample_images import make_png
from gateway.http.admin import render_status
from tests.support import (
    TEAM_KEYS,
    UPSTREAM_KEY,
    Gateway,
    GatewayFactory,
    Sim,
    free_port,
    make_config,
    objects_form,
    post_requests,
    write_config,
)
from tests.support.admin import BEARER, EXPECTED, IMAGES, TOKEN, call, play_workload

UNAUTHORIZED = {"status": 401, "status_message": "Admin token missing or invalid", "data": None}

# At 0.002 EUR a call: spend = charged x price, savings = calls saved x price.
MONEY = {"search": (0.004, 0.006), "ads": (0.002, 0.006), "tiny": (0.006, 0.002),
         "(total)": (0.012, 0.014)}


def team_rows(report: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    rows = {t["team"]: t for t in [*report["teams"], report["total"]]}
    return {name: (t["charged"], t["quota"], t["remaining"], t["cache_hits"], t["coalesced"],
                   t["calls_saved"]) for name, t in rows.items()}


@pytest.fixture
async def admin_gw(gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path) -> Gateway:
    config = make_config(sim.url, tmp_path / "gateway.db")
    return await gateway_factory(replace(config, admin=AdminConfig("GW_ADMIN_TOKEN",
                                                                   Secret(TOKEN)),
                                         pricing=PricingConfig(per_call=0.002, currency="EUR")))


ADMIN_ROUTES = [
    pytest.param("GET", "/admin/usage", id="usage"),
    pytest.param("GET", "/admin/cache/stats", id="cache-stats"),
    pytest.param("POST", "/admin/cache/purge", id="cache-purge"),
    pytest.param("POST", "/admin/reload", id="reload"),
    pytest.param("GET", "/admin/keys", id="keys-list"),
    pytest.param("POST", "/admin/keys", id="keys-new"),
    pytest.param("POST", "/admin/keys/key_000000000000/revoke", id="keys-revoke"),
    pytest.param("POST", "/admin/keys/key_000000000000/rotate", id="keys-rotate"),
]
# What each route answers the right token with the test's body ({"hash": "0" * 32}): let in,
# then refused for what the body lacks (reload: a test config has no file to re-read).
LET_IN = {("POST", "/admin/reload"): 400, ("POST", "/admin/keys"): 400,
          ("POST", "/admin/keys/key_000000000000/revoke"): 404,
          ("POST", "/admin/keys/key_000000000000/rotate"): 404}


# -- admin off --------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
async def test_admin_routes_are_404_when_admin_is_off(
    gateway: Gateway, client: aiohttp.ClientSession, method: str, path: str
) -> None:
    status, _, _ = await call(client, method, gateway.base + path, headers=BEARER)
    assert status == 404


STATUS_OFF = {
    "status": 403,
    "status_message": "Status page off: set [admin] status_token_env or token_env, "
                      "or public_status = true",
    "data": None,
}


async def test_status_page_is_refused_when_no_token_is_set(
    gateway: Gateway, sim: Sim, client: aiohttp.ClientSession
) -> None:
    """Team names and usage are not for anyone who can reach the port."""
    await play_workload(gateway, sim)
    for path in ("/status", "/status.json"):
        status, body, _ = await call(client, "GET", gateway.base + path)
        assert (status, body) == (403, STATUS_OFF)
        assert "search" not in json.dumps(body)


async def test_status_page_is_open_with_public_status(
    gateway_factory: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(admin={"public_status": True})
    status, page, r = await call(client, "GET", f"{gw.base}/status")
    assert status == 200 and r.content_type == "text/html"
    assert '<meta http-equiv="refresh" content="10">' in page
    status, body, _ = await call(client, "GET", f"{gw.base}/status.json")
    assert status == 200 and [t["team"] for t in body["teams"]] == ["search", "ads", "tiny"]
    assert (await call(client, "GET", f"{gw.base}/admin/usage"))[0] == 404


VIEWER = "viewer-t0ken-read-only-4c3b2a"


async def test_the_viewer_token_opens_the_status_page_and_nothing_else(
    gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    config = make_config(sim.url, tmp_path / "gateway.db")
    gw = await gateway_factory(replace(config, admin=AdminConfig(
        "GW_ADMIN_TOKEN", Secret(TOKEN), "GW_STATUS_TOKEN", Secret(VIEWER))))
    for path in ("/status", "/status.json"):
        for value in (f"Bearer {VIEWER}", basic(VIEWER), f"Bearer {TOKEN}", basic(TOKEN)):
            assert (await call(client, "GET", gw.base + path,
                               headers={"Authorization": value}))[0] == 200, (path, value)
        for value in (f"Bearer {VIEWER}x", basic(VIEWER[:-1]), ""):
            assert (await call(client, "GET", gw.base + path,
                               headers={"Authorization": value}))[0] == 401, (path, value)
    for method, path in (("GET", "/admin/usage"), ("GET", "/admin/cache/stats"),
                         ("POST", "/admin/cache/purge"), ("POST", "/admin/reload")):
        status, body, _ = await call(client, method, gw.base + path, data={"all": "true"},
                                     headers={"Authorization": f"Bearer {VIEWER}"})
        assert (status, body) == (401, UNAUTHORIZED), path


# -- authentication ---------------------------------------------------------------------------
BAD_AUTH = [
    pytest.param({}, id="missing"),
    pytest.param({"Authorization": "Bearer not-the-token"}, id="wrong"),
    pytest.param({"Authorization": f"Bearer {TOKEN}x"}, id="longer"),
    pytest.param({"Authorization": f"Bearer {TOKEN[:-1]}"}, id="shorter"),
    pytest.param({"Authorization": "Bearer "}, id="empty"),
    pytest.param({"Authorization": TOKEN}, id="no-scheme"),
    pytest.param({"Authorization": f"Token {TOKEN}"}, id="other-scheme"),
    pytest.param({"Authorization": "Basic " + base64.b64encode(f"x:{TOKEN}".encode()).decode()},
                 id="basic-on-api"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
@pytest.mark.parametrize("headers", BAD_AUTH)
async def test_admin_routes_refuse_a_missing_or_wrong_token(
    admin_gw: Gateway, client: aiohttp.ClientSession, method: str, path: str,
    headers: dict[str, str]
) -> None:
    status, body, r = await call(client, method, admin_gw.base + path, headers=headers,
                                 data={"all": "true"})
    assert status == 401
    assert body == UNAUTHORIZED
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert TOKEN not in json.dumps(body) and TOKEN not in str(dict(r.headers))
    assert (await admin_gw.state.store.totals()) == (0, 0)


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
async def test_admin_routes_answer_the_right_token(
    admin_gw: Gateway, client: aiohttp.ClientSession, method: str, path: str
) -> None:
    status, body, _ = await call(client, method, admin_gw.base + path, headers=BEARER,
                                 data={"hash": "0" * 32})
    assert (status, type(body)) == (LET_IN.get((method, path), 200), dict)
    assert TOKEN not in json.dumps(body)


async def test_status_page_wants_the_token_when_admin_is_on(
    admin_gw: Gateway, client: aiohttp.ClientSession
) -> None:
    for path in ("/status", "/status.json"):
        status, body, r = await call(client, "GET", admin_gw.base + path)
        assert status == 401 and body == UNAUTHORIZED
        assert r.headers.getall("WWW-Authenticate") == ["Bearer", 'Basic realm="gateway status"']
        wrong = "Basic " + base64.b64encode(b"ops:guess").decode()
        assert (await call(client, "GET", admin_gw.base + path,
                           headers={"Authorization": wrong}))[0] == 401
        assert (await call(client, "GET", admin_gw.base + path, headers=BEARER))[0] == 200
        basic = "Basic " + base64.b64encode(f"ops:{TOKEN}".encode()).decode()
        assert (await call(client, "GET", admin_gw.base + path,
                           headers={"Authorization": basic}))[0] == 200


def near_misses(token: str) -> list[tuple[str, str]]:
    """Strings that are almost ``token``: each is refused wherever the token is asked for."""
    misses = [(f"prefix-{n}", token[:n]) for n in range(1, len(token))]
    misses += [(f"extended-{i}", s) for i, s in enumerate(
        (token + "x", token + "=", token + token, "x" + token, token + " x", token + ":x"))]
    misses += [("upper", token.upper()), ("swapcase", token.swapcase())]
    misses += [(f"case-{i}", token[:i] + c.swapcase() + token[i + 1:])
               for i, c in enumerate(token) if c.isalpha()]
    misses += [("inner-double-space", token[:5] + "  " + token[5:]),
               ("inner-space", token[:5] + " " + token[5:])]
    assert all(miss != token for _, miss in misses)
    return misses


def basic(password: str, user: str = "ops") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_a_near_miss_of_the_token_is_refused_everywhere(
    admin_gw: Gateway, client: aiohttp.ClientSession
) -> None:
    """Every proper prefix, extension and case change of the token, as Bearer on the admin API
    and the status page and as Basic on the status page, is a 401 (a mutant comparing with
    startswith passed the table above, which had no shorter token)."""
    usage, status = f"{admin_gw.base}/admin/usage", f"{admin_gw.base}/status.json"
    headers = [(f"bearer-{name}", f"Bearer {miss}") for name, miss in near_misses(TOKEN)]
    headers += [(f"basic-{name}", basic(miss)) for name, miss in near_misses(TOKEN)]
    headers += [("bearer-alone", "Bearer"), ("bearer-two-spaces", "Bearer  "),
                ("basic-alone", "Basic"), ("basic-no-password", basic("")),
                ("basic-token-as-user", basic("x", user=TOKEN)),
                ("basic-unencoded", f"Basic ops:{TOKEN}"),
                ("bearer-tab", f"Bearer\t{TOKEN}"), ("scheme-glued", f"Bearer{TOKEN}"),
                ("basic-not-base64", basic(TOKEN)[:10] + "*" + basic(TOKEN)[10:])]
    accepted = []
    for name, value in headers:
        for url in (usage, status):
            got, body, r = await call(client, "GET", url, headers={"Authorization": value})
            if got != 401 or body != UNAUTHORIZED or r.content_type != "application/json":
                accepted.append((name, url.rsplit("/", 1)[1], got, r.content_type))
            assert TOKEN not in str(body) and TOKEN not in str(dict(r.headers))
    assert not accepted, accepted

    # What is accepted: the token itself, the scheme in any case, spaces before the token
    # (RFC 7235: 1*SP), Basic with any user name (status page only).
    for value in (f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer  {TOKEN}"):
        for url in (usage, status):
            got, _, _ = await call(client, "GET", url, headers={"Authorization": value})
            assert got == 200, (value, url)
    for value in (basic(TOKEN), basic(TOKEN, user=""), "basic " + basic(TOKEN)[6:]):
        assert (await call(client, "GET", status, headers={"Authorization": value}))[0] == 200
        assert (await call(client, "GET", usage, headers={"Authorization": value}))[0] == 401


async def test_a_near_miss_of_the_viewer_token_is_refused(
    gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    """The viewer token as the admin token: every prefix, extension and case change, Bearer and
    Basic, is a 401 on the status page; the viewer token itself opens it and nothing else."""
    config = make_config(sim.url, tmp_path / "gateway.db")
    gw = await gateway_factory(replace(config, admin=AdminConfig(
        "GW_ADMIN_TOKEN", Secret(TOKEN), "GW_STATUS_TOKEN", Secret(VIEWER))))
    accepted = []
    for name, miss in near_misses(VIEWER):
        for value in (f"Bearer {miss}", basic(miss)):
            for path in ("/status", "/status.json"):
                got, body, r = await call(client, "GET", gw.base + path,
                                          headers={"Authorization": value})
                if got != 401 or body != UNAUTHORIZED:
                    accepted.append((name, value.split()[0], path, got))
                assert VIEWER not in str(body) and VIEWER not in str(dict(r.headers))
    assert not accepted, accepted
    for value in (f"Bearer {VIEWER}", f"bearer  {VIEWER}", basic(VIEWER, user="")):
        assert (await call(client, "GET", f"{gw.base}/status.json",
                           headers={"Authorization": value}))[0] == 200, value
        assert (await call(client, "GET", f"{gw.base}/admin/usage",
                           headers={"Authorization": value}))[0] == 401, value


async def test_a_token_with_colons_works_as_the_basic_password(
    gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    # RFC 7617: the user name ends at the first colon; the password may hold more of them.
    token = "colon:in:the:token"
    config = make_config(sim.url, tmp_path / "gateway.db")
    gw = await gateway_factory(replace(config, admin=AdminConfig("GW_ADMIN_TOKEN", Secret(token))))
    url = f"{gw.base}/status.json"
    assert (await call(client, "GET", url, headers={"Authorization": basic(token)}))[0] == 200
    for wrong in ("the:token", "token", "colon"):
        got = await call(client, "GET", url, headers={"Authorization": basic(wrong, user="x")})
        assert got[0] == 401, wrong


async def test_the_token_is_never_logged(
    admin_gw: Gateway, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for headers in (BEARER, {"Authorization": f"Bearer {TOKEN}-wrong"}):
        await call(client, "POST", f"{admin_gw.base}/admin/reload", headers=headers)
        await call(client, "POST", f"{admin_gw.base}/admin/cache/purge", headers=headers,
                   data={"all": "true"})
    assert caplog.records and TOKEN not in caplog.text


# -- endpoints --------------------------------------------------------------------------------
async def test_usage_endpoint_json_and_csv(
    admin_gw: Gateway, sim: Sim, client: aiohttp.ClientSession
) -> None:
    await play_workload(admin_gw, sim)
    month = admin_gw.state.ledger.period()
    status, report, _ = await call(client, "GET", f"{admin_gw.base}/admin/usage", headers=BEARER)
    assert status == 200
    assert (report["period"], report["quota_period"]) == (month, "month")
    assert team_rows(report) == EXPECTED

    status, again, _ = await call(client, "GET", f"{admin_gw.base}/admin/usage",
                                  params={"period": month, "format": "json"}, headers=BEARER)
    assert again == report

    status, text, r = await call(client, "GET", f"{admin_gw.base}/admin/usage",
                                 params={"format": "csv"}, headers=BEARER)
    assert status == 200 and r.content_type == "text/csv"
    assert f'filename="gateway-usage-{month}.csv"' in r.headers["Content-Disposition"]
    assert text.splitlines() == [
        "period,team,charged,quota,remaining,cache_hits,coalesced,calls_saved,undelivered,"
        "spend,savings,currency,derived_hits",
        f"{month},search,2,1000,998,3,0,3,0,0.004000,0.006000,EUR,0",
        f"{month},ads,1,1000,999,1,2,3,0,0.002000,0.006000,EUR,0",
        f"{month},tiny,3,3,0,1,0,1,0,0.006000,0.002000,EUR,0",
        f"{month},(total),6,2003,1997,5,2,7,0,0.012000,0.014000,EUR,0",
    ]
    rows = {t["team"]: t for t in [*report["teams"], report["total"]]}
    assert {name: (t["spend"], t["savings"]) for name, t in rows.items()} == MONEY
    assert (report["currency"], report["price_per_call"]) == ("EUR", 0.002)


@pytest.mark.parametrize(("query", "problem"), [
    pytest.param({"period": "2026-13"}, "use YYYY-MM", id="malformed"),
    pytest.param({"period": "2026-11-24"}, "finer than", id="day-of-a-month-ledger"),
    pytest.param({"period": "2026-W48"}, "finer than", id="week-of-a-month-ledger"),
    pytest.param({"format": "xml"}, "format must be json or csv", id="format"),
    pytest.param({"from": "2026-01-01"}, "from and to go together", id="from-alone"),
    pytest.param({"from": "2026-01-01", "to": "2026-01-31", "period": "2026-01"}, "not both",
                 id="range-and-period"),
    pytest.param({"from": "2026-01-01", "to": "2026-01-30"}, "end on the last day",
                 id="range-of-part-of-a-month"),
])
async def test_usage_endpoint_refuses_what_it_cannot_answer(
    admin_gw: Gateway, client: aiohttp.ClientSession, query: dict[str, str], problem: str
) -> None:
    status, body, _ = await call(client, "GET", f"{admin_gw.base}/admin/usage", params=query,
                                 headers=BEARER)
    assert status == 400 and body["status"] == 400 and body["data"] is None
    assert problem in body["status_message"]


async def test_usage_endpoint_sums_quarters_years_and_ranges(
    admin_gw: Gateway, sim: Sim, client: aiohttp.ClientSession
) -> None:
    await play_workload(admin_gw, sim)
    month = admin_gw.state.ledger.period()  # "YYYY-MM": the workload's row
    year, number = int(month[:4]), int(month[5:])
    last = calendar.monthrange(year, number)[1]
    for query in ({"period": f"{year}-Q{(number - 1) // 3 + 1}"}, {"period": str(year)},
                  {"from": f"{month}-01", "to": f"{month}-{last}"}):
        status, report, _ = await call(client, "GET", f"{admin_gw.base}/admin/usage",
                                       params=query, headers=BEARER)
        assert status == 200, report
        assert {k: v[0] for k, v in team_rows(report).items()} == {
            k: v[0] for k, v in EXPECTED.items()}, query


async def test_cache_stats_endpoint(
    admin_gw: Gateway, sim: Sim, client: aiohttp.ClientSession
) -> None:
    await play_workload(admin_gw, sim)
    status, stats, _ = await call(client, "GET", f"{admin_gw.base}/admin/cache/stats",
                                  headers=BEARER)
    assert status == 200
    entries, size = await admin_gw.state.store.totals()
    assert (stats["entries"], stats["size_bytes"]) == (entries, size) == (6, size)
    assert stats["hits"] == 5          # hits on stored results (coalesced rides are not)
    assert stats["hit_ratio"] == round(7 / 13, 4)  # 5 hits + 2 coalesced of 13 answered
    assert stats["oldest"].endswith("Z")
    assert [(t["type"], t["entries"]) for t in stats["by_type"]] == [("nsfw", 1), ("objects", 5)]
    assert sum(t["size_bytes"] for t in stats["by_type"]) == size


async def cached_types(gw: Gateway, image: bytes) -> list[str]:
    r = await post_requests(gw.url, {"apikey": TEAM_KEYS["ads"], "type": "cache"},
                            {"file": image})
    assert r.status_code == 200
    return [result["type"] for result in r.json()["data"]["results"]]


@pytest.mark.parametrize("fields", [
    pytest.param({}, id="no-filter"),
    pytest.param({"all": "no"}, id="all-false"),
    pytest.param({"all": "true", "type": "objects"}, id="all-with-filter"),
    pytest.param({"hash": "xyz"}, id="bad-hash"),
    pytest.param({"type": "cache"}, id="bad-type"),
    pytest.param({"older_than": "soon"}, id="bad-age"),
])
async def test_purge_endpoint_refuses(
    admin_gw: Gateway, sim: Sim, client: aiohttp.ClientSession, fields: dict[str, str]
) -> None:
    await post_requests(admin_gw.url, *objects_form(TEAM_KEYS["ads"], IMAGES["A"]))
    status, body, _ = await call(client, "POST", f"{admin_gw.base}/admin/cache/purge",
                                 data=fields, headers=BEARER)
    assert status == 400 and body["status"] == 400 and body["status_message"]
    assert (await admin_gw.state.store.totals())[0] == 1


async def test_purge_endpoint_removes_what_the_filters_name(
    admin_gw: Gateway, sim: Sim, client: aiohttp.ClientSession
) -> None:
    await play_workload(admin_gw, sim)
    url = f"{admin_gw.base}/admin/cache/purge"
    a = await post_requests(admin_gw.url, *objects_form(TEAM_KEYS["ads"], IMAGES["A"]))
    content_hash = a.headers["X-Content-Hash"]
    assert await cached_types(admin_gw, IMAGES["A"]) == ["objects"]

    status, body, _ = await call(client, "POST", url, data={"hash": content_hash.upper()},
                                 headers=BEARER)                           # a form
    assert (status, body["removed"]) == (200, 1)
    assert await cached_types(admin_gw, IMAGES["A"]) == []
    assert await cached_types(admin_gw, IMAGES["B"]) == ["objects"]

    status, body, _ = await call(client, "POST", url, json={"type": "nsfw"}, headers=BEARER)
    assert (status, body["removed"]) == (200, 1)                           # JSON
    assert await cached_types(admin_gw, IMAGES["F"]) == []

    status, body, _ = await call(client, "POST", url, json={"older_than": "1h"}, headers=BEARER)
    assert (status, body["removed"]) == (200, 0)                           # all are fresh
    status, body, _ = await call(client, "POST", url, json={"all": True}, headers=BEARER)
    assert (status, body["removed"]) == (200, 4)
    assert (await admin_gw.state.store.totals()) == (0, 0)

    # purged means forgotten: the next request pays again
    r = await post_requests(admin_gw.url, *objects_form(TEAM_KEYS["search"], IMAGES["A"]))
    assert r.headers["Cache-Status"] == "imagerecognize-gateway; fwd=miss; stored"


async def test_reload_endpoint(
    gateway_factory: GatewayFactory, sim: Sim, client: aiohttp.ClientSession, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("GW_ADMIN_TOKEN", TOKEN)
    teams = {"search": (TEAM_KEYS["search"], 1000)}
    admin = '\n[admin]\ntoken_env = "GW_ADMIN_TOKEN"\n'
    port = free_port()
    path = write_config(tmp_path / "config.toml", sim_url=sim.url, db=tmp_path / "gateway.db",
                        port=port, teams=teams, extra=admin)
    gw = await gateway_factory(load_config(path))
    ads_form = objects_form(TEAM_KEYS["ads"], IMAGES["A"])
    assert (await post_requests(gw.url, *ads_form)).status_code == 401

    write_config(path, sim_url=sim.url, db=tmp_path / "gateway.db", port=port,
                 teams={**teams, "ads": (TEAM_KEYS["ads"], 5)}, extra=admin)
    status, body, _ = await call(client, "POST", f"{gw.base}/admin/reload", headers=BEARER)
    assert status == 200 and body["ok"] is True
    assert body["message"] == f"reloaded {path}: 2 teams"
    r = await post_requests(gw.url, *ads_form)
    assert r.status_code == 200 and r.json()["data"]["quota"] == 4

    path.write_text(path.read_text() + "\n[teams.broken]\nquota = 1\n")
    status, body, _ = await call(client, "POST", f"{gw.base}/admin/reload", headers=BEARER)
    assert status == 400 and body["ok"] is False
    assert body["message"] == f"{path}: teams.broken.keys: missing (a list of team keys, plain " \
                              "or sha256:<hex>)"
    assert (await post_requests(gw.url, *ads_form)).status_code == 200   # still running

    # A team taken out of the config leaves /metrics: no quota series for it lingers.
    write_config(path, sim_url=sim.url, db=tmp_path / "gateway.db", port=port, teams=teams,
                 extra=admin)
    status, body, _ = await call(client, "POST", f"{gw.base}/admin/reload", headers=BEARER)
    assert status == 200 and body["message"] == f"reloaded {path}: 1 teams"
    async with client.get(f"{gw.base}/metrics") as m:
        scrape = await m.text()
    assert 'gateway_quota_used{team="search"}' in scrape
    for gauge in ("gateway_quota_used", "gateway_quota_limit"):
        assert f'{gauge}{{team="ads"}}' not in scrape
    # The gateway remembers keys it accepted; a reload that takes a key out forgets it.
    assert (await post_requests(gw.url, *ads_form)).status_code == 401


# -- status -----------------------------------------------------------------------------------
async def test_status_json_and_page_show_the_numbers(
    admin_gw: Gateway, sim: Sim, client: aiohttp.ClientSession
) -> None:
    await play_workload(admin_gw, sim)
    status, s, _ = await call(client, "GET", f"{admin_gw.base}/status.json", headers=BEARER)
    assert status == 200
    assert s["period"] == admin_gw.state.ledger.period() and s["quota_period"] == "month"
    assert team_rows(s) == EXPECTED
    ratios = {t["team"]: t["hit_ratio"] for t in s["teams"]}
    assert ratios == {"search": 3 / 5, "ads": 3 / 4, "tiny": 1 / 4}
    entries, size = await admin_gw.state.store.totals()
    assert s["cache"] == {"entries": entries, "size_bytes": size, "size": f"{size / 1024:.1f} KiB"}
    assert s["upstream"]["account_quota_remaining"] == sim.state.quota
    assert s["upstream"]["calls_since_start"] == {"200": 6}
    assert s["upstream"]["failed_since_start"] == 0

    status, page, _ = await call(client, "GET", f"{admin_gw.base}/status", headers=BEARER)
    assert status == 200
    assert "2 / 1000 used, 998 left" in page and "3 / 3 used, 0 left" in page
    assert "6 / 2003 used" in page and "60.0%" in page and "75.0%" in page
    assert f"<dd class=\"num\">{sim.state.quota}</dd>" in page
    assert f"({size} bytes)" in page
    assert "<script" not in page and "http" not in page.replace('http-equiv', '')


async def test_status_shows_refusals_and_when_the_quota_resets(
    gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    """A team refused 402 and 429 sees it on the page, not just "1 / 1 used"."""
    noon = datetime(2026, 11, 24, 12, tzinfo=UTC).timestamp()
    config = make_config(sim.url, tmp_path / "gateway.db", teams={
        "search": {"keys": [TEAM_KEYS["search"]], "quota": 1000},
        "tiny": {"keys": [TEAM_KEYS["tiny"]], "quota": 1},
        "ads": {"keys": [TEAM_KEYS["ads"]], "quota": 1000, "rate_per_s": 0.001, "burst": 1},
    })
    gw = await gateway_factory(replace(config, admin=AdminConfig("GW_ADMIN_TOKEN", Secret(TOKEN))),
                               clock=lambda: noon)
    codes = [(await post_requests(gw.url, *objects_form(TEAM_KEYS[team], make_png(seed))))
             .status_code for team, seed in (("tiny", 801), ("tiny", 802), ("tiny", 803),
                                             ("ads", 804), ("ads", 805), ("ads", 806))]
    assert codes == [200, 402, 402, 200, 429, 429]
    _, s, _ = await call(client, "GET", f"{gw.base}/status.json", headers=BEARER)
    refused = {t["team"]: t["refused_since_start"] for t in s["teams"]}
    assert refused == {"search": {"402": 0, "429": 0}, "tiny": {"402": 2, "429": 0},
                       "ads": {"402": 0, "429": 2}}
    assert (s["quota_resets_at"], s["quota_resets_in_s"]) == ("2026-12-01T00:00:00Z", 561600)
    _, page, _ = await call(client, "GET", f"{gw.base}/status", headers=BEARER)
    assert "Quotas reset 2026-12-01T00:00:00Z (in 6d 12h)." in page
    assert '<td class="num">2 &times; 402</td>' in page
    assert '<td class="num">2 &times; 429</td>' in page


@pytest.mark.parametrize(("period", "now", "resets"), [
    pytest.param("day", "2026-12-31T23:59:59", "2027-01-01T00:00:00Z", id="day-at-year-end"),
    pytest.param("week", "2026-11-29T10:00:00", "2026-11-30T00:00:00Z", id="week-on-sunday"),
    pytest.param("week", "2026-11-30T00:00:00", "2026-12-07T00:00:00Z", id="week-on-monday"),
    pytest.param("month", "2026-12-15T00:00:00", "2027-01-01T00:00:00Z", id="december"),
    pytest.param("total", "2026-12-15T00:00:00", None, id="total-never"),
])
def test_quota_reset_times(period: str, now: str, resets: str | None) -> None:
    at = period_resets_at(period, datetime.fromisoformat(now + "+00:00").timestamp())
    assert (iso_utc(at) if at is not None else None) == resets


def test_the_status_page_escapes_team_names() -> None:
    team = {"team": "<img src=x onerror=alert(1)>", "charged": 1, "quota": 2, "remaining": 1,
            "cache_hits": 0, "derived_hits": 0, "coalesced": 0, "calls_saved": 0,
            "hit_ratio": None,
            "spend": 0.0, "savings": 0.0}
    page = render_status({
        "generated_at": "2026-11-24T00:00:00Z", "period": "2026-11", "quota_period": "month",
        "teams": [team], "total": team, "currency": "<b>", "price_per_call": 0.0,
        "cache": {"entries": 0, "size_bytes": 0, "size": "0 B"},
        "upstream": {"account_quota_remaining": None, "calls_since_start": {},
                     "failed_since_start": 0},
    })
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<b>" not in page
    assert "unknown" in page and "none yet" in page


async def test_a_wrong_method_is_an_envelope_too(
        admin_gw: Gateway, client: aiohttp.ClientSession) -> None:
    status, body, r = await call(client, "GET", f"{admin_gw.base}/admin/cache/purge",
                                 headers=BEARER)
    assert status == 405 and body == {"status": 405, "status_message": "Method Not Allowed",
                                      "data": None}
    assert "POST" in r.headers["Allow"]


async def test_the_status_page_shows_spend_and_savings_in_money(
        admin_gw: Gateway, sim: Sim, client: aiohttp.ClientSession) -> None:
    await play_workload(admin_gw, sim)
    _, status, _ = await call(client, "GET", f"{admin_gw.base}/status.json", headers=BEARER)
    rows = {t["team"]: t for t in status["teams"]} | {"(total)": status["total"]}
    assert {name: (t["spend"], t["savings"]) for name, t in rows.items()} == MONEY
    assert (status["currency"], status["price_per_call"]) == ("EUR", 0.002)
    _, page, _ = await call(client, "GET", f"{admin_gw.base}/status", headers=BEARER)
    search = page[page.index('<tr data-team="search">'):].split("</tr>", 1)[0]
    assert '<td class="num">0.004 EUR</td><td class="num">0.006 EUR</td>' in search
    total = page[page.index('<tr data-team="">'):].split("</tr>", 1)[0]
    assert '<td class="num">0.012 EUR</td>\n<td class="num">0.014 EUR</td>' in total
