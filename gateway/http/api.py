"""The ``/api/v2/`` handler: parse -> validate -> authorize -> recognise -> answer.

Validation follows the upstream's order and answers every bad input locally with the
upstream's own envelope, before any upstream call and without charging quota.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time

from aiohttp import StreamReader, web

from gateway.config import ServerConfig, TeamConfig
from gateway.core.cache_key import TYPE_PARAMS, analysis_params
from gateway.core.envelope import HEADERS, content_type_for
from gateway.core.errors import (
    GatewayError,
    InvalidFile,
    InvalidFormat,
    InvalidParameter,
    InvalidType,
    KeyInvalid,
    KeyMissing,
    NoData,
    RequestTimeout,
    Unavailable,
)
from gateway.core.service import Answer, Call, Directives, NotCached
from gateway.http.deadlines import Deadlines
from gateway.http.form import Form, parse_query, read_form
from gateway.http.response import envelope_answer
from gateway.http.state import STATE, GatewayState
from gateway.obs.logs import log_access
from gateway.store.base import StoreUnavailable
from gateway.upload import UploadedFile

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_IHDR = b"\x00\x00\x00\x0dIHDR"
HASH_RE = re.compile(r"[0-9a-f]{32}")
TYPES = (*TYPE_PARAMS, "cache")
MAX_REMEMBERED_KEYS = 10_000
MAX_REQUEST_ID = 128
# Where the error middleware leaves the request's id for the handler (web.RequestKey since
# aiohttp 3.12; a plain key before, which those versions take without a warning).
REQUEST_ID: web.RequestKey[str] = (
    web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "request_id"  # type: ignore[assignment]
)


def request_id(sent: str | None) -> str:
    """The client's ``X-Request-Id`` when it is printable ASCII of at most 128 characters,
    else a new one: a uuid4 in hex, as uuid.uuid4().hex makes it (~1 us here, ~3.5 there)."""
    if sent and len(sent) <= MAX_REQUEST_ID and sent.isascii() and sent.isprintable():
        return sent
    b = bytearray(os.urandom(16))
    b[6] = b[6] & 0x0F | 0x40  # version 4
    b[8] = b[8] & 0x3F | 0x80  # the RFC 4122 variant
    return b.hex()


CACHE_NAME = "imagerecognize-gateway"  # this cache's name in Cache-Status (RFC 9211)
STALE_WARNING = f'110 {CACHE_NAME} "Response is Stale"'  # RFC 7234, on a stale-if-error answer
_NO_DIRECTIVES = Directives()


def parse_cache_control(header: str | None) -> Directives:
    """The request Cache-Control directives the gateway honours (RFC 9111)."""
    if not header:
        return _NO_DIRECTIVES
    names = {part.split("=", 1)[0].strip().lower() for part in header.split(",")}
    return Directives(
        no_cache="no-cache" in names or "max-age=0" in header.replace(" ", ""),
        no_store="no-store" in names,
        only_if_cached="only-if-cached" in names,
    )


def cache_status(answer: Answer) -> str:
    """The Cache-Status header (RFC 9211) that says how ``answer`` was served."""
    if answer.fwd is not None:
        return f"{CACHE_NAME}; fwd={answer.fwd}" + ("; stored" if answer.stored else "")
    if answer.outcome in ("derived", "coalesced"):
        return f"{CACHE_NAME}; hit; detail={answer.outcome}"
    return f"{CACHE_NAME}; hit; ttl={answer.ttl}" + (
        "; detail=stale-if-error" if answer.stale else "")


async def handle_api(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    started = time.perf_counter()
    rid = request[REQUEST_ID]
    team_label, type_label, outcome, status = "unknown", "invalid", "none", 500
    server = state.config.server
    if state.draining or state.receiving >= server.max_receiving:
        state.metrics.count_request(team_label, type_label, 503, outcome, 0.0)
        raise Unavailable(
            "Gateway draining" if state.draining else "Gateway overloaded",
            headers={"Retry-After": "1"},  # another replica, or this one a moment later
        )
    # The body first: max_inflight counts requests whose body is in, so clients that
    # declare a body and trickle it hold a socket (bounded by max_receiving, the idle
    # timeout and the minimum rate) but never a slot that a team's request needs.
    state.receiving += 1
    try:
        form = await _read(request, state)
    except GatewayError as exc:
        state.metrics.count_request(team_label, type_label, exc.status, outcome, 0.0)
        raise
    finally:
        state.receiving -= 1
    if state.inflight >= server.max_inflight:
        form.close()
        state.metrics.count_request(team_label, type_label, 503, outcome, 0.0)
        raise Unavailable("Gateway overloaded", headers={"Retry-After": "1"})
    state.inflight += 1
    state.metrics.inflight_changed()
    answer: Answer | None = None
    try:
        if request.method == "GET" and form.fields.get("type") != "cache":
            raise NoData()  # upstream: GET only with type=cache, checked before the key
        team = _authorize(form, state)
        team_label = team.name
        type_ = _type(form, team)
        type_label = type_
        limits = await state.limiter.check(team)
        if type_ == "cache":
            body = await _cache_lookup(form, team, state)
            status = 200
            return respond(request, body, 200, {**limits, "X-Request-Id": rid})
        file = _image(form)
        params = analysis_params(type_, form.fields)
        directives = parse_cache_control(request.headers.get("Cache-Control"))
        answer = await state.service.recognize(Call(team, type_, params, file, directives))
        outcome, status = answer.outcome, 200
        headers = {
            "Cache-Status": cache_status(answer),
            "X-Content-Hash": answer.content_hash,
            "X-Request-Id": rid,
            **limits,
        }
        if answer.stale:
            headers["Warning"] = STALE_WARNING
        return respond(request, answer.body, 200, headers)
    except GatewayError as exc:
        status = exc.status
        if isinstance(exc, NotCached):
            outcome = exc.outcome  # not the upstream's 5xx: the 5xx alert leaves it out
        raise
    except StoreUnavailable:
        status = 503  # the middleware answers it so: spend fails closed
        raise
    finally:
        form.close()
        state.inflight -= 1  # the gauge follows at the fold count_request schedules
        elapsed = time.perf_counter() - started
        state.metrics.count_request(team_label, type_label, status, outcome, elapsed)
        if server.access_log:  # the config this request started on, read once
            upload = form.file
            log_access(
                {
                    "team": team_label,
                    "type": type_label,
                    "status": status,
                    "cache": outcome,
                    "hash": upload.content_hash[:12] if upload is not None else None,
                    "bytes": upload.size if upload is not None else 0,
                    "gateway_ms": round(elapsed * 1000, 2),
                    "upstream_ms": round(answer.upstream_ms, 2)
                    if answer is not None and answer.upstream_ms is not None
                    else None,
                    "request_id": rid,
                    "client": request.remote,
                    "method": request.method,
                    "path": request.path,
                }
            )


async def _read(request: web.Request, state: GatewayState) -> Form:
    if request.method == "GET":
        return Form(fields=parse_query(request.rel_url.raw_query_string), file=None)
    if request.method != "POST":
        raise NoData()
    if request.content.is_eof():  # the whole body is already here: no deadline to set
        return await read_form(
            request.headers.get("Content-Type"),
            request.content_length,
            request.content,
            spool_dir=state.spool_dir,
            memory=state.upload_memory,
        )
    server = state.config.server
    body = _PacedBody(request.content, state.deadlines, server)
    reading = read_form(
        request.headers.get("Content-Type"),
        request.content_length,
        body,
        spool_dir=state.spool_dir,
        memory=state.upload_memory,
    )
    try:
        # A client trickling its body must not hold a socket (and a spool file) for ever.
        return await state.deadlines.within(reading, body.next_due() - body.start)
    except TimeoutError:
        raise RequestTimeout() from None


class _PacedBody:
    """The request body, with a deadline that follows its progress: ``body_timeout_s`` in
    all, at most ``body_idle_timeout_s`` between two chunks, and once 5 s old at least
    ``body_min_rate`` bytes a second on average."""

    GRACE_S = 5.0

    def __init__(self, stream: StreamReader, deadlines: Deadlines, server: ServerConfig):
        self.stream = stream
        self.deadlines = deadlines
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time()
        self.hard = self.start + server.body_timeout_s
        self.idle_s = server.body_idle_timeout_s
        self.min_rate = server.body_min_rate
        self.received = 0

    def next_due(self) -> float:
        return min(self.hard, self.loop.time() + self.idle_s)

    async def readany(self) -> bytes:
        chunk: bytes = await self.stream.readany()
        self.received += len(chunk)
        now = self.loop.time()
        elapsed = now - self.start
        if elapsed > self.GRACE_S and self.received < self.min_rate * elapsed:
            self.deadlines.move(now)  # too slow: the sweeper ends it as a timeout (408)
        else:
            self.deadlines.move(min(self.hard, now + self.idle_s))
        return chunk


def _authorize(form: Form, state: GatewayState) -> TeamConfig:
    if not form.fields and form.file is None:
        raise NoData()
    key = form.fields.get("apikey", "")
    if not key:
        raise KeyMissing()
    team = state.teams_by_key.get(key)
    if team is None:
        # Looked up by hash: no comparison against stored keys, so no timing oracle.
        key_hash = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
        team = state.teams_by_key_hash.get(key_hash)
        if team is None:
            # A store-issued key: never remembered below, so a revoke reaches it.
            team = state.keyring.team_for(key_hash, state.config)
            if team is None:
                raise KeyInvalid()
            return team
        if len(state.teams_by_key) < MAX_REMEMBERED_KEYS:
            # Keys already presented and accepted skip the sha256 next time; a refused key
            # is never kept, so guesses cost no memory. A reload forgets them all.
            state.teams_by_key[key] = team
    return team


def _type(form: Form, team: TeamConfig) -> str:
    type_ = form.fields.get("type", "")
    if type_ not in TYPES:
        raise InvalidType()
    if team.types is not None and type_ != "cache" and type_ not in team.types:
        raise InvalidType(f"Invalid type: {type_} is not enabled for this team")
    return type_


def _image(form: Form) -> UploadedFile:
    file = form.file
    if file is None or file.size == 0:
        raise InvalidFile()
    head = file.head
    if head.startswith(PNG_MAGIC):
        # As upstream: the signature must be followed by a whole 13-byte IHDR chunk.
        if file.size < 33 or head[8:16] != PNG_IHDR:
            raise InvalidFile()
    elif head.startswith(JPEG_MAGIC):
        if file.size < 4:
            raise InvalidFile()
    else:
        raise InvalidFormat()
    return file


async def _cache_lookup(form: Form, team: TeamConfig, state: GatewayState) -> bytes:
    if "hash" in form.fields:
        content_hash = form.fields["hash"].strip().lower()
        if not HASH_RE.fullmatch(content_hash):
            raise InvalidParameter("hash", "must be the 32 hex digits of X-Content-Hash")
    elif form.file is not None and form.file.size > 0:
        content_hash = form.file.content_hash
    else:
        raise InvalidFile()
    return await state.service.cached_results(team, content_hash)


def respond(
    request: web.Request, body: bytes, status: int, headers: dict[str, str]
) -> web.StreamResponse:
    """An envelope answer, success or error (the error middleware uses it too)."""
    content_type = content_type_for(request.headers)
    if request.method == "HEAD":  # a head without its body: aiohttp's own handling
        return web.Response(
            body=body,
            status=status,
            content_type=content_type,
            charset="utf-8",
            headers={**HEADERS, **headers},
        )
    return envelope_answer(body, status, headers, content_type=content_type)
