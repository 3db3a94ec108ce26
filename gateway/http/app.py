"""Wiring: ``create_app(config)`` builds the aiohttp application and its lifecycle.

Resources are opened in ``cleanup_ctx`` generators, so cleanup runs iff startup finished.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gateway.config import Config, LiveConfig
from gateway.core.errors import GatewayError, ServerError, Unavailable, error_envelope
from gateway.core.quota import Clock, QuotaLedger
from gateway.core.ratelimit import RateLimiter
from gateway.core.service import RecognitionService
from gateway.http.admin import add_admin_routes
from gateway.http.api import REQUEST_ID, handle_api, request_id, respond
from gateway.http.cors import cors_middleware
from gateway.http.housekeeping import NOTIFIER, housekeeping_ctx
from gateway.http.notify import Notifier
from gateway.http.response import EnvelopeResponse, name_the_server
from gateway.http.state import STATE, GatewayState
from gateway.http.team_status import handle_team
from gateway.obs.metrics import Metrics
from gateway.obs.scrape import MetricsPage
from gateway.store import StoreUnavailable, open_store
from gateway.store.base import Store
from gateway.upstream import UpstreamClient

log = logging.getLogger("gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
METRICS_PAGE: web.AppKey[MetricsPage] = web.AppKey("metrics_page", MetricsPage)


@web.middleware
async def envelope_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every gateway error as the upstream envelope; hide internals of the rest.
    Every answer carries the request's ``X-Request-Id`` (the client's, or a new one)."""
    rid = request[REQUEST_ID] = request_id(request.headers.get("X-Request-Id"))
    try:
        response = await handler(request)
    except GatewayError as exc:
        return _error_response(exc, request, rid)
    except StoreUnavailable as exc:
        log.error("store unavailable, refusing to forward: %s", exc)
        return _error_response(Unavailable("Gateway store unavailable"), request, rid)
    except web.HTTPException as exc:
        if exc.status >= 400 and request.path.startswith("/admin/"):
            # The admin API answers in the envelope too (e.g. 405 for a GET purge).
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
            return _error_response(_HTTPError(exc.status, exc.reason, allow), request, rid)
        exc.headers["X-Request-Id"] = rid  # aiohttp's own 404 and 405
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception(
            "unexpected error answering %s %s (request id %s)", request.method, request.path, rid
        )
        return _error_response(ServerError(), request, rid)
    if not isinstance(response, EnvelopeResponse):  # the API's answers carry it already
        response.headers["X-Request-Id"] = rid
    return response


class _HTTPError(GatewayError):
    def __init__(self, status: int, reason: str, headers: dict[str, str]) -> None:
        self.status = status
        super().__init__(reason, headers=headers)


def _error_response(exc: GatewayError, request: web.Request, rid: str) -> web.StreamResponse:
    headers = {**exc.headers, "X-Request-Id": rid}
    return respond(request, error_envelope(exc.status, exc.message), exc.status, headers)


def create_app(
    config: Config,
    *,
    registry: CollectorRegistry | None = None,
    store: Store | None = None,
    clock: Clock = time.time,
    spool_dir: str | None = None,
) -> web.Application:
    metrics = Metrics(registry)
    metrics.preinitialize(config)
    store = (
        store
        if store is not None
        else open_store(config.storage, max_inflight=config.server.max_inflight)
    )
    current = LiveConfig(config)  # the one object a reload replaces the config in
    ledger = QuotaLedger(store, current, clock=clock)
    upstream = UpstreamClient(config.upstream, metrics)
    service = RecognitionService(current, store, ledger, upstream, metrics)
    state = GatewayState(
        live=current,
        store=store,
        metrics=metrics,
        ledger=ledger,
        upstream=upstream,
        service=service,
        spool_dir=spool_dir,
        limiter=RateLimiter.for_process(store),
    )

    middlewares: list[Middleware] = [envelope_errors]
    if config.server.cors_origins:
        middlewares.insert(0, cors_middleware(config.server.cors_origins))
    app = web.Application(
        middlewares=middlewares,
        handler_args={
            "max_field_size": 16384,  # one header line
            "max_headers": 100,
            "keepalive_timeout": config.server.keepalive_timeout_s,
        },
    )
    app[STATE] = state
    app[METRICS_PAGE] = _metrics_page(state)
    app[NOTIFIER] = Notifier(lambda: state.config, store, clock=clock)
    metrics.track_inflight(lambda: state.inflight)
    app.on_response_prepare.append(name_the_server)
    app.on_shutdown.append(_start_draining)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_keys_ctx)
    app.cleanup_ctx.append(housekeeping_ctx)  # the background loop (gateway.http.housekeeping)
    app.router.add_route("*", "/api/v2/", handle_api)
    app.router.add_route("*", "/api/v2", handle_api)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/team", handle_team)  # a team's own figures (gateway.http.team_status)
    add_admin_routes(app)
    return app


async def _start_draining(app: web.Application) -> None:
    # aiohttp has stopped listening; in-flight requests now get drain_timeout_s to finish.
    app[STATE].draining = True  # gateway.ops.server says so in the log, if it was listening


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    await state.store.open()
    yield
    await state.store.close()
    state.limiter.close()


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    await state.upstream.start()
    yield
    await state.upstream.close()


async def _keys_ctx(app: web.Application) -> AsyncIterator[None]:
    """Store-issued team keys (gateway.core.keys): read before the first request, re-read every
    second; closed after the last request, with its uses written."""
    keyring = app[STATE].keyring
    await keyring.start()
    yield
    await keyring.close()


async def handle_healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def handle_readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    problems = []
    if state.draining:
        problems.append("draining")
    try:
        await state.store.ping()
    except StoreUnavailable:
        problems.append("store unreachable")
    if not state.config.upstream.api_key:
        problems.append("upstream key not configured")
    if problems:
        return web.json_response(
            {"status": "unavailable", "problems": problems},
            status=503,
            headers={"Retry-After": "1"},
        )
    return web.json_response({"status": "ready"})


async def handle_metrics(request: web.Request) -> web.Response:
    body = await request.app[METRICS_PAGE].body()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _metrics_page(state: GatewayState) -> MetricsPage:
    async def prepare() -> Callable[[], bytes]:
        await refresh_store_gauges(state)
        registry = state.metrics.whole()  # folds, on the loop: what this turn counted
        teams = state.metrics.team_gauges.render()
        return lambda: generate_latest(registry) + teams()

    return MetricsPage(prepare)


async def refresh_store_gauges(state: GatewayState) -> None:
    """Gauges that live in the store are read when scraped: right across restarts and
    across processes sharing the store."""
    m = state.metrics
    # Ledger and cache apart: a damaged cache must not freeze the spend gauges.
    try:
        usage = {u.team: u.charged for u in await state.store.usage(state.ledger.period())}
    except StoreUnavailable as exc:
        log.warning("metrics: quota ledger unreadable: %s", exc)
    else:
        m.team_gauges.set_used(usage)
    try:
        entries, size = await state.store.totals()
    except StoreUnavailable as exc:
        log.warning("metrics: cache unreadable: %s", exc)
    else:
        m.cache_entries.set(entries)
        m.cache_size.set(size)
