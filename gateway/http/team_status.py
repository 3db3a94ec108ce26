"""``GET /team``: a team's own figures, asked with its own team key.

What a team can see without an operator: its quota this period (limit, used, remaining, when
it resets), its spend and savings in money (``[pricing]``), its hit ratio, its requests refused
since the gateway started, its own limits, and its store-issued keys (``gateway.core.keys``: label,
state, created, expires, last use and uses; never a hash). Nothing of another team. The key is
the one it calls ``/api/v2/`` with, as ``Authorization: Bearer <key>`` (preferred: a query
string ends up in proxies' logs) or ``?apikey=<key>``; it is checked by the API's own rule, so
a key the API refuses is refused here (401 envelope), and the request takes a token from the
team's rate limit like any other (429). The key is never logged: the access line names the
team and the path, not the query.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from aiohttp import web

from gateway.config import TeamConfig
from gateway.core.errors import GatewayError, KeyInvalid
from gateway.core.keys import config_key_counts, key_dict
from gateway.core.quota import QuotaLedger
from gateway.core.usage import Period, TeamLine, UsageReport, iso_utc, period_resets_at
from gateway.http.api import REQUEST_ID, _authorize
from gateway.http.form import Form
from gateway.http.state import STATE, GatewayState
from gateway.obs.logs import log_access

REFUSALS = ("402", "429")  # quota used up, rate limited


def presented_key(request: web.Request) -> str:
    """The Bearer credential if there is one, else ``?apikey=`` ("" when neither)."""
    scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.query.get("apikey", "")


async def handle_team(request: web.Request) -> web.Response:
    state = request.app[STATE]
    started = time.perf_counter()
    team_label, status = "unknown", 500
    try:
        key = presented_key(request)
        try:
            team = _authorize(Form(fields={"apikey": key}, file=None), state)
        except KeyInvalid:
            raise KeyInvalid(headers={"WWW-Authenticate": "Bearer"}) from None
        team_label = team.name
        limits = await state.limiter.check(team)
        body = await team_status(state, team, asked_with=_hash(key))
        status = 200
        return web.json_response(body, headers={**limits, "Cache-Control": "no-store"})
    except GatewayError as exc:
        status = exc.status
        raise
    finally:
        if state.config.server.access_log:
            log_access(
                {
                    "team": team_label,
                    "status": status,
                    "gateway_ms": round((time.perf_counter() - started) * 1000, 2),
                    "request_id": request[REQUEST_ID],
                    "client": request.remote,
                    "method": request.method,
                    "path": request.path,  # never the query: it may hold the key
                }
            )


def _hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


async def team_status(
    state: GatewayState, team: TeamConfig, *, asked_with: str | None = None
) -> dict[str, Any]:
    """The team's figures; ``asked_with`` (a key's hash) marks the key this request used."""
    await state.service.flush()  # this process's batched hit counts, so the figures are now's
    await state.keyring.flush()  # ... and its keys' uses, this request's included
    config = state.config
    now = state.ledger.clock()
    period = state.ledger.period()
    row = next((u for u in await state.store.usage(period) if u.team == team.name), None)
    charged = row.charged if row is not None else 0
    line = TeamLine(
        team.name,
        charged,
        team.quota,
        QuotaLedger.left(team, charged),
        row.hits if row is not None else 0,
        row.coalesced if row is not None else 0,
        row.undelivered if row is not None else 0,
        row.derived if row is not None else 0,
    )
    report = UsageReport(
        Period(config.quota.period, period), config.quota.period, (period,), (line,), config.pricing
    )
    resets = period_resets_at(config.quota.period, now)
    ratio = line.hit_ratio
    return {
        "team": team.name,
        "period": period,
        "quota_period": config.quota.period,
        "quota": {
            "limit": team.quota,
            "used": line.charged,
            "remaining": line.remaining,
            "resets_at": iso_utc(resets) if resets is not None else None,
            "resets_in_s": round(resets - now) if resets is not None else None,
        },
        "calls": {
            "charged": line.charged,
            "cache_hits": line.hits,
            "derived_hits": line.derived,
            "coalesced": line.coalesced,
            "calls_saved": line.saved,
            "undelivered": line.undelivered,
        },
        "hit_ratio": round(ratio, 4) if ratio is not None else None,
        "spend": report.spend(line),
        "savings": report.savings(line),
        "currency": config.pricing.currency,
        "price_per_call": config.pricing.per_call,
        "refused_since_start": _refusals(state, team.name),
        "limits": {
            "rate_per_s": team.rate_per_s,
            "burst": team.burst,
            "types": sorted(team.types) if team.types is not None else None,
        },
        "keys": [
            {**key_dict(k, now), "this_request": k.key_hash == asked_with}
            for k in await state.store.list_keys()
            if k.team == team.name
        ],
        "config_keys": config_key_counts(config, team.name).get(team.name, 0),
        "generated_at": iso_utc(time.time()),
    }


def _refusals(state: GatewayState, team: str) -> dict[str, int]:
    """The team's requests answered 402 and 429 since the gateway started, every worker's
    (gateway_requests_total: per process, not in the store)."""
    out = dict.fromkeys(REFUSALS, 0)
    for family in state.metrics.whole().collect():
        for sample in family.samples:
            if sample.name == "gateway_requests_total" and sample.labels.get("team") == team:
                status = sample.labels.get("status", "")
                if status in out:
                    out[status] += int(sample.value)
    return out
