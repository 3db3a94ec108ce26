"""The one client of the upstream API: one session, a timeout, a cap on concurrent calls.

It speaks the seed document's protocol and turns every way the upstream can fail into the
gateway's envelope errors: timeout -> 504, unreachable or not an envelope -> 502, account
exhausted -> 402, the gateway's own credentials refused -> 502 naming no secret.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.config import UpstreamConfig
from gateway.errors import BadGateway, GatewayError, GatewayTimeout, QuotaReached
from gateway.form import UploadedFile
from gateway.metrics import Metrics

log = logging.getLogger("gateway.upstream")

# Upstream errors caused by the client's image or parameters are relayed as they are; the
# gateway validated the request, so these are rare (e.g. a PNG with a valid signature but a
# broken body). Errors about the request itself or the key are the gateway's fault.
RELAYED = {412: "Invalid file", 413: "Image size too large", 415: "Invalid file format",
           420: "Invalid type", 430: None}


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

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.config.max_concurrency,
                                           enable_cleanup_closed=True),
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            raise_for_status=False,
            skip_auto_headers=("User-Agent",),
            headers={"User-Agent": "imagerecognize-gateway"},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def recognize(self, type_: str, params: Mapping[str, int],
                        file: UploadedFile) -> Recognition:
        if self._session is None:
            raise BadGateway("Upstream client not started")
        form = aiohttp.FormData(quote_fields=False)
        form.add_field("apikey", self.config.api_key.reveal())
        form.add_field("type", type_)
        for name, value in params.items():
            form.add_field(name, str(value))
        filename = file.filename or ("image.png" if file.head.startswith(b"\x89PNG") else "image.jpg")
        if file.data is not None:
            form.add_field("file", bytes(file.data), filename=filename,
                           content_type=file.content_type or "application/octet-stream")
        async with self._slots:
            started = time.perf_counter()
            status_label = "error"
            handle = open(file.path, "rb") if file.path is not None else None  # noqa: SIM115
            try:
                if handle is not None:
                    form.add_field("file", handle, filename=filename,
                                   content_type=file.content_type or "application/octet-stream")
                async with self._session.post(self.config.url, data=form) as response:
                    raw = await response.read()
                    http_status = response.status
                envelope = _parse_envelope(raw)
                status_label = str(envelope["status"]) if envelope else str(http_status)
                return self._interpret(envelope, http_status)
            except TimeoutError:
                status_label = "timeout"
                raise GatewayTimeout() from None
            except aiohttp.ClientError as exc:
                log.warning("upstream unreachable: %s", type(exc).__name__)
                raise BadGateway() from None
            finally:
                if handle is not None:
                    handle.close()
                self.metrics.upstream_requests.labels(type_, status_label).inc()
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
            account_quota = quota if isinstance(quota, int) and not isinstance(quota, bool) else None
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
            log.error("upstream refused the gateway's API key (upstream status %s): "
                      "check the variable named by upstream.api_key_env", status)
            raise BadGateway("Upstream refused the gateway's credentials")
        log.warning("upstream answered envelope status %s", status)
        raise BadGateway(f"Upstream answered status {status}")


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
