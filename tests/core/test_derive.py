"""Derived hits, widened misses and the audit: the gateway's answer is always the simulator's
direct answer for the same exact parameters, and the upstream is called only when the model
cannot answer from what is held. Real sockets, real SQLite files, real Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from gateway.core import derive
from gateway.devtools.sample_images import make_jpeg, make_png
from gateway.devtools.sim import start_sim
from gateway.http.app import create_app
from gateway.http.state import STATE, GatewayState
from tests.support import (
    TEAM_KEYS,
    UPSTREAM_KEY,
    Gateway,
    GatewayFactory,
    Sim,
    free_port,
    gateway_command,
    make_config,
    write_config,
)

SEARCH, ADS = TEAM_KEYS["search"], TEAM_KEYS["ads"]
REDIS_URL = "redis://127.0.0.1:6379/14"
DERIVED = "imagerecognize-gateway; hit; detail=derived"
MISS = "imagerecognize-gateway; fwd=miss; stored"
IMAGES = [make_png(7000 + i) if i % 2 else make_jpeg(7000 + i) for i in range(4)]
EXAMPLES = settings(deadline=None, database=None, max_examples=12,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


# -- the model, alone ---------------------------------------------------------------------------
def stored(params: str, confidences: list[float]) -> derive.Stored:
    objects = [{"name": f"o{n}", "confidence": c} for n, c in enumerate(confidences)]
    prefix = json.dumps({"error": 0, "type": "objects", "objects": objects})[:-1].encode()
    parsed = derive.Stored.parse(params, prefix + b',"quota":')
    assert parsed is not None
    return parsed


@pytest.mark.parametrize(("held", "confidences", "asked", "usable"), [
    pytest.param((50, 10), [90, 80, 60], (80, 5), True, id="stricter-threshold-fewer-labels"),
    pytest.param((50, 2), [90, 80], (50, 3), False, id="more-labels-than-a-full-answer"),
    pytest.param((50, 3), [90, 80], (50, 10), True, id="held-fewer-than-its-cap"),
    pytest.param((50, 2), [90, 60], (70, 3), True, id="last-below-the-asked-threshold"),
    pytest.param((50, 2), [90, 70], (70, 3), False, id="last-at-the-asked-threshold"),
    pytest.param((80, 10), [90], (70, 10), False, id="looser-threshold"),
])
def test_which_stored_answers_answer_which_requests(
        held: tuple[int, int], confidences: list[float], asked: tuple[int, int],
        usable: bool) -> None:
    s = stored(f"max_labels={held[1]}&min_confidence={held[0]}", confidences)
    assert derive.usable("objects", s, {"max_labels": asked[1], "min_confidence": asked[0]}) \
        is usable


def test_an_answer_not_highest_first_is_never_derived_from() -> None:
    prefix = b'{"error":0,"objects":[{"confidence":60},{"confidence":90}],"quota":'
    assert derive.Stored.parse("max_labels=10&min_confidence=0", prefix) is None


# -- the simulator follows the model (it is the reference the tests below compare with) ----------
async def sim_objects(session: aiohttp.ClientSession, url: str, image: bytes, type_: str,
                      c: int, m: int) -> list[dict[str, Any]]:
    fields = {"apikey": UPSTREAM_KEY, "type": type_}
    fields.update({"max_labels": str(m), "min_confidence": str(c)} if type_ == "objects"
                  else {"nsfw_min_confidence": str(c)})
    form = aiohttp.FormData(fields)
    form.add_field("file", image, filename="x")
    async with session.post(url, data=form) as r:
        body = await r.json(content_type=None)
        assert r.status == 200, body
        return list(body["data"]["objects"])


async def test_the_simulator_follows_the_model_unless_told_to_break_it(sim: Sim) -> None:
    async with aiohttp.ClientSession() as session:
        broken = 0
        for model in ("seed", "cap-first"):
            sim.state.model = model
            for image in IMAGES:
                everything = await sim_objects(session, sim.url, image, "objects", 0, 1000)
                confidences = [o["confidence"] for o in everything]
                assert confidences == sorted(confidences, reverse=True)
                for c in (0, 50, 70, 80):
                    for m in (1, 3, 5, 10):
                        got = await sim_objects(session, sim.url, image, "objects", c, m)
                        model_says = [o for o in everything if o["confidence"] >= c][:m]
                        if model == "seed":
                            assert got == model_says
                        else:
                            broken += got != model_says
        assert broken, "cap-first must break the model for some request"


# -- the differential: gateway against the simulator asked directly -----------------------------
@dataclass(frozen=True)
class Ask:
    image: int
    type: str
    c: int
    m: int

    def fields(self, key: str) -> dict[str, str]:
        if self.type == "objects":
            return {"apikey": key, "type": "objects", "max_labels": str(self.m),
                    "min_confidence": str(self.c)}
        return {"apikey": key, "type": "nsfw", "nsfw_min_confidence": str(self.c)}


asks = st.builds(Ask, st.integers(0, len(IMAGES) - 1), st.sampled_from(["objects", "nsfw"]),
                 st.sampled_from([0, 30, 50, 70, 80, 95]), st.sampled_from([1, 3, 5, 10, 40]))
# Waves of requests: the requests of one wave arrive together, the waves one after another.
waves = st.lists(st.lists(asks, min_size=1, max_size=4), min_size=1, max_size=6)


@asynccontextmanager
async def running(tmp_path: Path, backend: str, **cache: Any) -> AsyncIterator[
        tuple[GatewayState, str, Any, str]]:
    """A gateway over its own simulator, and a second simulator to ask directly."""
    upstream_runner, port, upstream = await start_sim(api_key=UPSTREAM_KEY, quota=100_000)
    direct_runner, direct_port, _ = await start_sim(api_key=UPSTREAM_KEY, quota=100_000)
    storage: dict[str, Any] = {}
    if backend == "redis":
        storage = {"backend": "redis", "redis_url": REDIS_URL,
                   "redis_prefix": f"derive:{uuid.uuid4().hex}:"}
    db = tmp_path / f"{uuid.uuid4().hex}.db"
    config = make_config(f"http://127.0.0.1:{port}/api/v2/", db, cache=cache, storage=storage)
    app = create_app(config, registry=CollectorRegistry(), spool_dir=str(tmp_path))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    gw_url = f"http://127.0.0.1:{runner.addresses[0][1]}/api/v2/"
    try:
        yield app[STATE], gw_url, upstream, f"http://127.0.0.1:{direct_port}/api/v2/"
    finally:
        await runner.cleanup()
        await upstream_runner.cleanup()
        await direct_runner.cleanup()
        if backend == "redis":
            r = aioredis.from_url(REDIS_URL)
            async for k in r.scan_iter(match=storage["redis_prefix"] + "*"):
                await r.delete(k)
            await r.aclose()


async def ask(session: aiohttp.ClientSession, url: str, a: Ask, key: str = SEARCH,
              headers: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    form = aiohttp.FormData(a.fields(key))
    form.add_field("file", IMAGES[a.image], filename="upload.png")
    async with session.post(url, data=form, headers=headers or {}) as r:
        body = await r.json(content_type=None)
        assert r.status == 200, body
        return r.headers["Cache-Status"], body


def held_answers(held: list[tuple[Ask, list[float]]], a: Ask) -> bool:
    """The test's own statement of the model: does anything held answer ``a``?"""
    for h, confidences in held:
        if (h.image, h.type) != (a.image, a.type) or a.c < h.c:
            continue
        if a.type == "nsfw" or a.m <= h.m or len(confidences) < h.m or (
                confidences and confidences[-1] < a.c):
            return True
    return False


async def differential(tmp_path: Path, backend: str, plan: list[list[Ask]], widen: bool) -> None:
    cache = {"widen": widen, "widen_max_labels": 100}
    async with running(tmp_path, backend, **cache) as (state, url, upstream, direct), \
            aiohttp.ClientSession() as session:
        held: list[tuple[Ask, list[float]]] = []
        forwarded = 0
        for wave in plan:
            predicted = [held_answers(held, a) for a in wave]
            answers = await asyncio.gather(*(ask(session, url, a) for a in wave))
            for a, (cache_status, body), known in zip(wave, answers, predicted, strict=True):
                expected = await sim_objects(session, direct, IMAGES[a.image], a.type, a.c, a.m)
                assert body["data"]["objects"] == expected, (a, cache_status)
                assert list(body["data"]) == ["error", "type", "objects", "quota"]
                if known:  # something held answered it before the wave: never paid again
                    assert cache_status == DERIVED or "; hit" in cache_status, (a, cache_status)
                if cache_status.startswith("imagerecognize-gateway; fwd="):
                    forwarded += 1
                    sent = a
                    if widen:
                        sent = Ask(a.image, a.type, 0, max(100, a.m))
                    wide = await sim_objects(session, direct, IMAGES[a.image], a.type,
                                             sent.c, sent.m)
                    held.append((sent, [o["confidence"] for o in wide]))
            if len(wave) == 1:
                (cache_status, _), = answers
                assert cache_status.startswith("imagerecognize-gateway; fwd=") != predicted[0]
        assert upstream.calls == forwarded
        assert await state.store.used("search", state.ledger.period()) == forwarded
        if widen:  # one call per image and type, whatever the thresholds and arrival order
            assert upstream.calls == len({(a.image, a.type) for wave in plan for a in wave})


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
@pytest.mark.parametrize("widen", [False, True], ids=["derive", "derive+widen"])
@given(plan=waves)
@EXAMPLES
def test_every_answer_is_the_simulators_and_the_upstream_is_asked_only_when_needed(
        tmp_path: Path, backend: str, widen: bool, plan: list[list[Ask]]) -> None:
    asyncio.run(differential(tmp_path, backend, plan, widen))


# -- rules one at a time ------------------------------------------------------------------------
async def scrape(base: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as r:
        return await r.text()


async def test_a_derived_hit_is_free_and_counted_as_derived(
        gateway_factory: GatewayFactory, sim: Sim) -> None:
    gw = await gateway_factory()
    async with aiohttp.ClientSession() as session:
        loose, strict = Ask(0, "objects", 50, 10), Ask(0, "objects", 80, 3)
        assert (await ask(session, gw.url, loose))[0] == MISS
        status, body = await ask(session, gw.url, strict, key=ADS)
    assert status == DERIVED
    assert body["data"]["quota"] == 1000  # ads paid nothing
    assert sim.state.calls == 1
    text = await scrape(gw.base)
    assert 'gateway_requests_total{cache="derived",status="200",team="ads",type="objects"} 1.0' \
        in text
    assert 'gateway_upstream_calls_saved_total{team="ads",type="objects"} 1.0' in text


def storage_for(backend: str) -> dict[str, Any]:
    """``[storage]`` for a test's gateway: the default SQLite file, or a fresh Redis prefix."""
    if backend == "sqlite":
        return {}
    return {"backend": "redis", "redis_url": REDIS_URL,
            "redis_prefix": f"derive:{uuid.uuid4().hex}:"}


async def forget(storage: dict[str, Any]) -> None:
    if storage:
        r = aioredis.from_url(REDIS_URL)
        async for k in r.scan_iter(match=storage["redis_prefix"] + "*"):
            await r.delete(k)
        await r.aclose()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_derived_hits_are_counted_apart_in_usage_the_status_page_and_the_team_view(
        gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path, backend: str) -> None:
    """The payer sees what derivation saved: ``gateway usage`` (CSV and JSON), the status page
    and a team's own /team count derived hits in their own column, within cache hits."""
    storage = storage_for(backend)
    gw = await gateway_factory(storage=storage, admin={"public_status": True})
    try:
        async with aiohttp.ClientSession() as session:
            loose, strict = Ask(1, "objects", 40, 10), Ask(1, "objects", 85, 2)
            assert (await ask(session, gw.url, loose))[0] == MISS  # search pays
            assert (await ask(session, gw.url, loose))[0].startswith(
                "imagerecognize-gateway; hit; ttl=")  # search's exact hit
            for _ in range(2):
                assert (await ask(session, gw.url, strict, key=ADS))[0] == DERIVED
            async with session.get(f"{gw.base}/status.json") as r:
                status = await r.json()
            async with session.get(f"{gw.base}/status") as r:
                page = await r.text()
            async with session.get(f"{gw.base}/team", params={"apikey": ADS}) as r:
                own = await r.json()
        assert sim.state.calls == 1
        teams = {t["team"]: t for t in status["teams"]}
        assert [(teams[t]["cache_hits"], teams[t]["derived_hits"], teams[t]["calls_saved"])
                for t in ("search", "ads")] == [(1, 0, 1), (2, 2, 2)]
        assert status["total"]["derived_hits"] == 2
        assert own["calls"]["derived_hits"] == 2 and own["calls"]["cache_hits"] == 2
        head = re.findall(r"<th>([^<]*)</th>", page.partition('<table id="teams">')[2])
        column = head.index("of them derived") - 1  # the team's name is a <th> in each row
        row = re.search(r'<tr data-team="ads">.*?</tr>', page, re.S)
        assert row is not None
        assert re.findall(r'<td[^>]*>(?:<div.*?</div>)?(.*?)</td>', row[0], re.S)[column] == "2"

        config = write_config(tmp_path / "config.toml", sim_url=sim.url,
                              db=tmp_path / "gateway.db", port=free_port(),
                              teams={"search": (SEARCH, 1000), "ads": (ADS, 1000)})
        if storage:
            config.write_text(config.read_text().replace(
                'backend = "sqlite"', f'backend = "redis"\nredis_url = "{REDIS_URL}"\n'
                f'redis_prefix = "{storage["redis_prefix"]}"'))
        out = await asyncio.to_thread(
            subprocess.run, [*gateway_command(), "usage", "--config", str(config),
                             "--format", "csv"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        header, *rows = [line.split(",") for line in out.stdout.splitlines()]
        csv = {r[header.index("team")]: dict(zip(header, r, strict=True)) for r in rows}
        assert [(csv[t]["cache_hits"], csv[t]["derived_hits"])
                for t in ("search", "ads", "(total)")] == [("1", "0"), ("2", "2"), ("3", "2")]
    finally:
        await forget(storage)


def test_an_older_ledger_file_gains_the_derived_column_and_keeps_its_counts(
        tmp_path: Path) -> None:
    """A ledger written before derived hits were counted apart opens, keeps every count, and
    reads 0 derived until some are recorded."""
    import sqlite3

    from gateway.store.base import Hit
    from gateway.store.sqlite import LEDGER_MIGRATIONS, LEDGER_PROBE, SQLiteStore, prepare_file

    path = str(tmp_path / "gateway.db")
    prepare_file(path, LEDGER_MIGRATIONS[:-1], LEDGER_PROBE)
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO quota_usage (team, period, used, hits, coalesced) "
                     "VALUES ('search', '2026-12', 4, 7, 2)")

    async def check() -> list[tuple[int, int, int, int]]:
        store = SQLiteStore(path)
        await store.open()
        try:
            before = [(u.charged, u.hits, u.coalesced, u.derived)
                      for u in await store.usage("2026-12")]
            await store.record_hits([Hit("k", "search", "2026-12", 0.0, derived=True)])
            after = [(u.charged, u.hits, u.coalesced, u.derived)
                     for u in await store.usage("2026-12")]
            return before + after
        finally:
            await store.close()

    assert asyncio.run(check()) == [(4, 7, 2, 0), (4, 8, 2, 1)]


async def test_derive_false_keeps_exact_keys(gateway_factory: GatewayFactory, sim: Sim) -> None:
    gw = await gateway_factory(cache={"derive": False})
    async with aiohttp.ClientSession() as session:
        await ask(session, gw.url, Ask(0, "objects", 50, 10))
        assert (await ask(session, gw.url, Ask(0, "objects", 80, 3)))[0] == MISS
    assert sim.state.calls == 2


async def test_a_team_without_allow_refresh_cannot_force_a_paid_call(
        gateway_factory: GatewayFactory, sim: Sim) -> None:
    gw = await gateway_factory(teams={
        "search": {"keys": [SEARCH], "quota": 10, "allow_refresh": False},
        "ads": {"keys": [ADS], "quota": 10},
    })
    no_cache = {"Cache-Control": "no-cache"}
    a = Ask(1, "objects", 50, 10)
    async with aiohttp.ClientSession() as session:
        assert (await ask(session, gw.url, a))[0] == MISS
        status, _ = await ask(session, gw.url, a, headers=no_cache)
        assert status.startswith("imagerecognize-gateway; hit; ttl=")
        assert sim.state.calls == 1
        status, _ = await ask(session, gw.url, a, key=ADS, headers=no_cache)
        assert status == "imagerecognize-gateway; fwd=request; stored"
        assert sim.state.calls == 2
        # no-store still bypasses the cache for everyone: it asks to keep nothing.
        status, _ = await ask(session, gw.url, a, headers={"Cache-Control": "no-store"})
        assert status == "imagerecognize-gateway; fwd=request"


async def test_an_only_if_cached_miss_is_not_counted_as_an_upstream_failure(
        gateway_factory: GatewayFactory, sim: Sim) -> None:
    gw = await gateway_factory()
    form = aiohttp.FormData(Ask(2, "objects", 50, 10).fields(SEARCH))
    form.add_field("file", IMAGES[2], filename="x")
    async with aiohttp.ClientSession() as session, session.post(
            gw.url, data=form, headers={"Cache-Control": "only-if-cached"}) as r:
        assert r.status == 504
    assert sim.state.calls == 0
    text = await scrape(gw.base)
    assert ('gateway_requests_total{cache="only-if-cached",status="504",team="search",'
            'type="objects"} 1.0') in text


# -- the audit --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_the_audit_checks_derived_answers_on_the_audit_line(
        gateway_factory: GatewayFactory, sim: Sim, backend: str) -> None:
    storage = storage_for(backend)
    try:
        await audited_on_the_audit_line(await gateway_factory(
            cache={"audit_rate": 1.0}, storage=storage), sim)
    finally:
        await forget(storage)


async def audited_on_the_audit_line(gw: Gateway, sim: Sim) -> None:
    async with aiohttp.ClientSession() as session:
        await ask(session, gw.url, Ask(0, "objects", 50, 10))
        assert (await ask(session, gw.url, Ask(0, "objects", 80, 3)))[0] == DERIVED
        await gw.state.service.drain()
    assert sim.state.calls == 2  # the miss, and the audit of the derived answer
    period = gw.state.ledger.period()
    assert await gw.state.store.used("search", period) == 1  # the team paid only its miss
    assert await gw.state.store.used("audit", period) == 1
    text = await scrape(gw.base)
    assert 'gateway_cache_audits_total{result="match",type="objects"} 1.0' in text
    assert gw.state.service.derivable("objects")


async def test_an_audit_mismatch_switches_derivation_off_for_the_type(
        gateway_factory: GatewayFactory, sim: Sim, caplog: pytest.LogCaptureFixture,
        tmp_path: Path) -> None:
    sim.state.model = "cap-first"
    gw = await gateway_factory(cache={"audit_rate": 1.0})
    async with aiohttp.ClientSession() as session:
        # An image whose cap-first answer for 3 labels is not the first 3 of its 10.
        n, three = -1, []
        for i, image in enumerate(IMAGES):
            ten = await sim_objects(session, sim.url, image, "objects", 0, 10)
            three = await sim_objects(session, sim.url, image, "objects", 0, 3)
            if three != ten[:3]:
                n = i
                break
        assert n >= 0, "no image breaks the model"
        sim.state.calls = 0
        await ask(session, gw.url, Ask(n, "objects", 0, 10))
        with caplog.at_level(logging.ERROR, logger="gateway.service"):
            status, body = await ask(session, gw.url, Ask(n, "objects", 0, 3))
            assert status == DERIVED  # the first time, the model is believed...
            await gw.state.service.drain()
        # ...and the audit proves it wrong: derivation is off for objects, said loudly.
        assert not gw.state.service.derivable("objects")
        assert any("differs from the upstream" in r.getMessage() for r in caplog.records)
        assert await gw.state.store.get_meta("derive_off:objects")
        text = await scrape(gw.base)
        assert 'gateway_cache_audits_total{result="mismatch",type="objects"} 1.0' in text
        # The audited exact answer was stored, and other variants now go upstream.
        status, body = await ask(session, gw.url, Ask(n, "objects", 0, 3))
        assert status.startswith("imagerecognize-gateway; hit; ttl=")
        assert body["data"]["objects"] == three
        assert (await ask(session, gw.url, Ask(n, "objects", 0, 2)))[0] == MISS
        assert gw.state.service.derivable("nsfw")  # only the type that failed
    # The operator sees it in `gateway cache stats` too, with the parameters and the time.
    config = write_config(tmp_path / "config.toml", sim_url=sim.url, db=tmp_path / "gateway.db",
                          port=free_port(), teams={"search": (TEAM_KEYS["search"], 100)})
    out = await asyncio.to_thread(
        subprocess.run, [*gateway_command(), "cache", "stats", "--config", str(config)],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^derived hits\s+objects: off: audit mismatch at \S+ \(\d{4}-", out.stdout,
                     re.M), out.stdout
    assert re.search(r"^derived hits\s+nsfw: on$", out.stdout, re.M)


@pytest.mark.parametrize(("raw", "problem"), [
    pytest.param({"cache": {"audit_rate": 1.5}}, "cache.audit_rate: must be between 0 and 1",
                 id="audit-rate-above-one"),
    pytest.param({"cache": {"widen": True, "derive": False}}, "cache.widen: needs derive = true",
                 id="widen-without-derive"),
    pytest.param({"cache": {"widen_max_labels": 0}}, "cache.widen_max_labels: must be an integer",
                 id="widen-cap-zero"),
    pytest.param({"teams": {"audit": {"keys": ["k"], "quota": 1}}},
                 "teams.audit: the name is reserved", id="a-team-called-audit"),
    pytest.param({"teams": {"t": {"keys": ["k"], "quota": 1, "allow_refresh": "no"}}},
                 "teams.t.allow_refresh: must be true or false", id="allow-refresh-not-a-bool"),
])
def test_smart_cache_settings_are_checked(tmp_path: Path, raw: dict[str, Any],
                                          problem: str) -> None:
    from gateway.config import ConfigError
    with pytest.raises(ConfigError, match=problem.replace(".", r"\.")):
        make_config("http://127.0.0.1:1/api/v2/", tmp_path / "g.db", **raw)


def test_a_derived_answer_keeps_an_object_at_exactly_the_asked_threshold() -> None:
    """The model's threshold is inclusive (confidence >= min_confidence), as the upstream's:
    an object at exactly the asked value is in the answer, then the first max_labels."""
    s = stored("max_labels=10&min_confidence=50", [90, 80, 80, 60])
    for asked, names in [((80, 10), ["o0", "o1", "o2"]), ((80, 2), ["o0", "o1"]),
                         ((60, 10), ["o0", "o1", "o2", "o3"]), ((81, 10), ["o0"])]:
        params = {"max_labels": asked[1], "min_confidence": asked[0]}
        assert derive.usable("objects", s, params)
        data = json.loads(derive.derive("objects", s, params) + b"0}")
        assert [o["name"] for o in data["objects"]] == names, asked
