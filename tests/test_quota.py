"""Quota periods roll over on calendar UTC boundaries, derived from timestamps."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.quota import period_key
from gateway.sample_images import make_png
from tests.conftest import TEAM_KEYS, GatewayFactory, Sim, objects_form, post_requests


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("period", "before", "after", "keys"), [
    pytest.param("day", "2026-11-24T23:59:59", "2026-11-25T00:00:00",
                 ("2026-11-24", "2026-11-25"), id="day"),
    pytest.param("week", "2026-11-29T23:59:59", "2026-11-30T00:00:00",
                 ("2026-W48", "2026-W49"), id="week-monday"),
    pytest.param("week", "2026-12-31T12:00:00", "2027-01-04T00:00:00",
                 ("2026-W53", "2027-W01"), id="iso-week-year"),
    pytest.param("month", "2026-11-30T23:59:59", "2026-12-01T00:00:00",
                 ("2026-11", "2026-12"), id="month"),
    pytest.param("total", "2026-11-30T23:59:59", "2030-01-01T00:00:00",
                 ("total", "total"), id="total"),
])
def test_period_keys(period: str, before: str, after: str, keys: tuple[str, str]) -> None:
    assert (period_key(period, ts(before)), period_key(period, ts(after))) == keys


@pytest.mark.parametrize("period", ["day", "week", "month"])
async def test_quota_resets_when_the_period_rolls_over(
        gateway_factory: GatewayFactory, sim: Sim, period: str) -> None:
    now = [ts("2026-11-30T23:59:58")]  # a Monday's eve, a month's last day
    if period == "week":
        now = [ts("2026-11-29T23:59:58")]  # Sunday
    gw = await gateway_factory(quota={"period": period},
                               teams={"t": {"keys": ["k"], "quota": 2}}, clock=lambda: now[0])
    codes = [(await post_requests(gw.url, *objects_form("k", make_png(500 + i)))).status_code
             for i in range(3)]
    assert codes == [200, 200, 402]
    now[0] += 5  # past midnight UTC: a new day, week or month
    r = await post_requests(gw.url, *objects_form("k", make_png(600)))
    assert r.status_code == 200 and r.json()["data"]["quota"] == 1
    assert sim.state.calls == 3


async def test_total_period_never_resets(gateway_factory: GatewayFactory, sim: Sim) -> None:
    now = [ts("2026-11-30T23:59:58")]
    gw = await gateway_factory(quota={"period": "total"},
                               teams={"t": {"keys": [TEAM_KEYS["search"]], "quota": 1}},
                               clock=lambda: now[0])
    assert (await post_requests(gw.url, *objects_form(TEAM_KEYS["search"],
                                                      make_png(1)))).status_code == 200
    now[0] += 86400 * 400
    assert (await post_requests(gw.url, *objects_form(TEAM_KEYS["search"],
                                                      make_png(2)))).status_code == 402
