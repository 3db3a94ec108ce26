"""Spend in money: [pricing] is read and checked; the upstream calls each team caused are
counted by team and type in a new counter (the old metric keeps its labels); the configured
prices are exported so the dashboard multiplies by them."""

from __future__ import annotations

import re

import aiohttp
import pytest

from gateway.config import ConfigError, parse_config
from gateway.devtools.sample_images import make_png
from tests.support import TEAM_KEYS, GatewayFactory, Sim

BASE = {"upstream": {"url": "http://127.0.0.1:9/api/v2/"},
        "teams": {"a": {"keys": ["k"], "quota": 5}}}
ENV = {"IMAGERECOGNIZE_API_KEY": "upstream-key"}


def test_pricing_is_read_with_per_type_prices_and_defaults() -> None:
    config = parse_config({**BASE, "pricing": {"per_call": 0.001, "currency": "EUR",
                                               "types": {"objects": 0.0025, "nsfw": 0}}},
                          env=ENV)
    p = config.pricing
    assert (p.per_call, p.currency) == (0.001, "EUR")
    assert [p.price(t) for t in ("objects", "nsfw", "celebrities")] == [0.0025, 0.0, 0.001]
    assert parse_config(BASE, env=ENV).pricing.price("objects") == 0.0


@pytest.mark.parametrize(("pricing", "problem"), [
    pytest.param({"per_call": -0.01}, "pricing.per_call: must be >= 0", id="negative"),
    pytest.param({"per_call": "0.001"}, "pricing.per_call: must be an integer or a number",
                 id="text"),
    pytest.param({"currency": "usd"}, "pricing.currency: must be a three-letter", id="currency"),
    pytest.param({"types": {"faces": 0.1}}, "pricing.types.faces: unknown key", id="type"),
    pytest.param({"types": {"nsfw": -1}}, "pricing.types.nsfw: must be >= 0", id="type-price"),
    pytest.param({"price": 1}, "pricing.price: unknown key", id="unknown-key"),
])
def test_bad_pricing_is_refused_naming_the_key(pricing: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        parse_config({**BASE, "pricing": pricing}, env=ENV)


def sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and dict(re.findall(r'(\w+)="([^"]*)"', m[1])) == labels:
            return float(m[2])
    return None


async def post(client: aiohttp.ClientSession, url: str, key: str, type_: str,
               image: bytes) -> int:
    form = aiohttp.FormData()
    form.add_field("apikey", key)
    form.add_field("type", type_)
    params = {"objects": {"max_labels": "10", "min_confidence": "80"},
              "nsfw": {"nsfw_min_confidence": "50"}}[type_]
    for name, value in params.items():
        form.add_field(name, value)
    form.add_field("file", image, filename="i.png", content_type="image/png")
    async with client.post(url, data=form) as r:
        return r.status


async def test_upstream_calls_are_counted_by_team_and_type_and_prices_exported(
    gateway_factory: GatewayFactory, sim: Sim, client: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(pricing={"per_call": 0.001, "currency": "EUR",
                                        "types": {"nsfw": 0.004}})
    statuses = [
        await post(client, gw.url, TEAM_KEYS["search"], "objects", make_png(8001)),  # miss
        await post(client, gw.url, TEAM_KEYS["search"], "objects", make_png(8002)),  # miss
        await post(client, gw.url, TEAM_KEYS["search"], "objects", make_png(8001)),  # hit
        await post(client, gw.url, TEAM_KEYS["ads"], "objects", make_png(8001)),  # hit (shared)
        await post(client, gw.url, TEAM_KEYS["ads"], "nsfw", make_png(8003)),  # miss
    ]
    for i in range(4):  # tiny's quota is 3: the fourth is refused before any call
        statuses.append(await post(client, gw.url, TEAM_KEYS["tiny"], "nsfw", make_png(8100 + i)))
    assert statuses == [200] * 8 + [402]
    async with client.get(gw.base + "/metrics") as r:
        text = await r.text()
    by_team = "gateway_upstream_calls_by_team_total"
    assert sample(text, by_team, team="search", type="objects") == 2
    assert sample(text, by_team, team="ads", type="nsfw") == 1
    assert sample(text, by_team, team="tiny", type="nsfw") == 3
    assert sample(text, by_team, team="ads", type="objects") is None  # hits cost nothing
    # The contract's metric keeps its labels: type and status, no team.
    assert sample(text, "gateway_upstream_requests_total", type="nsfw", status="200") == 4
    price = "gateway_upstream_call_price"
    assert sample(text, price, type="nsfw", currency="EUR") == 0.004
    assert sample(text, price, type="objects", currency="EUR") == 0.001
    assert sim.state.calls == 6  # every counted call reached the upstream, once
