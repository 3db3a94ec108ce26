"""The operator commands, run as the installed ``gateway`` command against a live store."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from gateway.cli import build_parser
from gateway.config import hash_key, load_config
from gateway.core.quota import period_key
from gateway.core.usage import Period, PeriodError, ledger_keys, parse_age, parse_period
from gateway.devtools.sample_images import make_png
from tests.support import (
    TEAM_KEYS,
    UPSTREAM_KEY,
    Gateway,
    GatewayFactory,
    GatewayProcess,
    Sim,
    free_port,
    gateway_command,
    objects_form,
    port_open,
    post_requests,
    wait_until,
)
from tests.support.admin import ADMIN, EXPECTED, IMAGES, TOKEN, acli, cli, config_for, play_workload

PRICING = '\n[pricing]\nper_call = 0.002\ncurrency = "EUR"\n'


# -- usage ------------------------------------------------------------------------------------
async def test_usage_table_csv_and_json_for_a_known_workload(
    gateway: Gateway, sim: Sim, tmp_path: Path
) -> None:
    await play_workload(gateway, sim)
    config = str(config_for(tmp_path, sim, extra=PRICING))
    month = period_key("month", time.time())

    out = await acli("usage", "--config", config, "--format", "csv")
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout.splitlines() == [
        "period,team,charged,quota,remaining,cache_hits,coalesced,calls_saved,undelivered,"
        "spend,savings,currency,derived_hits",
        f"{month},search,2,1000,998,3,0,3,0,0.004000,0.006000,EUR,0",
        f"{month},ads,1,1000,999,1,2,3,0,0.002000,0.006000,EUR,0",
        f"{month},tiny,3,3,0,1,0,1,0,0.006000,0.002000,EUR,0",
        f"{month},(total),6,2003,1997,5,2,7,0,0.012000,0.014000,EUR,0",
    ]

    out = await acli("usage", "--config", config, "--format", "json", "--period", month)
    report = json.loads(out.stdout)
    rows = {t["team"]: t for t in [*report["teams"], report["total"]]}
    assert {name: (t["charged"], t["quota"], t["remaining"], t["cache_hits"], t["coalesced"],
                   t["calls_saved"]) for name, t in rows.items()} == EXPECTED
    assert report["ledger_periods"] == [month] and report["note"] is None
    assert {name: (t["spend"], t["savings"]) for name, t in rows.items()} == {
        "search": (0.004, 0.006), "ads": (0.002, 0.006), "tiny": (0.006, 0.002),
        "(total)": (0.012, 0.014)}
    assert (report["currency"], report["price_per_call"]) == ("EUR", 0.002)

    out = await acli("usage", "--config", config)            # table, the current period
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[0] == f"Usage for {month} (quota per month)"
    assert lines[1].split() == ["team", "charged", "quota", "remaining", "cache", "hits",
                                "derived", "coalesced", "calls", "saved", "undelivered", "spend", "EUR",
                                "savings", "EUR"]
    table = [line for line in lines[2:] if not set(line) <= {"-"} and not line.startswith("note")]
    assert [line.split() for line in table] == [
        ["search", "2", "1000", "998", "3", "0", "0", "3", "0", "0.004", "0.006"],
        ["ads", "1", "1000", "999", "1", "0", "2", "3", "0", "0.002", "0.006"],
        ["tiny", "3", "3", "0", "1", "0", "0", "1", "0", "0.006", "0.002"],
        ["(total)", "6", "2003", "1997", "5", "0", "2", "7", "0", "0.012", "0.014"],
    ]
    # aligned: every column ends where its heading ends
    ends = [m.end() for m in re.finditer(r"\S+(?: \S+)*", lines[1])]
    for line in table:
        assert [m.end() for m in re.finditer(r"\S+", line)][1:] == ends[1:]


async def test_usage_sums_day_rows_into_weeks_and_months(
    gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path
) -> None:
    now = [0.0]
    gw = await gateway_factory(quota={"period": "day"}, clock=lambda: now[0])

    async def at(day: str, key: str, seed: int) -> None:
        now[0] = datetime.fromisoformat(f"{day}T12:00:00+00:00").timestamp()
        r = await post_requests(gw.url, *objects_form(TEAM_KEYS[key], make_png(seed)))
        assert r.status_code == 200

    await at("2026-11-03", "search", 1)     # ISO week 45
    await at("2026-11-03", "search", 1)     # a hit
    await at("2026-11-08", "search", 2)     # still week 45 (a Sunday)
    await at("2026-11-20", "search", 3)
    await at("2026-11-20", "ads", 3)        # a hit
    await at("2026-12-01", "search", 4)
    await gw.state.service.flush()
    config = str(config_for(tmp_path, sim, period="day"))

    async def usage(period: str) -> dict[str, tuple[int, ...]]:
        out = await acli("usage", "--config", config, "--period", period, "--format", "json")
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        return {t["team"]: (t["charged"], t["quota"], t["cache_hits"])
                for t in report["teams"]}

    assert await usage("2026-11") == {"search": (3, 30_000, 1), "ads": (0, 30_000, 1),
                                      "tiny": (0, 90, 0)}
    assert await usage("2026-W45") == {"search": (2, 7000, 1), "ads": (0, 7000, 0),
                                       "tiny": (0, 21, 0)}
    assert await usage("2026-11-20") == {"search": (1, 1000, 0), "ads": (0, 1000, 1),
                                         "tiny": (0, 3, 0)}
    assert (await usage("2026-12"))["search"] == (1, 31_000, 0)

    out = await acli("usage", "--config", config, "--period", "2026-11")
    assert "note: summed over 30 day ledger rows (2026-11-01 .. 2026-11-30)" in out.stdout
    out = await acli("usage", "--config", config, "--period", "total")
    assert out.returncode == 2 and "one row per day" in out.stderr


async def test_usage_for_quarters_years_and_date_ranges(
    gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path
) -> None:
    now = [0.0]
    gw = await gateway_factory(quota={"period": "day"}, clock=lambda: now[0])
    for day, seed in (("2025-12-31", 1), ("2026-01-01", 2), ("2026-03-31", 3),
                      ("2026-04-01", 4), ("2026-10-15", 5), ("2026-12-31", 6)):
        now[0] = datetime.fromisoformat(f"{day}T12:00:00+00:00").timestamp()
        r = await post_requests(gw.url, *objects_form(TEAM_KEYS["search"], make_png(seed)))
        assert r.status_code == 200
    await gw.state.service.flush()
    config = str(config_for(tmp_path, sim, period="day"))

    async def charged(*args: str) -> tuple[int, int]:
        out = await acli("usage", "--config", config, "--format", "json", *args)
        assert out.returncode == 0, out.stderr
        search = json.loads(out.stdout)["teams"][0]
        return search["charged"], search["quota"]

    assert await charged("--period", "2026-Q1") == (2, 90_000)       # 90 days of 1000
    assert await charged("--period", "2026-Q4") == (2, 92_000)
    assert await charged("--period", "2026") == (5, 365_000)
    assert await charged("--period", "2025") == (1, 365_000)
    assert await charged("--from", "2025-12-31", "--to", "2026-01-01") == (2, 2000)
    assert await charged("--from", "2026-03-31", "--to", "2026-03-31") == (1, 1000)
    out = await acli("usage", "--config", config, "--from", "2026-01-01", "--to", "2026-03-31")
    assert "Usage for 2026-01-01..2026-03-31" in out.stdout

    for args, problem in ((["--from", "2026-02-01"], "--from and --to go together"),
                          (["--from", "2026-02-01", "--to", "2026-01-01"], "ends before"),
                          (["--period", "2026-Q1", "--from", "2026-01-01", "--to",
                            "2026-01-02"], "not both"),
                          (["--period", "2026-Q5"], "YYYY-Qn (quarter)")):
        out = await acli("usage", "--config", config, *args)
        assert (out.returncode, out.stdout) == (2, ""), args
        assert len(out.stderr.splitlines()) == 1 and problem in out.stderr, out.stderr


@pytest.mark.parametrize(("period", "problem"), [
    pytest.param("2026-11-24", "is a day, finer than the quota ledger", id="day"),
    pytest.param("2026-W48", "is a week, finer than the quota ledger", id="week"),
    pytest.param("2026-13", "use YYYY-MM, YYYY-MM-DD, YYYY-Www", id="no-month-13"),
    pytest.param("2026-W54", "use YYYY-MM, YYYY-MM-DD, YYYY-Www", id="no-week-54"),
    pytest.param("last month", "use YYYY-MM", id="words"),
])
def test_usage_refuses_a_period_it_cannot_answer(
    sim: Sim, tmp_path: Path, period: str, problem: str
) -> None:
    config = config_for(tmp_path, sim)
    (tmp_path / "gateway.db").touch()
    out = cli("usage", "--config", str(config), "--period", period)
    assert out.returncode == 2 and out.stdout == ""
    assert problem in out.stderr and out.stderr.startswith("gateway usage: ")


def test_usage_says_when_there_is_no_store_or_no_config(sim: Sim, tmp_path: Path) -> None:
    config = config_for(tmp_path, sim)
    out = cli("usage", "--config", str(config))
    assert out.returncode == 1 and f"no store at {tmp_path / 'gateway.db'}" in out.stderr
    assert not (tmp_path / "gateway.db").exists()          # and did not create one
    out = cli("usage", "--config", str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and "file not found" in out.stderr


@pytest.mark.parametrize(("asked", "ledger", "keys"), [
    pytest.param(Period("month", "2026-11"), "month", ("2026-11",), id="same"),
    pytest.param(Period("week", "2026-W01"), "day",
                 ("2025-12-29", "2025-12-30", "2025-12-31", "2026-01-01", "2026-01-02",
                  "2026-01-03", "2026-01-04"), id="week-of-days-across-a-year"),
    pytest.param(Period("month", "2026-02"), "day",
                 tuple(f"2026-02-{d:02d}" for d in range(1, 29)), id="february"),
    # weeks go to the month holding their Thursday: each week is counted in one month
    pytest.param(Period("month", "2026-11"), "week",
                 ("2026-W45", "2026-W46", "2026-W47", "2026-W48"), id="november-weeks"),
    pytest.param(Period("month", "2026-10"), "week",
                 ("2026-W40", "2026-W41", "2026-W42", "2026-W43", "2026-W44"), id="oct-weeks"),
    pytest.param(Period("total", "total"), "total", ("total",), id="total"),
    pytest.param(Period("quarter", "2026-Q4"), "month", ("2026-10", "2026-11", "2026-12"),
                 id="quarter-of-months"),
    pytest.param(Period("year", "2026"), "month", tuple(f"2026-{m:02d}" for m in range(1, 13)),
                 id="year-of-months"),
    # the weeks whose Thursday is in the quarter, as for months: 2026-W01 starts in 2025
    pytest.param(Period("quarter", "2026-Q1"), "week",
                 tuple(f"2026-W{w:02d}" for w in range(1, 14)), id="quarter-of-weeks"),
    pytest.param(Period("range", "2026-11-30..2026-12-06"), "week", ("2026-W49",),
                 id="range-monday-to-sunday"),
    pytest.param(Period("range", "2026-01-01..2026-02-28"), "month", ("2026-01", "2026-02"),
                 id="range-of-whole-months"),
    pytest.param(Period("range", "2026-02-27..2026-03-02"), "day",
                 ("2026-02-27", "2026-02-28", "2026-03-01", "2026-03-02"), id="range-of-days"),
])
def test_ledger_keys(asked: Period, ledger: str, keys: tuple[str, ...]) -> None:
    assert ledger_keys(asked, ledger) == keys


def test_every_week_lands_in_exactly_one_month() -> None:
    weeks = [k for month in range(1, 13)
             for k in ledger_keys(Period("month", f"2026-{month:02d}"), "week")]
    assert len(weeks) == len(set(weeks)) == 53        # 2026 has 53 ISO weeks


@pytest.mark.parametrize(("asked", "ledger"), [
    ("2026-11-24", "week"), ("2026-11-24", "month"), ("2026-W48", "month"),
    ("2026-11", "total"), ("total", "day"), ("2026-Q1", "total"),
    ("2026-11-03..2026-11-09", "week"), ("2026-11-01..2026-11-29", "month"),
])
def test_ledger_keys_refuses(asked: str, ledger: str) -> None:
    with pytest.raises(PeriodError):
        ledger_keys(parse_period(asked, ledger=ledger, now=0), ledger)


def test_parse_period_current_and_parse_age() -> None:
    noon = datetime(2026, 11, 24, 12, tzinfo=UTC).timestamp()
    assert parse_period("current", ledger="week", now=noon) == Period("week", "2026-W48")
    assert parse_period(" 2026-11 ", ledger="day", now=noon) == Period("month", "2026-11")
    assert [parse_age(a) for a in ("30d", "12h", "90m", "45s", "2w", "1d12h")] == [
        30 * 86400, 12 * 3600, 90 * 60, 45, 14 * 86400, 36 * 3600]
    for bad in ("", "30", "d", "30x", "-1d", "30 days"):
        with pytest.raises(ValueError):
            parse_age(bad)


# -- cache ------------------------------------------------------------------------------------
async def test_cache_stats_table_and_json(gateway: Gateway, sim: Sim, tmp_path: Path) -> None:
    await play_workload(gateway, sim)
    config = str(config_for(tmp_path, sim))
    _, size = await gateway.state.store.totals()
    out = await acli("cache", "stats", "--config", config, "--format", "json")
    stats = json.loads(out.stdout)
    assert (stats["entries"], stats["size_bytes"], stats["hits"]) == (6, size, 5)
    # 5 hits + 2 coalesced answered free, 6 charged upstream calls: 7 of 13.
    assert stats["hit_ratio"] == round(7 / 13, 4)
    assert [(t["type"], t["entries"]) for t in stats["by_type"]] == [("nsfw", 1), ("objects", 5)]

    out = await acli("cache", "stats", "--config", config)
    assert out.returncode == 0
    text = out.stdout
    assert re.search(r"^entries\s+6$", text, re.M)
    assert re.search(rf"^size\s+\d+\.\d KiB \({size} bytes\)$", text, re.M)
    assert re.search(r"^hits\s+5$", text, re.M)
    assert re.search(r"^hit ratio\s+53\.8% this quota period \(7 answered without an upstream "
                     r"call, 6 upstream calls\)$", text, re.M)
    assert re.search(r"^oldest entry\s+\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(0m \d+s ago\)$", text,
                     re.M)
    assert re.search(r"^nsfw\s+1\s+\d+ B\s+\d+$", text, re.M)
    assert re.search(r"^objects\s+5\s+\S+ \S+\s+\d+$", text, re.M)
    assert re.search(r"^derived hits\s+objects: on$", text, re.M)
    assert re.search(r"^derived hits\s+nsfw: on$", text, re.M)
    assert stats["derive_off"] == {}


async def cached_types(gw: Gateway, image: bytes) -> list[str]:
    r = await post_requests(gw.url, {"apikey": TEAM_KEYS["ads"], "type": "cache"},
                            {"file": image})
    return [result["type"] for result in r.json()["data"]["results"]]


@pytest.mark.parametrize(("args", "problem"), [
    pytest.param((), "refusing to purge without a filter", id="no-filter"),
    pytest.param(("--all", "--type", "nsfw"), "give it alone", id="all-with-filter"),
    pytest.param(("--hash", "abc"), "32 hex digits", id="bad-hash"),
    pytest.param(("--older-than", "soon"), "--older-than", id="bad-age"),
])
async def test_cache_purge_refuses(
    gateway: Gateway, sim: Sim, tmp_path: Path, args: tuple[str, ...], problem: str
) -> None:
    await post_requests(gateway.url, *objects_form(TEAM_KEYS["ads"], IMAGES["A"]))
    out = await acli("cache", "purge", "--config", str(config_for(tmp_path, sim)), *args)
    assert out.returncode == 2 and problem in out.stderr
    assert (await gateway.state.store.totals())[0] == 1


async def test_cache_purge_effects_are_visible_through_type_cache(
    gateway: Gateway, sim: Sim, tmp_path: Path
) -> None:
    await play_workload(gateway, sim)
    config = str(config_for(tmp_path, sim))
    a = await post_requests(gateway.url, *objects_form(TEAM_KEYS["ads"], IMAGES["A"]))
    assert await cached_types(gateway, IMAGES["A"]) == ["objects"]

    out = await acli("cache", "purge", "--config", config, "--hash", a.headers["X-Content-Hash"])
    assert out.returncode == 0 and re.fullmatch(r"removed 1 cached result in [\d.]+s\n", out.stdout)
    assert await cached_types(gateway, IMAGES["A"]) == []
    assert await cached_types(gateway, IMAGES["B"]) == ["objects"]

    out = await acli("cache", "purge", "--config", config, "--type", "nsfw")
    assert re.fullmatch(r"removed 1 cached result in [\d.]+s\n", out.stdout)
    out = await acli("cache", "purge", "--config", config, "--older-than", "1h")
    assert re.fullmatch(r"removed 0 cached results in [\d.]+s\n", out.stdout)
    out = await acli("cache", "purge", "--config", config, "--all")
    assert re.fullmatch(r"removed 4 cached results in [\d.]+s\n", out.stdout)
    assert await cached_types(gateway, IMAGES["B"]) == []
    # the running gateway's in-memory tier notices another process's purge within a flush
    deadline = time.monotonic() + 5
    while True:
        r = await post_requests(gateway.url, *objects_form(TEAM_KEYS["search"], IMAGES["B"]))
        if r.headers["Cache-Status"] == "imagerecognize-gateway; fwd=miss; stored":
            break
        assert time.monotonic() < deadline, "the gateway kept serving a purged result"
        await asyncio.sleep(0.1)


async def test_cache_purge_older_than(
    gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path
) -> None:
    now = [time.time() - 40 * 86400]
    gw = await gateway_factory(clock=lambda: now[0])
    await post_requests(gw.url, *objects_form(TEAM_KEYS["search"], make_png(1)))   # 40 days ago
    now[0] = time.time() - 10 * 86400
    await post_requests(gw.url, *objects_form(TEAM_KEYS["search"], make_png(2)))   # 10 days ago
    config = str(config_for(tmp_path, sim))
    out = await acli("cache", "purge", "--config", config, "--older-than", "30d")
    assert re.fullmatch(r"removed 1 cached result in [\d.]+s\n", out.stdout)
    remaining = await gw.state.store.stats()
    assert remaining.entries == 1 and remaining.oldest is not None
    assert abs(remaining.oldest - now[0]) < 1


# -- keys -------------------------------------------------------------------------------------
async def test_keys_new_round_trips_through_the_config(
    gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config_for(tmp_path, sim)
    out = cli("keys", "new", "ads", "--config", str(path))
    assert out.returncode == 0 and out.stderr == ""
    lines = out.stdout.splitlines()
    key = next(line.strip() for line in lines if line.startswith("  "))
    config_line = lines[-1]
    assert re.fullmatch(r'keys = \["sha256:[0-9a-f]{64}"\]', config_line)
    assert config_line == f'keys = ["{hash_key(key)}"]'
    assert len(key) >= 43 and "[teams.ads]" in out.stdout
    assert key not in cli("keys", "new", "ads", "--config", str(path)).stdout  # fresh each time

    # a new team: the whole table, pasted as printed, is a team the gateway knows by the key
    out = cli("keys", "new", "data-science", "--new-team", "--config", str(path))
    assert out.returncode == 0 and out.stderr == ""
    key = next(line.strip() for line in out.stdout.splitlines() if line.startswith("  "))
    table = out.stdout[out.stdout.index("[teams.data-science]"):]
    path.write_text(path.read_text() + "\n" + table.replace("quota = 1000", "quota = 7"))
    monkeypatch.setenv("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
    gw = await gateway_factory(load_config(path))
    r = await post_requests(gw.url, *objects_form(key, make_png(5)))
    assert r.status_code == 200 and r.json()["data"]["quota"] == 6
    assert key not in path.read_text()


@pytest.mark.parametrize("team", ["bad team", "a/b", "x!"])
def test_keys_new_refuses_a_bad_team_name(team: str) -> None:
    out = cli("keys", "new", team)
    assert out.returncode == 2 and out.stdout == "" and "team names" in out.stderr


def test_keys_new_refuses_a_team_the_config_does_not_have(tmp_path: Path) -> None:
    """A typo must not print a key nobody can use: exit 2, one line, no key."""
    path = config_for(tmp_path, None)
    out = cli("keys", "new", "serach", "--config", str(path))
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.splitlines() == [
        f"gateway keys: team serach is not in {path} (teams: search, ads, tiny); check the "
        "name, or pass --new-team for a whole [teams.NAME] table to add"
    ]
    out = cli("keys", "new", "search", "--new-team", "--config", str(path))
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.splitlines() == [
        f"gateway keys: team search is already in {path}: drop --new-team"]
    # the container's config has no teams: --new-team is how its first team starts
    docker = Path(__file__).resolve().parents[2] / "config.docker.toml"
    out = cli("keys", "new", "search", "--config", str(docker))
    assert out.returncode == 2 and out.stdout == "" and "no team is configured" in out.stderr
    out = cli("keys", "new", "search", "--new-team", "--config", str(docker))
    assert out.returncode == 0 and "[teams.search]" in out.stdout


# -- reload -----------------------------------------------------------------------------------
def start_gateway(tmp_path: Path, processes: list[GatewayProcess],
                  monkeypatch: pytest.MonkeyPatch, *, workers: int = 1) -> tuple[Path, int]:
    monkeypatch.setenv("GW_ADMIN_TOKEN", TOKEN)
    port = free_port()
    config = config_for(tmp_path, None, extra=ADMIN, port=port)
    config.write_text(config.read_text().replace("[server]\n", f"[server]\nworkers = {workers}\n"))
    proc = GatewayProcess(config, port, tmp_path / "gateway.log")
    processes.append(proc)
    proc.wait_ready()
    return config, port


def add_team(config: Path, name: str, key: str, quota: int) -> None:
    config.write_text(config.read_text() + f'\n[teams.{name}]\nkeys = ["{key}"]\nquota = {quota}\n')


def accepted(port: int, key: str) -> int:
    r = requests.post(f"http://127.0.0.1:{port}/api/v2/", timeout=10,
                      data={"apikey": key, "type": "cache", "hash": "0" * 32})
    return r.status_code


def test_reload_over_http_with_the_admin_token(
    tmp_path: Path, processes: list[GatewayProcess],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    config, port = start_gateway(tmp_path, processes, monkeypatch)
    assert accepted(port, "marketing-key") == 401
    add_team(config, "marketing", "marketing-key", 10)
    out = cli("reload", "--config", str(config), token=TOKEN)
    assert (out.returncode, out.stdout, out.stderr) == (0, f"reloaded {config}: 4 teams\n", "")
    assert accepted(port, "marketing-key") == 200

    # refused by the gateway (the CLI has no upstream key to compare): answered, exit 1
    good = config.read_text()
    add_team(config, "leaky", UPSTREAM_KEY, 1)
    out = cli("reload", "--config", str(config), token=TOKEN)
    assert out.returncode == 1
    assert out.stdout == f"{config}: teams.leaky.keys: the upstream key must never be a team key\n"
    assert accepted(port, "marketing-key") == 200                    # the old config runs on
    # a file the CLI can't read is refused before anything is sent
    config.write_text(good + "\n[teams.broken]\nquota = 1\n")
    out = cli("reload", "--config", str(config), token=TOKEN)
    assert out.returncode == 2 and "config error" in out.stderr
    assert "teams.broken.keys: missing" in out.stderr
    config.write_text(good)

    out = cli("reload", "--config", str(config), token="not-the-token")
    assert out.returncode == 1 and "refused the admin token in GW_ADMIN_TOKEN" in out.stderr
    processes[0].stop()
    out = cli("reload", "--config", str(config), token=TOKEN)
    assert out.returncode == 1 and "cannot reach the gateway" in out.stderr
    assert TOKEN not in processes[0].log_path.read_text()


def test_reload_after_an_edit_that_moves_the_port(
    tmp_path: Path, processes: list[GatewayProcess],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edited file names a port the gateway does not listen on yet: the plain command says
    how to reach it, --url reaches it over HTTP, and --pid signals it even with the token set."""
    config, port = start_gateway(tmp_path, processes, monkeypatch)
    add_team(config, "marketing", "marketing-key", 10)
    moved = free_port()
    config.write_text(config.read_text().replace(f"port = {port}\n", f"port = {moved}\n"))
    out = cli("reload", "--config", str(config), token=TOKEN)
    assert out.returncode == 1 and f"127.0.0.1:{moved}" in out.stderr
    assert "--url or --pid" in out.stderr
    assert accepted(port, "marketing-key") == 401

    out = cli("reload", "--config", str(config), "--url", f"http://127.0.0.1:{port}/",
              token=TOKEN)
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout == (f"reloaded {config}: 4 teams (changes to server.port apply after a "
                          "restart)\n")
    assert accepted(port, "marketing-key") == 200

    add_team(config, "sales", "sales-key", 10)
    pid = processes[0].proc.pid
    out = cli("reload", "--config", str(config), "--pid", str(pid), token=TOKEN)
    assert out.returncode == 0 and out.stdout.startswith(f"sent SIGHUP to {pid}")
    wait_until(lambda: accepted(port, "sales-key") == 200, what="the SIGHUP reload")
    out = cli("reload", "--config", str(config), "--url", "127.0.0.1:1", token=TOKEN)
    assert out.returncode == 2 and "--url must be an http://" in out.stderr


def test_reload_with_sighup(
    tmp_path: Path, processes: list[GatewayProcess],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    config, port = start_gateway(tmp_path, processes, monkeypatch)
    add_team(config, "marketing", "marketing-key", 10)
    out = cli("reload", "--config", str(config))                     # no token here
    assert out.returncode == 2 and "set GW_ADMIN_TOKEN" in out.stderr and "--pid" in out.stderr

    pid = processes[0].proc.pid
    out = cli("reload", "--config", str(config), "--pid", str(pid))
    assert out.returncode == 0 and out.stdout.startswith(f"sent SIGHUP to {pid}")
    deadline = time.monotonic() + 10
    while accepted(port, "marketing-key") != 200:
        assert time.monotonic() < deadline, "SIGHUP did not reload the config"
        time.sleep(0.05)
    assert processes[0].proc.poll() is None

    for pid_arg in ("0", "-1"):
        out = cli("reload", "--config", str(config), "--pid", pid_arg)
        assert out.returncode == 2 and "--pid must be" in out.stderr
    with subprocess.Popen(["sleep", "30"]) as bystander:
        out = cli("reload", "--config", str(config), "--pid", str(bystander.pid))
        assert out.returncode == 2 and "is not `gateway serve`" in out.stderr
        assert bystander.poll() is None
        bystander.send_signal(signal.SIGTERM)
    # Another gateway subcommand (the simulator): SIGHUP would end it, so it is refused too.
    sim_port = free_port()
    with subprocess.Popen([*gateway_command(), "sim", "--port", str(sim_port), "--api-key",
                           "k", "--quota", "1"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as sim:
        wait_until(lambda: port_open(sim_port), what="the simulator listening")
        out = cli("reload", "--config", str(config), "--pid", str(sim.pid))
        assert out.returncode == 2 and "is not `gateway serve`" in out.stderr
        assert sim.poll() is None
        sim.send_signal(signal.SIGTERM)


def test_reload_over_http_reaches_every_worker(
    tmp_path: Path, processes: list[GatewayProcess],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    config, port = start_gateway(tmp_path, processes, monkeypatch, workers=2)
    add_team(config, "marketing", "marketing-key", 10)
    out = cli("reload", "--config", str(config), token=TOKEN)
    assert out.returncode == 0 and "reload signalled to all 2 workers" in out.stdout
    deadline = time.monotonic() + 10
    # every request on a fresh connection: the kernel spreads them over both workers
    while [accepted(port, "marketing-key") for _ in range(16)] != [200] * 16:
        assert time.monotonic() < deadline, "a worker kept the old config"
        time.sleep(0.1)


def test_admin_commands_have_help() -> None:
    for command in (["usage"], ["cache", "stats"], ["cache", "purge"], ["keys", "new"],
                    ["keys", "list"], ["keys", "revoke"], ["keys", "rotate"], ["reload"]):
        out = cli(*command, "--help")
        assert out.returncode == 0 and out.stdout.startswith(f"usage: gateway {' '.join(command)}")


COMMANDS = [["serve"], ["check-config"], ["check-store"], ["hash-key"], ["sim"], ["demo"],
            ["usage"], ["cache", "stats"], ["cache", "purge"], ["keys", "new"], ["keys", "list"],
            ["keys", "revoke"], ["keys", "rotate"], ["reload"]]


def subparser(command: list[str]) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_help_explains_every_option_and_shows_its_default(command: list[str]) -> None:
    out = cli(*command, "--help")
    assert out.returncode == 0, out.stderr
    shown = re.sub(r"\s+", " ", out.stdout)
    for action in subparser(command)._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help, f"gateway {' '.join(command)}: {name} has no help text"
        if action.default not in (None, False) and "default" not in action.help:
            assert f"(default: {action.default})" in shown, f"{name}: default not shown"
    if any(a.dest == "config" for a in subparser(command)._actions):
        assert "(default: config.toml)" in shown
