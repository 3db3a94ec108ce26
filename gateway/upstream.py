"""The one client of the upstream API: one session, a timeout, a cap on concurrent calls.

It speaks the seed document's protocol and turns every way the upstream can fail into the
gateway's envelope errors: timeout -> 504, unreachable or not an envelope -> 502, account
exhausted -> 402, the gateway's own credentials refused -> 502 naming no secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.breaker import CircuitBreaker
from gateway.config import UpstreamConfig
from gateway.errors import BadGateway, GatewayError, GatewayTimeout, QuotaReached, Unavailable
from gateway.form import UploadedFile
from gateway.metrics import Metrics

log = logging.getLogger("gateway.upstream")

# Upstream errors caused by the client's image or parameters are relayed as they are; the
# gateway validated the request, so these are rare (e.g. a PNG with a valid signature but a
# broken body). Errors about the request itself or the key are the gateway's fault.
RELAYED = {
    412: "Invalid file",
    413: "Image size too large",
    415: "Invalid file format",
    420: "Invalid type",
    430: None,
}


class UpstreamError(GatewayError):
    """An envelope error answered by the upstream and relayed as is."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Recognition:
    data: dict[str, Any]
    account_quota: int | None


class UpstreamClient:
    def __init__(self, config: UpstreamConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._queued = 0
        self.breaker = CircuitBreaker(
            config.breaker_failures,
            config.breaker_cooldown_s,
            on_change=metrics.upstream_breaker_state.set,
        )

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.config.max_concurrency),
            raise_for_status=False,
            skip_auto_headers=("User-Agent",),
            headers={"User-Agent": "imagerecognize-gateway"},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def recognize(
        self, type_: str, params: Mapping[str, int], file: UploadedFile
    ) -> Recognition:
        if self._session is None:
            raise BadGateway("Upstream client not started")
        if self._queued >= self.config.max_queue:
            # Shed load rather than hold unbounded waiters (and their uploads) in memory.
            raise Unavailable(
                "Gateway overloaded: upstream queue full", headers={"Retry-After": "1"}
            )
        self._queued += 1
        try:
            await self._slots.acquire()
        finally:
            self._queued -= 1
        try:
            self.breaker.before_call()
            return await self._call(type_, params, file)
        finally:
            self._slots.release()

    async def _call(self, type_: str, params: Mapping[str, int], file: UploadedFile) -> Recognition:
        """One upstream call: one or more attempts, each counted in
        ``gateway_upstream_requests_total`` with its own outcome (a retried attempt was a
        request the upstream saw, or at least one the gateway made)."""
        assert self._session is not None
        deadline = time.monotonic() + self.config.timeout_s
        started = time.perf_counter()
        counted = self.metrics.upstream_requests
        try:
            for attempt in range(self.config.retries + 1):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                with _form(self.config, type_, params, file) as (form, headers):
                    try:
                        async with self._session.post(
                            self.config.url,
                            data=form,
                            headers=headers,
                            timeout=aiohttp.ClientTimeout(total=left),
                        ) as response:
                            raw = await response.read()
                            http_status = response.status
                    except aiohttp.ClientConnectorError as exc:
                        # The connection never opened: nothing was sent, nothing billed.
                        counted.labels(type_, "error").inc()
                        if attempt < self.config.retries:
                            await _backoff(attempt, deadline)
                            continue
                        log.warning("upstream unreachable: %s", type(exc).__name__)
                        raise BadGateway() from None
                envelope = _parse_envelope(raw)
                if envelope is not None:
                    label = str(envelope["status"])
                else:  # an HTTP error page keeps its status; anything else is garbage
                    label = str(http_status) if http_status >= 400 else "error"
                counted.labels(type_, label).inc()
                if envelope is None and http_status == 503 and attempt < self.config.retries:
                    # Refused before processing (not the API's envelope): safe to try again.
                    await _backoff(attempt, deadline)
                    continue
                break
            result = self._interpret(envelope, http_status)
        except TimeoutError:
            counted.labels(type_, "timeout").inc()
            self.breaker.failure()
            raise GatewayTimeout() from None
        except aiohttp.ClientError as exc:
            # Sent, maybe billed: never retried blindly.
            counted.labels(type_, "error").inc()
            log.warning("upstream connection failed: %s", type(exc).__name__)
            self.breaker.failure()
            raise BadGateway() from None
        except BadGateway:
            self.breaker.failure()
            raise
        except GatewayError:
            self.breaker.success()  # the upstream is up and answering the API
            raise
        else:
            self.breaker.success()
            return result
        finally:
            self.metrics.upstream_duration.labels(type_).observe(time.perf_counter() - started)

    def _interpret(self, envelope: dict[str, Any] | None, http_status: int) -> Recognition:
        if envelope is None:
            log.warning("upstream answered HTTP %s with no envelope", http_status)
            raise BadGateway("Upstream answered something that is not the API envelope")
        status = envelope["status"]
        if status == 200:
            data = envelope.get("data")
            if not isinstance(data, dict):
                raise BadGateway("Upstream answered something that is not the API envelope")
            quota = data.get("quota")
            valid = isinstance(quota, int) and not isinstance(quota, bool)
            account_quota = quota if valid else None
            if account_quota is not None:
                self.metrics.upstream_quota_remaining.set(account_quota)
            return Recognition(data=data, account_quota=account_quota)
        if status == 402:
            log.error("upstream account quota exhausted (upstream answered 402)")
            self.metrics.upstream_quota_remaining.set(0)
            raise QuotaReached()
        if status in RELAYED:
            message = envelope.get("status_message")
            if not isinstance(message, str):
                message = RELAYED[status] or "Invalid parameter"
            raise UpstreamError(status, message)
        if status in (400, 401):
            log.error(
                "upstream refused the gateway's API key (upstream status %s): "
                "check the variable named by upstream.api_key_env",
                status,
            )
            raise BadGateway("Upstream refused the gateway's credentials")
        log.warning("upstream answered envelope status %s", status)
        raise BadGateway(f"Upstream answered status {status}")


_MEDIA_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+")


def _multipart_bytes(
    fields: list[tuple[str, str]], filename: str, content_type: str, data: bytes
) -> tuple[bytes, dict[str, str]]:
    """The whole multipart body as one bytes object: one socket write, and none of
    aiohttp.FormData's per-part machinery (~0.5 ms a request for a 10 KB upload)."""
    while True:  # 128 random bits; checked anyway, a boundary must not occur in the content
        boundary = secrets.token_hex(16)
        if boundary.encode() not in data:
            break
    quoted = (
        filename.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
    )
    if not _MEDIA_TYPE.fullmatch(content_type):
        content_type = "application/octet-stream"
    head = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields
    )
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{quoted}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    )
    body = b"".join((head.encode(), data, f"\r\n--{boundary}--\r\n".encode()))
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@contextlib.contextmanager
def _form(
    config: UpstreamConfig, type_: str, params: Mapping[str, int], file: UploadedFile
) -> Iterator[tuple[bytes | aiohttp.FormData, dict[str, str] | None]]:
    """A fresh multipart body per attempt (aiohttp sends a FormData once)."""
    fields = [("apikey", config.api_key.reveal()), ("type", type_)]
    fields += [(name, str(value)) for name, value in params.items()]
    filename = file.filename or ("image.png" if file.head.startswith(b"\x89PNG") else "image.jpg")
    content_type = file.content_type or "application/octet-stream"
    if file.path is None:
        # bytes(), not the memoryview: `in` on a memoryview compares element by element
        data = bytes(file.data) if file.data is not None else b""
        yield _multipart_bytes(fields, filename, content_type, data)
        return
    form = aiohttp.FormData(quote_fields=False)
    for name, value in fields:
        form.add_field(name, value)
    with open(file.path, "rb") as handle:  # streamed from the spool file, never held whole
        form.add_field("file", handle, filename=filename, content_type=content_type)
        yield form, None


async def _backoff(attempt: int, deadline: float) -> None:
    delay = min(0.05 * 2**attempt * (0.5 + random.random()), max(deadline - time.monotonic(), 0))
    await asyncio.sleep(delay)


def _parse_envelope(raw: bytes) -> dict[str, Any] | None:
    try:
        envelope = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(envelope, dict):
        return None
    status = envelope.get("status")
    if not isinstance(status, int) or isinstance(status, bool) or "data" not in envelope:
        return None
    return envelope
