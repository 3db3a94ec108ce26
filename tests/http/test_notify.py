"""Notifications: webhooks on 127.0.0.1 told when a team crosses a share of its quota (once per
period across replicas on one store), when the breaker opens and closes, when the ledger
drifts; Slack's body on request; retried; never in a request's way; bounded."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.config import ConfigError, parse_config
from gateway.devtools.sample_images import make_png
from gateway.http.app import NOTIFIER
from tests.support import TEAM_KEYS, Gateway, GatewayFactory, Sim, objects_form


@dataclass
class Receiver:
    url: str
    bodies: list[Any] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)  # statuses to answer first, then 200
    hold: asyncio.Event | None = None  # set: answer; unset: hang until it is

    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def wait_for(self, n: int, within: float = 20.0) -> list[Any]:
        async with asyncio.timeout(within), self.arrived:
            await self.arrived.wait_for(lambda: len(self.bodies) >= n)
        return self.bodies


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver("")

    async def hook(request: web.Request) -> web.Response:
        rec.bodies.append(await request.json())
        async with rec.arrived:
            rec.arrived.notify_all()
        if rec.hold is not None:
            await rec.hold.wait()
        return web.Response(status=rec.answers.pop(0) if rec.answers else 200)

    app = web.Application()
    app.router.add_post("/hook/{secret}", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook/s3cr3t-path"
    yield rec
    if rec.hold is not None:
        rec.hold.set()
    await runner.cleanup()


def notify(rec: Receiver, **extra: Any) -> dict[str, Any]:
    return {"notify": {"webhook_urls": [rec.url], **extra}}


async def charge(gw: Gateway, team: str, n: int, first: int) -> list[int]:
    statuses = []
    async with aiohttp.ClientSession() as s:
        for i in range(n):
            data, files = objects_form(TEAM_KEYS[team], make_png(first + i))
            form = aiohttp.FormData({**data})
            form.add_field("file", files["file"], filename="i.png", content_type="image/png")
            async with s.post(gw.url, data=form) as r:
                statuses.append(r.status)
    return statuses


async def test_a_team_crossing_80_and_100_percent_is_told_once_across_two_replicas(
    gateway_factory: GatewayFactory, receiver: Receiver
) -> None:
    teams = {"tiny": {"keys": [TEAM_KEYS["tiny"]], "quota": 5}}
    a = await gateway_factory(teams=teams, **notify(receiver))
    b = await gateway_factory(teams=teams, **notify(receiver))  # same SQLite store
    assert await charge(a, "tiny", 3, 9000) == [200] * 3  # 60%: nothing yet
    for gw in (a, b):
        await gw.runner.app[NOTIFIER].check_store(None)
    assert await charge(b, "tiny", 1, 9010) == [200]  # 80%
    for gw in (a, b, a):
        await gw.runner.app[NOTIFIER].check_store(None)
    assert await charge(a, "tiny", 2, 9020) == [200, 402]  # 100%, then refused
    for gw in (b, a, b):
        await gw.runner.app[NOTIFIER].check_store(None)
    bodies = await receiver.wait_for(2)
    await asyncio.sleep(0.2)  # a duplicate would have been queued by now: there is none
    period = a.state.ledger.period()
    assert [(x["event"], x["team"], x["share"], x["used"], x["quota"], x["period"])
            for x in receiver.bodies] == [("quota", "tiny", 0.8, 4, 5, period),
                                          ("quota", "tiny", 1.0, 5, 5, period)]
    assert bodies[0]["text"] == (f"team tiny has used 4 of its 5 upstream calls (80%, past 80%)"
                                 f" in {period}")


async def test_the_background_loop_notifies_without_being_asked(
    gateway_factory: GatewayFactory, receiver: Receiver
) -> None:
    teams = {"tiny": {"keys": [TEAM_KEYS["tiny"]], "quota": 2}}
    gw = await gateway_factory(teams=teams, **notify(receiver, quota_shares=[1.0]))
    assert await charge(gw, "tiny", 2, 9100) == [200, 200]
    (body,) = await receiver.wait_for(1)  # the loop checks every 5 s
    assert (body["event"], body["used"], body["share"]) == ("quota", 2, 1.0)


async def test_slack_gets_a_text_body(gateway_factory: GatewayFactory,
                                      receiver: Receiver) -> None:
    gw = await gateway_factory(**notify(receiver, slack=True))
    gw.runner.app[NOTIFIER].event("quota", "team x is at 80%")
    assert await receiver.wait_for(1) == [{"text": "team x is at 80%"}]


async def test_a_failing_webhook_is_retried_and_a_refusing_one_is_not(
    gateway_factory: GatewayFactory, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await gateway_factory(**notify(receiver, retries=3))
    notifier = gw.runner.app[NOTIFIER]
    notifier.backoff_s = 0.01
    receiver.answers = [500, 503]
    notifier.event("quota", "first")
    assert [b["text"] for b in await receiver.wait_for(3)] == ["first"] * 3
    receiver.answers = [400]
    notifier.event("quota", "second")
    notifier.event("quota", "third")
    texts = [b["text"] for b in await receiver.wait_for(5)]
    assert texts[3:] == ["second", "third"]  # a 400 is not retried
    await notifier.queue.join()  # every event handled
    assert (notifier.sent, notifier.failed) == (2, 1)
    assert "s3cr3t-path" not in caplog.text  # a webhook URL's path may be its token
    assert re.search(r"notification quota to 127\.0\.0\.1:\d+ not delivered \(HTTP 400",
                     caplog.text)


async def test_a_hanging_webhook_delays_no_request_and_its_queue_is_bounded(
    gateway_factory: GatewayFactory, receiver: Receiver
) -> None:
    receiver.hold = asyncio.Event()
    gw = await gateway_factory(**notify(receiver, max_queue=2, timeout_s=60))
    notifier = gw.runner.app[NOTIFIER]
    notifier.event("quota", "event 0")
    await receiver.wait_for(1)  # the first is being sent and hangs there
    for i in range(1, 5):
        notifier.event("quota", f"event {i}")
    async with asyncio.timeout(20):  # answered while the webhook hangs
        assert await charge(gw, "search", 3, 9200) == [200] * 3
    assert notifier.dropped == 2 and notifier.queue.qsize() == 2
    receiver.hold.set()
    assert [b["text"] for b in await receiver.wait_for(3)] == ["event 0", "event 1", "event 2"]


async def test_the_breaker_opening_and_closing_is_told(
    gateway_factory: GatewayFactory, sim: Sim, receiver: Receiver
) -> None:
    gw = await gateway_factory(upstream={"breaker_failures": 2, "breaker_cooldown_s": 0.2,
                                         "retries": 0}, **notify(receiver))
    sim.state.fault = "500"
    assert await charge(gw, "search", 3, 9300) == [502, 502, 503]
    (opened,) = await receiver.wait_for(1)
    sim.state.fault = "none"
    await asyncio.sleep(0.3)  # past the cooldown: the next miss is the probe
    assert await charge(gw, "search", 1, 9310) == [200]
    closed = (await receiver.wait_for(2))[1]
    assert (opened["event"], closed["event"]) == ("breaker_open", "breaker_closed")
    assert "circuit open" in opened["text"] and opened["replica"] == closed["replica"]


async def test_a_drift_past_its_bound_is_told_once_a_day(
    gateway_factory: GatewayFactory, receiver: Receiver
) -> None:
    gw = await gateway_factory(**notify(receiver, drift_calls=10))
    notifier = gw.runner.app[NOTIFIER]
    await notifier.check_store(10)  # at the bound: fine
    await notifier.check_store(-12)
    await notifier.check_store(-15)
    (body,) = await receiver.wait_for(1)
    await asyncio.sleep(0.2)
    assert len(receiver.bodies) == 1
    assert (body["event"], body["drift_calls"], body["bound"]) == ("ledger_drift", -12, 10)


@pytest.mark.parametrize(("section", "problem"), [
    pytest.param({"webhook_urls": ["ftp://x/hook"]}, "notify.webhook_urls: each must be an http",
                 id="scheme"),
    pytest.param({"webhook_urls": "http://x/"}, "notify.webhook_urls: must be a list",
                 id="not-a-list"),
    pytest.param({"quota_shares": [0.8, 1.5]}, "notify.quota_shares: must be a list of shares",
                 id="share-over-1"),
    pytest.param({"quota_shares": [True]}, "notify.quota_shares: must be a list of shares",
                 id="share-bool"),
    pytest.param({"retries": -1}, "notify.retries: must be an integer >= 0", id="retries"),
    pytest.param({"webhook": "http://x/"}, "notify.webhook: unknown key", id="unknown"),
])
def test_bad_notify_settings_are_refused_naming_the_key(section: dict[str, Any],
                                                        problem: str) -> None:
    raw = {"upstream": {"url": "http://127.0.0.1:9/api/v2/"},
           "teams": {"a": {"keys": ["k"], "quota": 5}}, "notify": section}
    with pytest.raises(ConfigError, match=re.escape(problem)):
        parse_config(raw, env={"IMAGERECOGNIZE_API_KEY": "u"})
