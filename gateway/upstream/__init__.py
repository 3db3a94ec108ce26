"""The one client of the upstream API: one session, a timeout, a cap on concurrent calls.
(The package's other module is its circuit breaker, ``gateway.upstream.breaker``.)

It speaks the seed document's protocol and turns every way the upstream can fail into the
gateway's envelope errors: timeout -> 504, unreachable or not an envelope -> 502, account
exhausted -> 402, the gateway's own credentials refused -> 502 naming no secret. The key only
ever goes to ``upstream.url``: redirects are never followed (a 3xx is a 502), and a relayed
upstream message is scrubbed of it. An answer is read up to ``upstream.max_answer_kb`` and
accepted only if it is the API's envelope, re-encodable as it will be served: JSON in UTF-8,
nested at most ``MAX_DEPTH`` deep, with finite numbers and no lone surrogates.

The billing contract: every exception that escapes ``UpstreamClient.recognize()`` carries
``billed: bool``. ``billed`` is False only when the upstream provably did not bill the call:

* nothing was sent: the connection never opened (after retries), the call was refused before
  sending (client not started, queue full, breaker open, ``on_send`` raised, the request could
  not be built), or the deadline ran out between two attempts that were both unbilled;
* the upstream refused before processing: HTTP 503 or 429 without an envelope, a redirect;
* the upstream answered an error envelope (any envelope status but 200; the seed's errors are
  not billed).

Everything else is ``billed = True``: a timeout or dropped connection after sending, an answer
that is not the envelope (HTTP 200 or 5xx garbage, over the size cap, bad JSON, NaN, invalid
Unicode, too deep), a success envelope with bad ``data`` or over a non-2xx HTTP status. A bug
(an unexpected exception) is logged and becomes a 502 billed as far as the call had got.

Long because: the billing contract (which failure was billed) is read in one place, beside
every way a call can fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any, TypeVar
from urllib.parse import quote, quote_plus

import aiohttp

from gateway.config import UpstreamConfig
from gateway.core.errors import BadGateway, GatewayError, GatewayTimeout, QuotaReached, Unavailable
from gateway.obs.metrics import Metrics
from gateway.upload import UploadedFile
from gateway.upstream.breaker import CircuitBreaker

log = logging.getLogger("gateway.upstream")

# Upstream errors caused by the client's image or parameters are relayed (scrubbed, bounded);
# the gateway validated the request, so these are rare (e.g. a PNG with a valid signature but
# a broken body). Errors about the request itself or the key are the gateway's fault.
RELAYED = {
    412: "Invalid file",
    413: "Image size too large",
    415: "Invalid file format",
    420: "Invalid type",
    430: "Invalid parameter",
}
SEED_STATUSES = frozenset({200, 300, 400, 401, 402, 412, 413, 415, 420, 430})
NOT_THE_ENVELOPE = "Upstream answered something that is not the API envelope"
MAX_DEPTH = 256  # the API's answers nest 6 deep; json re-encodes far deeper than this
MAX_MESSAGE = 200  # characters of a relayed upstream message
REDACTED = "[redacted]"
PARTIAL_SECRET = 8  # a run this long of the key's characters is scrubbed too
JOIN_LIMIT = 64 * 1024  # up to this, one bytes object (one write) beats a write per piece
FILE_CHUNK = 256 * 1024
READ_CHUNK = 64 * 1024

_E = TypeVar("_E", bound=BaseException)
OnSend = Callable[[], Awaitable[None]]


def mark_billed(exc: _E, billed: bool) -> _E:
    """Record on ``exc`` whether the upstream may have billed the call it ends."""
    exc.billed = billed  # type: ignore[attr-defined]
    return exc


def was_billed(exc: BaseException) -> bool:
    """The billing verdict of an exception from ``recognize()``; True when unknown."""
    return bool(getattr(exc, "billed", True))


class UpstreamError(GatewayError):
    """An envelope error answered by the upstream and relayed (message scrubbed)."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Recognition:
    data: dict[str, Any]
    account_quota: int | None


class _Progress:
    """How far one ``recognize()`` call got, for exceptions nothing else has classified."""

    __slots__ = ("passthrough", "sent")

    def __init__(self) -> None:
        self.sent = False  # bytes may have reached the upstream in the latest attempt
        self.passthrough: BaseException | None = None  # on_send's own exception


class UpstreamClient:
    def __init__(self, config: UpstreamConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._queued = 0
        self._max_answer = config.max_answer_kb * 1024
        self.breaker = CircuitBreaker(
            config.breaker_failures,
            config.breaker_cooldown_s,
            on_change=metrics.upstream_breaker_state.set,
        )

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.config.max_concurrency),
            raise_for_status=False,
            # The answer is read as sent, so the size cap bounds memory (no inflating bombs).
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
            headers={"User-Agent": "imagerecognize-gateway", "Accept-Encoding": "identity"},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def recognize(
        self,
        type_: str,
        params: Mapping[str, int],
        file: UploadedFile,
        *,
        on_send: OnSend | None = None,
    ) -> Recognition:
        """One recognition. ``on_send``, if given, is awaited once, right before the first
        attempt leaves (a slot held, the breaker passed); if it raises, nothing is sent and
        its exception propagates with ``billed = False``. See the module doc for ``billed``."""
        progress = _Progress()
        try:
            return await self._recognize(type_, params, file, on_send, progress)
        except BaseException as exc:
            if exc is progress.passthrough:
                raise
            if isinstance(exc, GatewayError) or not isinstance(exc, Exception):
                if not hasattr(exc, "billed"):
                    mark_billed(exc, progress.sent)
                raise
            log.exception("upstream call failed unexpectedly (%s)", type(exc).__name__)
            raise mark_billed(BadGateway(), progress.sent) from None

    async def _recognize(
        self,
        type_: str,
        params: Mapping[str, int],
        file: UploadedFile,
        on_send: OnSend | None,
        progress: _Progress,
    ) -> Recognition:
        if self._session is None:
            raise mark_billed(BadGateway("Upstream client not started"), False)
        if self._queued >= self.config.max_queue:
            # Shed load rather than hold unbounded waiters (and their uploads) in memory.
            raise mark_billed(
                Unavailable(
                    "Gateway overloaded: upstream queue full", headers={"Retry-After": "1"}
                ),
                False,
            )
        self._queued += 1
        try:
            await self._slots.acquire()
        finally:
            self._queued -= 1
        try:
            try:
                self.breaker.before_call()
            except Unavailable as exc:
                raise mark_billed(exc, False) from None
            return await self._admitted(type_, params, file, on_send, progress)
        finally:
            self._slots.release()

    async def _admitted(
        self,
        type_: str,
        params: Mapping[str, int],
        file: UploadedFile,
        on_send: OnSend | None,
        progress: _Progress,
    ) -> Recognition:
        """The breaker let this call through: it ends with exactly one verdict, whatever is
        raised, so a probe can never stay taken."""
        if on_send is not None:
            try:
                await on_send()
            except BaseException as exc:
                self.breaker.abandon()  # the upstream was not asked: nothing learnt about it
                progress.passthrough = mark_billed(exc, False)
                raise
        verdict = self.breaker.abandon  # cancelled, or a bug before anything was sent
        try:
            recognition = await self._call(type_, params, file, progress)
        except (BadGateway, GatewayTimeout):
            verdict = self.breaker.failure
            raise
        except GatewayError:
            verdict = self.breaker.success  # the upstream is up and answering the API
            raise
        except Exception:
            if progress.sent:
                verdict = self.breaker.failure
            raise
        else:
            verdict = self.breaker.success
            return recognition
        finally:
            verdict()

    async def _call(
        self, type_: str, params: Mapping[str, int], file: UploadedFile, progress: _Progress
    ) -> Recognition:
        """One upstream call: one or more attempts, each counted in
        ``gateway_upstream_requests_total`` with its own outcome (a retried attempt was a
        request the upstream saw, or at least one the gateway made). Only an attempt that
        provably billed nothing is retried."""
        assert self._session is not None
        deadline = time.monotonic() + self.config.timeout_s
        started = time.perf_counter()
        counted = self.metrics.upstream_requests
        try:
            for attempt in range(self.config.retries + 1):
                left = deadline - time.monotonic()
                if left <= 0:  # only after an unbilled attempt and its backoff
                    counted.labels(type_, "timeout").inc()
                    raise mark_billed(GatewayTimeout(), False)
                async with _request_body(self.config, type_, params, file) as (body, headers):
                    progress.sent = True
                    try:
                        async with self._session.post(
                            self.config.url,
                            data=body,
                            headers=headers,
                            timeout=aiohttp.ClientTimeout(total=left),
                            allow_redirects=False,  # the body holds the key: never re-POSTed
                        ) as response:
                            http_status = response.status
                            redirect = 300 <= http_status < 400
                            raw = (
                                None if redirect else await _read_capped(response, self._max_answer)
                            )
                    except aiohttp.ClientConnectorError as exc:
                        # The connection never opened: nothing was sent, nothing billed.
                        progress.sent = False
                        counted.labels(type_, "error").inc()
                        if attempt < self.config.retries:
                            await _backoff(attempt, deadline)
                            continue
                        log.warning("upstream unreachable: %s", type(exc).__name__)
                        raise mark_billed(BadGateway(), False) from None
                if redirect:
                    counted.labels(type_, "error").inc()
                    log.warning("upstream answered HTTP %s, a redirect: not followed", http_status)
                    raise mark_billed(BadGateway(NOT_THE_ENVELOPE), False)
                if raw is None:
                    counted.labels(type_, "error").inc()
                    log.warning("upstream answer longer than upstream.max_answer_kb: not read")
                    raise mark_billed(BadGateway(NOT_THE_ENVELOPE), True)
                envelope = _parse_envelope(raw)
                if envelope is not None:
                    status = envelope["status"]
                    label = str(status) if status in SEED_STATUSES else "error"
                else:  # an HTTP error page keeps its status; anything else is garbage
                    label = str(http_status) if http_status >= 400 else "error"
                counted.labels(type_, label).inc()
                if envelope is None and http_status == 503 and attempt < self.config.retries:
                    # Refused before processing (not the API's envelope): safe to try again.
                    progress.sent = False
                    await _backoff(attempt, deadline)
                    continue
                return self._interpret(envelope, http_status)
            raise AssertionError("unreachable: the last attempt returns or raises")
        except TimeoutError:
            counted.labels(type_, "timeout").inc()
            raise mark_billed(GatewayTimeout(), True) from None
        except aiohttp.ClientError as exc:
            # Sent, maybe billed: never retried blindly.
            counted.labels(type_, "error").inc()
            log.warning("upstream connection failed: %s", type(exc).__name__)
            raise mark_billed(BadGateway(), True) from None
        finally:
            self.metrics.upstream_duration.labels(type_).observe(time.perf_counter() - started)

    def _interpret(self, envelope: dict[str, Any] | None, http_status: int) -> Recognition:
        if envelope is None:
            log.warning("upstream answered HTTP %s with no envelope", http_status)
            # 503 and 429 pages are refusals before processing; anything else may have billed.
            raise mark_billed(BadGateway(NOT_THE_ENVELOPE), http_status not in (429, 503))
        status = envelope["status"]
        if status == 200:
            data = envelope["data"]
            if not isinstance(data, dict) or not 200 <= http_status < 300:
                # Processed (maybe billed) but not an answer to serve, let alone to store.
                log.warning("upstream answered a success envelope over HTTP %s", http_status)
                raise mark_billed(BadGateway(NOT_THE_ENVELOPE), True)
            quota = data.get("quota")
            valid = isinstance(quota, int) and not isinstance(quota, bool)
            account_quota = quota if valid else None
            if account_quota is not None:
                self.metrics.upstream_quota_remaining.set(account_quota)
            return Recognition(data=data, account_quota=account_quota)
        # Every other status is an error envelope, and the seed's errors are not billed.
        if status == 402:
            log.error("upstream account quota exhausted (upstream answered 402)")
            self.metrics.upstream_quota_remaining.set(0)
            raise mark_billed(QuotaReached(), False)
        if status in RELAYED:
            message = envelope.get("status_message")
            text = self._relayable(message) if isinstance(message, str) else ""
            raise mark_billed(UpstreamError(status, text or RELAYED[status]), False)
        if status in (400, 401):
            log.error(
                "upstream refused the gateway's API key (upstream status %s): "
                "check the variable named by upstream.api_key_env",
                status,
            )
            raise mark_billed(BadGateway("Upstream refused the gateway's credentials"), False)
        shown = status if status in SEED_STATUSES or 0 <= status < 1000 else "out of range"
        log.warning("upstream answered envelope status %s, not one the API defines", shown)
        raise mark_billed(BadGateway(f"Upstream answered status {shown}"), False)

    def _relayable(self, message: str) -> str:
        """An upstream message fit to hand a team: no control or invisible characters, no
        trace of the upstream key (whole, percent-encoded or in part), at most MAX_MESSAGE."""
        return _scrubbed(message, self.config.api_key.reveal())


# Controls and separators end words; zero-width, bidirectional and BOM characters vanish.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff]")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _scrubbed(message: str, secret: str) -> str:
    text = " ".join(_CONTROL.sub(" ", _INVISIBLE.sub("", message)).split())
    if secret:
        needles = [
            n.translate(_ASCII_LOWER) for n in {secret, quote(secret, safe=""), quote_plus(secret)}
        ]
        # Scrubbed a little past what is kept, so that no key is cut in two by the window.
        keep = 4 * MAX_MESSAGE
        window = text[: keep + max(map(len, needles))]
        text = _redact(window, needles, len(window) if window == text else keep)
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 3].rstrip() + "..."
    return text


def _redact(text: str, needles: list[str], stop: int) -> str:
    """``text[:stop]`` with every run of PARTIAL_SECRET or more characters of a needle (in any
    ASCII case) replaced: an echo of the key whole, truncated or upper-cased gives nothing
    away. A run that starts before ``stop`` is followed to its end."""
    folded = text.translate(_ASCII_LOWER)
    out: list[str] = []
    i = 0
    while i < stop:
        run = 0
        for needle in needles:
            end = i
            while end < len(folded) and folded[i : end + 1] in needle:
                end += 1
            if end - i >= min(PARTIAL_SECRET, len(needle)):
                run = max(run, end - i)
        if run:
            out.append(REDACTED)
            i += run
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole answer, or None if it is longer than ``limit`` (then not read further)."""
    length = response.content_length
    if length is not None:  # the parser stops at Content-Length: read() is bounded by it
        return await response.read() if length <= limit else None
    chunks: list[bytes] = []
    size = 0
    while chunk := await response.content.read(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
# What could hide a lone surrogate: a \uD800-\uDFFF escape (paired ones match too).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# What could hide a number that overflows to infinity: with every digit mapped to "0", e/E to
# "e", "+" dropped and anything else a space, an exponent of 3+ digits or a run of 200 digits.
# Below both (exponent <= 99, at most 199 digits before the point) every |x| < 10**298.
_NUMBER_SHAPE = bytearray(b" " * 256)
_NUMBER_SHAPE[ord("0") : ord("9") + 1] = b"0" * 10
_NUMBER_SHAPE[ord("e")] = _NUMBER_SHAPE[ord("E")] = ord("e")
_OVERFLOWS = (b"e000", b"0" * 200)


def _parse_envelope(raw: bytes) -> dict[str, Any] | None:
    try:
        text = raw.decode("utf-8")  # JSON between systems is UTF-8 (RFC 8259 §8.1)
        envelope = _DECODER.decode(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(envelope, dict):
        return None
    status = envelope.get("status")
    if not isinstance(status, int) or isinstance(status, bool) or "data" not in envelope:
        return None
    if _suspect(raw) and not _sound(envelope):
        return None
    return envelope


def _suspect(raw: bytes) -> bool:
    """Cheap and conservative: False only if _sound() would say True (about 5 us for 2 KB,
    an eighth of the parse)."""
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH or _SURROGATE_ESCAPE.search(raw):
        return True
    shape = raw.translate(_NUMBER_SHAPE, b"+")
    return any(pattern in shape for pattern in _OVERFLOWS)


def _sound(value: Any) -> bool:
    """True if ``value`` nests at most MAX_DEPTH deep, has only finite numbers and only
    strings that encode to UTF-8 (no lone surrogates): what serving it again needs."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    return False
        elif isinstance(item, float):
            if not math.isfinite(item):
                return False
        elif isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                return False
            children = itertools.chain(item, item.values()) if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return True


# -- the request body ------------------------------------------------------------------------
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+")
# As browsers write a filename: `"`, CR and LF percent-encoded (and here every other control
# character too), so no client-supplied name can end the header line or the quoted string.
_FILENAME = str.maketrans(
    {"\\": "\\\\", '"': "%22", **{chr(c): f"%{c:02X}" for c in (*range(32), 127)}}
)
Body = bytes | AsyncIterator[bytes | memoryview]


def _frame(
    fields: list[tuple[str, str]], filename: str, content_type: str
) -> tuple[bytes, bytes, str]:
    """The multipart bytes before and after the file's content, and the body's Content-Type.

    A fresh random 128-bit boundary per body: the client cannot plant it in its upload (it is
    drawn after the upload arrived, and a given 32-hex-digit string occurs in n random bytes
    with odds about n / 2**128), so the content is neither scanned for it nor copied."""
    boundary = secrets.token_hex(16)
    if not _MEDIA_TYPE.fullmatch(content_type):
        content_type = "application/octet-stream"
    head = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields
    )
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{filename.translate(_FILENAME)}"\r\nContent-Type: {content_type}\r\n\r\n'
    )
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head.encode("utf-8", "replace"), tail, f"multipart/form-data; boundary={boundary}"


@contextlib.asynccontextmanager
async def _request_body(
    config: UpstreamConfig, type_: str, params: Mapping[str, int], file: UploadedFile
) -> AsyncIterator[tuple[Body, dict[str, str]]]:
    """A fresh multipart body per attempt, built the same way for an upload in memory and one
    spooled to disk; the content itself goes out as it is (a view, or the file in chunks)."""
    fields = [("apikey", config.api_key.reveal()), ("type", type_)]
    fields += [(name, str(value)) for name, value in params.items()]
    filename = file.filename or ("image.png" if file.head.startswith(b"\x89PNG") else "image.jpg")
    head, tail, content_type = _frame(fields, filename, file.content_type or "")
    headers = {"Content-Type": content_type}
    if file.path is None:
        content = memoryview(file.data if file.data is not None else b"")
        if content.nbytes <= JOIN_LIMIT:
            yield b"".join((head, content, tail)), headers
            return
        headers["Content-Length"] = str(len(head) + content.nbytes + len(tail))
        pieces = _pieces(head, content, tail)
        try:
            yield pieces, headers
        finally:
            await pieces.aclose()
        return
    # Streamed from the spool file, never held whole; opened off the loop like every read.
    handle = await asyncio.to_thread(open, file.path, "rb")
    try:
        size = os.fstat(handle.fileno()).st_size
        headers["Content-Length"] = str(len(head) + size + len(tail))
        pieces = _pieces(head, handle, tail)
        try:
            yield pieces, headers
        finally:
            await pieces.aclose()
    finally:
        handle.close()


async def _pieces(
    head: bytes, content: memoryview | IO[bytes], tail: bytes
) -> AsyncGenerator[bytes | memoryview, None]:
    yield head
    if isinstance(content, memoryview):
        yield content
    else:
        while chunk := await asyncio.to_thread(content.read, FILE_CHUNK):
            yield chunk
    yield tail


async def _backoff(attempt: int, deadline: float) -> None:
    delay = min(0.05 * 2**attempt * (0.5 + random.random()), max(deadline - time.monotonic(), 0))
    await asyncio.sleep(delay)
