"""The recognition service's coalescing rules, one at a time, through a real gateway on
loopback over a small upstream that holds its first answer until the test lets it go: a
follower rides free and is told its team's quota, waits at most coalesce_wait_s, and what it
then pays for itself is stored under its own key. Written for mutants that survived
(docs/testing.md)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.devtools.sample_images import make_png
from tests.support import TEAM_KEYS, GatewayFactory, make_config

SEARCH = TEAM_KEYS["search"]
IMAGE = make_png(4242)
OBJECTS = [{"name": "Car", "confidence": 99.0}, {"name": "Tree", "confidence": 85.5}]


@dataclass
class HeldUpstream:
    """Answers the API's success envelope; the first request waits for ``release``."""

    url: str = ""
    calls: int = 0
    objects: list[dict[str, Any]] = field(default_factory=lambda: OBJECTS)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    first_arrived: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def held() -> AsyncIterator[HeldUpstream]:
    upstream = HeldUpstream()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        upstream.calls += 1
        if upstream.calls == 1:
            upstream.first_arrived.set()
            await upstream.release.wait()
        data = {"error": 0, "type": "objects", "objects": upstream.objects, "quota": 5000}
        return web.json_response({"status": 200, "data": data})

    app = web.Application()
    app.router.add_post("/api/v2/", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    upstream.url = f"http://127.0.0.1:{runner.addresses[0][1]}/api/v2/"
    yield upstream
    upstream.release.set()
    await runner.cleanup()


async def ask(session: aiohttp.ClientSession, url: str, max_labels: int = 10,
              min_confidence: int = 80) -> tuple[str, dict[str, Any]]:
    form = aiohttp.FormData({"apikey": SEARCH, "type": "objects", "max_labels": str(max_labels),
                             "min_confidence": str(min_confidence)})
    form.add_field("file", IMAGE, filename="a.png")
    async with session.post(url, data=form) as r:
        body = await r.json(content_type=None)
        assert r.status == 200, body
        return r.headers["Cache-Status"], body


def counting_lookups(store: Any, read: str = "lookup") -> Callable[[int], Awaitable[None]]:
    """Wrap the real store's ``read`` (the last one before a request looks for a flight);
    the returned coroutine waits until ``n`` of them have returned and the loop has run
    what follows them (a follower then waits on the flight)."""
    done = 0
    real = getattr(store, read)
    moved = asyncio.Event()

    async def lookup(*args: Any) -> Any:
        nonlocal done
        found = await real(*args)
        done += 1
        moved.set()
        return found

    setattr(store, read, lookup)

    async def returned(n: int) -> None:
        while done < n:
            moved.clear()
            await moved.wait()
        for _ in range(20):  # the follower's few synchronous steps to its flight
            await asyncio.sleep(0)

    return returned


async def test_a_coalesced_follower_rides_free_and_is_told_its_teams_quota(
        gateway_factory: GatewayFactory, held: HeldUpstream, tmp_path: Path) -> None:
    gw = await gateway_factory(make_config(held.url, tmp_path / "g.db", cache={"derive": False}))
    returned = counting_lookups(gw.state.store)
    async with aiohttp.ClientSession() as session:
        leader = asyncio.create_task(ask(session, gw.url))
        await held.first_arrived.wait()
        follower = asyncio.create_task(ask(session, gw.url))
        await returned(2)
        held.release.set()
        (lead_status, lead), (status, body) = await leader, await follower
    assert "fwd=miss" in lead_status and status == "imagerecognize-gateway; hit; detail=coalesced"
    assert held.calls == 1
    assert body["data"]["objects"] == OBJECTS
    # search paid one call of its 1000: the follower is told 999 left, as the leader was.
    assert lead["data"]["quota"] == body["data"]["quota"] == 999
    await gw.state.service.flush()
    (usage,) = [u for u in await gw.state.store.usage(gw.state.ledger.period())
                if u.team == "search"]
    assert (usage.charged, usage.hits, usage.coalesced) == (1, 0, 1)


async def test_a_follower_waits_at_most_coalesce_wait_s_then_pays_under_its_own_key(
        gateway_factory: GatewayFactory, held: HeldUpstream, tmp_path: Path) -> None:
    config = make_config(held.url, tmp_path / "g.db",
                         cache={"derive": False, "coalesce_wait_s": 0.2})
    gw = await gateway_factory(config)
    returned = counting_lookups(gw.state.store)
    async with aiohttp.ClientSession() as session:
        leader = asyncio.create_task(ask(session, gw.url))
        await held.first_arrived.wait()
        await returned(1)
        # The leader's answer is held: the follower stops waiting and calls for itself.
        status, body = await asyncio.wait_for(ask(session, gw.url), 10)
        assert status == "imagerecognize-gateway; fwd=miss; stored"
        assert body["data"]["objects"] == OBJECTS and held.calls == 2
        # What it paid for is stored under the request's own key: the next one is a hit.
        status, _ = await ask(session, gw.url)
        assert status.startswith("imagerecognize-gateway; hit; ttl=")
        assert held.calls == 2
        held.release.set()
        assert "fwd=miss" in (await leader)[0]
    assert await gw.state.store.used("search", gw.state.ledger.period()) == 2


async def test_a_no_store_request_is_counted_as_neither_hit_nor_miss(
        gateway_factory: GatewayFactory, held: HeldUpstream, tmp_path: Path) -> None:
    held.release.set()
    gw = await gateway_factory(make_config(held.url, tmp_path / "g.db"))
    form = aiohttp.FormData({"apikey": SEARCH, "type": "objects", "max_labels": "10",
                             "min_confidence": "80"})
    form.add_field("file", IMAGE, filename="a.png")
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.url, data=form, headers={"Cache-Control": "no-store"}) as r:
            assert r.status == 200 and r.headers["Cache-Status"] == \
                "imagerecognize-gateway; fwd=request"
            assert json.loads(await r.read())["data"]["objects"] == OBJECTS
        async with session.get(f"{gw.base}/metrics") as r:
            text = await r.text()
    assert ('gateway_requests_total{cache="none",status="200",team="search",type="objects"} 1.0'
            in text)


@pytest.mark.parametrize(("cache", "read", "second"), [
    pytest.param({"derive": False}, "lookup", (10, 80), id="exact-key"),
    pytest.param({"widen": True}, "results_of_type", (3, 50), id="widened-key"),
])
async def test_a_miss_read_before_the_leader_landed_still_rides_on_its_call(
        gateway_factory: GatewayFactory, held: HeldUpstream, tmp_path: Path,
        cache: dict[str, Any], read: str, second: tuple[int, int]) -> None:
    """The second request's last store read starts before the leader's result is committed
    and returns after the leader has landed (a loaded machine, a slow reader thread): no
    flight is left to follow, yet the result is held in memory. It rides on that call, free,
    instead of paying a second one for the same question."""
    gw = await gateway_factory(make_config(held.url, tmp_path / "g.db", cache=cache))
    store = gw.state.store
    real = getattr(store, read)
    calls = 0
    second_read, leader_answered = asyncio.Event(), asyncio.Event()

    async def held_read(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        found = await real(*args)
        if calls == 2:  # the second request's read: its snapshot predates the commit
            second_read.set()
            await leader_answered.wait()
        return found

    setattr(store, read, held_read)
    async with aiohttp.ClientSession() as session:
        leader = asyncio.create_task(ask(session, gw.url))
        await held.first_arrived.wait()
        other = asyncio.create_task(ask(session, gw.url, *second))
        await second_read.wait()
        held.release.set()
        assert "fwd=miss" in (await leader)[0]
        leader_answered.set()
        status, body = await asyncio.wait_for(other, 10)
    assert status == "imagerecognize-gateway; hit; detail=coalesced"
    assert held.calls == 1
    assert body["data"]["objects"] == [o for o in OBJECTS if o["confidence"] >= second[1]]
    assert await store.used("search", gw.state.ledger.period()) == 1


async def test_a_widened_answer_off_the_model_switches_widening_off_and_each_pays_its_own(
        gateway_factory: GatewayFactory, held: HeldUpstream, tmp_path: Path) -> None:
    """An upstream answering lowest first breaks the threshold/label model: the widened
    answer cannot answer the leader's question nor its follower's, so widening and
    derivation go off for the type and each asks (and pays for) its own exact question."""
    held.objects = list(reversed(OBJECTS))
    gw = await gateway_factory(make_config(held.url, tmp_path / "g.db", cache={"widen": True}))
    returned = counting_lookups(gw.state.store, "results_of_type")
    async with aiohttp.ClientSession() as session:
        leader = asyncio.create_task(ask(session, gw.url))
        await held.first_arrived.wait()
        follower = asyncio.create_task(ask(session, gw.url))
        await returned(2)
        held.release.set()
        answers = [await leader, await follower]
    assert [status for status, _ in answers] == ["imagerecognize-gateway; fwd=miss; stored"] * 2
    assert all(body["data"]["objects"] == held.objects for _, body in answers)
    assert held.calls == 3  # the widened call, then each exact question
    assert not gw.state.service.derivable("objects")
    assert await gw.state.store.used("search", gw.state.ledger.period()) == 3


async def test_a_reservation_reclaimed_before_its_call_is_sent_sends_nothing(
        gateway_factory: GatewayFactory, held: HeldUpstream, tmp_path: Path) -> None:
    """Housekeeping in another process can take this one for dead and end its reservations
    (refunded: never sent). A call whose reservation is gone by the time it would be marked
    sent is not sent: 503 with its reason, no upstream call, no charge."""
    gw = await gateway_factory(make_config(held.url, tmp_path / "g.db", cache={"derive": False}))
    store = gw.state.store
    real_reserve = store.reserve

    async def reserve_then_reclaimed(*args: Any, **kwargs: Any) -> Any:
        reservation = await real_reserve(*args, **kwargs)
        await store.reclaim_owner(gw.state.ledger.owner.id)  # what the other process does
        return reservation

    store.reserve = reserve_then_reclaimed  # type: ignore[method-assign]
    form = aiohttp.FormData({"apikey": SEARCH, "type": "objects", "max_labels": "10",
                             "min_confidence": "80"})
    form.add_field("file", IMAGE, filename="a.png")
    async with aiohttp.ClientSession() as session, session.post(gw.url, data=form) as r:
        body = await r.json(content_type=None)
    assert (r.status, body) == (503, {"status": 503, "data": None,
                                      "status_message": "Gateway ledger record lost; try again"})
    assert held.calls == 0
    assert await store.used("search", gw.state.ledger.period()) == 0


async def test_a_hit_right_after_a_miss_reports_the_quota_that_miss_left(
        gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    """The quota in a free answer comes from a short-lived per-team count: a miss's charge
    must update it, or a hit right after reports one call more than the team has left."""
    gw = await gateway_factory()
    limit = next(t.quota for t in gw.state.config.teams if t.name == "search")

    async def quota(image: bytes) -> tuple[str, int]:
        form = aiohttp.FormData({"apikey": SEARCH, "type": "objects", "max_labels": "10",
                                 "min_confidence": "80"})
        form.add_field("file", image, filename="a.png")
        async with aiohttp.ClientSession() as session, session.post(gw.url, data=form) as r:
            body = await r.json(content_type=None)
            return r.headers["Cache-Status"], body["data"]["quota"]

    first, second = make_png(5151), make_png(5252)
    assert (await quota(first))[1] == limit - 1
    assert (await quota(second))[1] == limit - 2
    status, left = await quota(first)  # from the in-process tier, within the count's age
    assert status.startswith("imagerecognize-gateway; hit;")
    assert left == limit - 2


@pytest.mark.parametrize(("header", "served"), [
    pytest.param(None, "imagerecognize-gateway; hit; ttl=", id="none"),
    pytest.param("no-cache", "imagerecognize-gateway; fwd=request; stored", id="no-cache"),
    pytest.param("NO-CACHE", "imagerecognize-gateway; fwd=request; stored", id="upper-case"),
    pytest.param('no-cache="x"', "imagerecognize-gateway; fwd=request; stored",
                 id="no-cache-with-an-argument"),
    pytest.param("max-age=0", "imagerecognize-gateway; fwd=request; stored", id="max-age-0"),
    pytest.param("max-age = 0", "imagerecognize-gateway; fwd=request; stored",
                 id="max-age-0-spaced"),
    pytest.param("max-age=10", "imagerecognize-gateway; hit; ttl=", id="max-age-10"),
    pytest.param("private, no-store", "imagerecognize-gateway; fwd=request", id="no-store"),
    pytest.param("no-cachex", "imagerecognize-gateway; hit; ttl=", id="not-a-directive"),
    pytest.param("only-if-cached", "imagerecognize-gateway; hit; ttl=", id="only-if-cached"),
])
async def test_the_cache_control_a_client_sends_decides_how_a_held_answer_is_served(
        gateway_factory: GatewayFactory, held: HeldUpstream, tmp_path: Path,
        header: str | None, served: str) -> None:
    """An image already held, asked again with each Cache-Control: answered from the store,
    or forwarded (stored unless no-store). The service gets only the directives; the handler
    reads the header and writes Cache-Status."""
    held.release.set()
    gw = await gateway_factory(make_config(held.url, tmp_path / "g.db"))

    async def ask(headers: dict[str, str]) -> str:
        form = aiohttp.FormData({"apikey": SEARCH, "type": "objects", "max_labels": "10",
                                 "min_confidence": "80"})
        form.add_field("file", IMAGE, filename="a.png")
        async with aiohttp.ClientSession() as session, \
                session.post(gw.url, data=form, headers=headers) as r:
            assert r.status == 200
            return r.headers["Cache-Status"]

    assert (await ask({})) == "imagerecognize-gateway; fwd=miss; stored"
    status = await ask({} if header is None else {"Cache-Control": header})
    assert status.startswith(served) and (served.endswith("ttl=") or status == served), status
