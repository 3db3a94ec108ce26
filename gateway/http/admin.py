"""The admin HTTP API (``/admin/...``) and the status page (``/status``, ``/status.json``).

The admin API exists only while ``[admin] token_env`` names a variable that is set: otherwise
``/admin/*`` is 404. It wants ``Authorization: Bearer <token>``. The status page shows every
team's name and usage, so it wants a token too: the admin token or the read-only viewer token
(``[admin] status_token_env``), as Bearer or as the password of HTTP Basic (so a browser can
ask for it); with neither set it is refused (403) unless ``[admin] public_status = true``.
Tokens are compared as sha256 digests in constant time and never logged or echoed. Handlers
read the live config (``state.config``), which a reload replaces. ``/admin/keys`` issues,
lists, rotates and revokes store-issued team keys (``gateway.core.keys``); a key's plaintext is in
the one answer that creates it, and answers about keys are ``Cache-Control: no-store``.

The page's HTML is rendered by ``gateway.http.status_page`` from template files.

Long because: the admin API, its token checks and the status page's data share one
authentication and one state.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from gateway.analysis import ANALYSIS_TYPES
from gateway.config import ConfigError, Secret, load_config
from gateway.core.errors import GatewayError, error_envelope
from gateway.core.keys import (
    DEFAULT_GRACE,
    KeyProblem,
    UnknownKey,
    config_key_counts,
    create_key,
    key_dict,
    revoke_key,
    rotate_key,
)
from gateway.core.usage import (
    PeriodError,
    UsageReport,
    cache_report,
    compute_usage,
    human_bytes,
    iso_utc,
    parse_age,
    parse_period,
    period_resets_at,
    range_period,
    stats_dict,
)
from gateway.http.reload import reload_config
from gateway.http.state import STATE, GatewayState
from gateway.http.status_page import render_status
from gateway.store.base import StoreUnavailable

log = logging.getLogger("gateway.admin")

HASH_CHARS = frozenset("0123456789abcdef")
NO_STORE = {"Cache-Control": "no-store"}  # answers that hold a key, or keys' state
TRUE_WORDS = ("1", "true", "yes", "on")


class AdminUnauthorized(GatewayError):
    status, message = 401, "Admin token missing or invalid"

    def __init__(self) -> None:
        super().__init__(headers={"WWW-Authenticate": "Bearer"})


class StatusOff(GatewayError):
    status = 403
    message = "Status page off: set [admin] status_token_env or token_env, or public_status = true"


class AdminBadRequest(GatewayError):
    status, message = 400, "Bad admin request"


class AdminNotFound(GatewayError):
    status, message = 404, "Not found"


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/admin/usage", handle_usage)
    app.router.add_get("/admin/cache/stats", handle_cache_stats)
    app.router.add_post("/admin/cache/purge", handle_cache_purge)
    app.router.add_post("/admin/reload", handle_reload)
    app.router.add_get("/admin/keys", handle_keys)
    app.router.add_post("/admin/keys", handle_key_new)
    app.router.add_post("/admin/keys/{key_id}/revoke", handle_key_revoke)
    app.router.add_post("/admin/keys/{key_id}/rotate", handle_key_rotate)
    app.router.add_get("/status", handle_status)
    app.router.add_get("/status.json", handle_status_json)


# -- authentication ---------------------------------------------------------------------------
def _admin(request: web.Request) -> GatewayState:
    state = request.app[STATE]
    if not state.config.admin.enabled:
        raise web.HTTPNotFound()
    if not token_matches(request.headers.get("Authorization"), state.config.admin.token):
        raise AdminUnauthorized()
    return state


def token_matches(authorization: str | None, token: Secret, *, basic: bool = False) -> bool:
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    given = credentials.strip()
    if basic and scheme.lower() == "basic":
        try:
            given = base64.b64decode(given, validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    if not given or not token:
        return False
    return hmac.compare_digest(
        hashlib.sha256(given.encode()).digest(), hashlib.sha256(token.reveal().encode()).digest()
    )


# -- admin API --------------------------------------------------------------------------------
async def handle_usage(request: web.Request) -> web.Response:
    state = _admin(request)
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise AdminBadRequest("format must be json or csv")
    start, end = request.query.get("from"), request.query.get("to")
    if (start is None) != (end is None):
        raise AdminBadRequest("from and to go together")
    if start is not None and end is not None:
        if "period" in request.query:
            raise AdminBadRequest("give period or from/to, not both")
        period = range_period(start, end)
    else:
        period = request.query.get("period", "current")
    report = await _usage(state, period)
    if fmt == "json":
        return web.json_response(report.as_dict())
    lines = [",".join(str(v) for v in row) for row in report.csv_rows()]
    return web.Response(
        text="\n".join(lines) + "\n",
        content_type="text/csv",
        charset="utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="gateway-usage-{report.period.key}.csv"'
        },
    )


async def _usage(state: GatewayState, period: str) -> UsageReport:
    await state.service.flush()  # this process's batched hit counts, so the numbers are now's
    try:
        asked = parse_period(period, ledger=state.config.quota.period, now=state.ledger.clock())
        return await compute_usage(state.store, state.config, asked)
    except PeriodError as exc:
        raise AdminBadRequest(str(exc)) from None


async def handle_cache_stats(request: web.Request) -> web.Response:
    state = _admin(request)
    stats, period = await cache_report(state.store, state.config, now=state.ledger.clock())
    return web.json_response(stats_dict(stats, period))


async def handle_cache_purge(request: web.Request) -> web.Response:
    state = _admin(request)
    fields = await _fields(request)
    content_hash = fields.get("hash", "").strip().lower() or None
    type_ = fields.get("type", "").strip() or None
    older = fields.get("older_than", "").strip() or None
    everything = fields.get("all", "").strip().lower() in TRUE_WORDS
    if content_hash is not None and (len(content_hash) != 32 or set(content_hash) - HASH_CHARS):
        raise AdminBadRequest("hash must be the 32 hex digits of X-Content-Hash")
    if type_ is not None and type_ not in ANALYSIS_TYPES:
        raise AdminBadRequest(f"type must be one of {', '.join(ANALYSIS_TYPES)}")
    cutoff = None
    if older is not None:
        try:
            cutoff = state.ledger.clock() - parse_age(older)
        except ValueError as exc:
            raise AdminBadRequest(f"older_than: {exc}") from None
    filtered = content_hash is not None or type_ is not None or cutoff is not None
    if filtered and everything:
        raise AdminBadRequest("all=true purges everything: give it alone, without filters")
    if not filtered and not everything:
        raise AdminBadRequest(
            "refusing to purge without a filter: give hash, type or "
            "older_than, or all=true to remove every cached result"
        )
    removed = await state.store.purge(content_hash=content_hash, type_=type_, older_than=cutoff)
    log.info(
        "admin purge removed %d cached results (hash=%s type=%s older_than=%s)",
        removed,
        content_hash,
        type_,
        older,
    )
    return web.json_response(
        {
            "removed": removed,
            "hash": content_hash,
            "type": type_,
            "older_than": older,
            "all": everything,
        }
    )


async def _fields(request: web.Request) -> dict[str, str]:
    if request.content_type == "application/json":
        try:
            body = await request.json()
        except ValueError:
            raise AdminBadRequest("body is not valid JSON") from None
        if not isinstance(body, dict):
            raise AdminBadRequest("body must be a JSON object")
        return {k: _text(v) for k, v in body.items() if v is not None}
    form = await request.post()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


async def handle_reload(request: web.Request) -> web.Response:
    state = _admin(request)
    parent = multiprocessing.parent_process()
    if state.config.server.workers > 1 and parent is not None and parent.pid is not None:
        # A worker under `server.workers`: the request reached one worker of N. Check the
        # file here, then let the supervisor pass SIGHUP to every worker, this one included.
        try:
            load_config(state.config.source)
        except ConfigError as exc:
            return web.json_response({"ok": False, "message": str(exc)}, status=400)
        os.kill(parent.pid, signal.SIGHUP)
        return web.json_response(
            {
                "ok": True,
                "message": f"{state.config.source} is valid; reload signalled to all "
                f"{state.config.server.workers} workers",
            }
        )
    ok, message = reload_config(request.app)
    return web.json_response({"ok": ok, "message": message}, status=200 if ok else 400)


# -- team keys (gateway.core.keys) ------------------------------------------------------------
async def handle_keys(request: web.Request) -> web.Response:
    state = _admin(request)
    team = request.query.get("team")
    await _flush_key_uses(state)
    keys = [k for k in await state.store.list_keys() if team in (None, k.team)]
    now = state.ledger.clock()
    return web.json_response(
        {
            "keys": [key_dict(k, now) for k in keys],
            "config_keys": config_key_counts(state.config, team),
        },
        headers=NO_STORE,
    )


async def _flush_key_uses(state: GatewayState) -> None:
    with contextlib.suppress(StoreUnavailable):  # the list is read from the store next
        await state.keyring.flush()


def _age_field(fields: Mapping[str, str], name: str, default: str | None = None) -> float | None:
    text = fields.get(name, "").strip() or default
    if text is None:
        return None
    try:
        return parse_age(text)
    except ValueError as exc:
        raise AdminBadRequest(f"{name}: {exc}") from None


async def handle_key_new(request: web.Request) -> web.Response:
    state = _admin(request)
    fields = await _fields(request)
    team = fields.get("team", "").strip()
    if not team:
        raise AdminBadRequest("team is required")
    lifetime = _age_field(fields, "expires")
    try:
        plaintext, key = await create_key(
            state.store,
            state.config,
            team,
            now=state.ledger.clock(),
            label=fields.get("label", ""),
            lifetime_s=lifetime,
        )
    except KeyProblem as exc:
        raise AdminBadRequest(str(exc)) from None
    await state.keyring.refresh(force=True)  # this process at once, the others within 1 s
    log.info("admin: key %s issued for team %s", key.id, key.team)
    body = {"key": plaintext, **key_dict(key, state.ledger.clock())}
    return web.json_response(body, status=201, headers=NO_STORE)


async def handle_key_revoke(request: web.Request) -> web.Response:
    state = _admin(request)
    try:
        key = await revoke_key(state.store, request.match_info["key_id"], now=state.ledger.clock())
    except UnknownKey as exc:
        raise AdminNotFound(str(exc)) from None
    await state.keyring.refresh(force=True)
    log.info("admin: key %s of team %s revoked", key.id, key.team)
    return web.json_response(key_dict(key, state.ledger.clock()), headers=NO_STORE)


async def handle_key_rotate(request: web.Request) -> web.Response:
    state = _admin(request)
    fields = await _fields(request)
    grace = _age_field(fields, "grace", DEFAULT_GRACE)
    assert grace is not None
    lifetime = _age_field(fields, "expires")
    key_id = request.match_info["key_id"]
    try:
        plaintext, new, old = await rotate_key(
            state.store,
            state.config,
            key_id,
            now=state.ledger.clock(),
            grace_s=grace,
            lifetime_s=lifetime,
        )
    except UnknownKey as exc:
        raise AdminNotFound(str(exc)) from None
    except KeyProblem as exc:
        raise AdminBadRequest(str(exc)) from None
    await state.keyring.refresh(force=True)
    log.info("admin: key %s of team %s rotated to %s", old.id, old.team, new.id)
    now = state.ledger.clock()
    body = {"key": plaintext, **key_dict(new, now), "old": key_dict(old, now)}
    return web.json_response(body, status=201, headers=NO_STORE)


# -- status page ------------------------------------------------------------------------------
async def handle_status_json(request: web.Request) -> web.Response:
    denied = _status_denied(request)
    if denied is not None:
        return denied
    return web.json_response(await _status(request.app[STATE]))


async def handle_status(request: web.Request) -> web.Response:
    denied = _status_denied(request)
    if denied is not None:
        return denied
    page = render_status(await _status(request.app[STATE]))
    return web.Response(
        text=page, content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-store"}
    )


def _status_denied(request: web.Request) -> web.Response | None:
    """Open only with ``public_status``; otherwise the admin or the viewer token, as Bearer or
    as the password of HTTP Basic (two challenges, so a browser offers a login)."""
    admin = request.app[STATE].config.admin
    if admin.public_status:
        return None
    if not admin.token and not admin.status_token:
        raise StatusOff()
    given = request.headers.get("Authorization")
    if any(token_matches(given, t, basic=True) for t in (admin.token, admin.status_token)):
        return None
    headers = CIMultiDict(
        [("WWW-Authenticate", "Bearer"), ("WWW-Authenticate", 'Basic realm="gateway status"')]
    )
    return web.Response(
        body=error_envelope(401, AdminUnauthorized.message),
        status=401,
        content_type="application/json",
        headers=headers,
    )


REFUSALS = ("402", "429")  # quota used up, rate limit: what a team notices as "refused"


async def _status(state: GatewayState) -> dict[str, Any]:
    report = await _usage(state, "current")
    entries, size = await state.store.totals()
    now = state.ledger.clock()
    resets = period_resets_at(report.quota_period, now)
    refused = _refusals(state)
    return {
        "generated_at": iso_utc(time.time()),
        "period": report.period.key,
        "quota_period": report.quota_period,
        "quota_resets_at": iso_utc(resets) if resets is not None else None,
        "quota_resets_in_s": round(resets - now) if resets is not None else None,
        "teams": [
            {
                **t.as_dict(),
                "hit_ratio": t.hit_ratio,
                "refused_since_start": refused.get(t.team, dict.fromkeys(REFUSALS, 0)),
                "spend": report.spend(t),
                "savings": report.savings(t),
            }
            for t in report.teams
        ],
        "total": {
            **report.total.as_dict(),
            "hit_ratio": report.total.hit_ratio,
            "spend": report.spend(report.total),
            "savings": report.savings(report.total),
        },
        "currency": report.pricing.currency,
        "price_per_call": report.pricing.per_call,
        "cache": {"entries": entries, "size_bytes": size, "size": human_bytes(size)},
        "upstream": await _upstream_health(state),
    }


def _refusals(state: GatewayState) -> dict[str, dict[str, int]]:
    """Per team, its requests answered 402 and 429, every worker's, since the gateway started
    (gateway_requests_total: the counters are per process, not in the store)."""
    out: dict[str, dict[str, int]] = {}
    for family in state.metrics.whole().collect():
        for sample in family.samples:
            if sample.name != "gateway_requests_total":
                continue
            status = sample.labels.get("status", "")
            if status in REFUSALS and sample.value:
                team = out.setdefault(sample.labels["team"], dict.fromkeys(REFUSALS, 0))
                team[status] += int(sample.value)
    return out


async def _upstream_health(state: GatewayState) -> dict[str, Any]:
    # The store's copy is shared by every process on it; this process's gauge is the fallback.
    stored = await state.store.get_meta("upstream_quota")
    quota: int | None = int(stored) if stored is not None and stored.isdigit() else None
    if quota is None:
        gauge = state.metrics.registry.get_sample_value("gateway_upstream_quota_remaining")
        quota = int(gauge) if gauge is not None and not math.isnan(gauge) else None
    calls: dict[str, int] = {}
    for family in state.metrics.whole().collect():  # every worker's calls, not just ours
        for sample in family.samples:
            if sample.name == "gateway_upstream_requests_total" and sample.value:
                status = sample.labels["status"]
                calls[status] = calls.get(status, 0) + int(sample.value)
    failed = sum(n for status, n in calls.items() if status != "200")
    return {
        "account_quota_remaining": quota,
        "calls_since_start": calls,
        "failed_since_start": failed,
    }


__all__ = ["add_admin_routes", "render_status", "token_matches"]
