"""Per-team rate limits: 429 with Retry-After and the IETF RateLimit headers, locally."""

from __future__ import annotations

from gateway.sample_images import make_png
from tests.conftest import GatewayFactory, Sim, objects_form, post_requests


async def test_team_over_its_rate_gets_429_without_charge(gateway_factory: GatewayFactory,
                                                          sim: Sim) -> None:
    gw = await gateway_factory(teams={
        "slow": {"keys": ["slow-key"], "quota": 100, "rate_per_s": 0.5, "burst": 3},
        "free": {"keys": ["free-key"], "quota": 100},
    })
    codes = []
    for i in range(5):
        r = await post_requests(gw.url, *objects_form("slow-key", make_png(i)))
        codes.append(r.status_code)
        if r.status_code == 200:
            assert r.headers["RateLimit-Policy"] == '"team";q=3;w=6'
            assert r.headers["RateLimit"].startswith('"team";r=')
        else:
            limited = r
    assert codes == [200, 200, 200, 429, 429]
    assert limited.json() == {"status": 429, "status_message": "Rate limit exceeded", "data": None}
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.headers["RateLimit"].startswith('"team";r=0;t=')
    assert sim.state.calls == 3
    assert await gw.state.store.used("slow", gw.state.ledger.period()) == 3
    # Another team is not limited.
    other = await post_requests(gw.url, *objects_form("free-key", make_png(9)))
    assert other.status_code == 200 and "RateLimit" not in other.headers


async def test_team_limited_to_some_types(gateway_factory: GatewayFactory, sim: Sim) -> None:
    gw = await gateway_factory(teams={"t": {"keys": ["k"], "quota": 10, "types": ["nsfw"]}})
    r = await post_requests(gw.url, *objects_form("k", make_png(1)))
    assert r.status_code == 420 and sim.state.calls == 0
    ok = await post_requests(gw.url, {"apikey": "k", "type": "nsfw", "nsfw_min_confidence": "10"},
                             {"file": make_png(1)})
    assert ok.status_code == 200
