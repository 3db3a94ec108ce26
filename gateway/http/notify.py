"""Webhook notifications (``[notify]``): a team crossing a share of its quota, this process's
upstream breaker opening or closing, the ledger drifting from the upstream's own count.

Events are found by the background loop (``gateway.http.app``), never on the request path, and
queued (bounded: past ``max_queue`` the newest are dropped and logged); one task POSTs each
to every webhook URL, with retries and backoff. A quota share and a drift are notified once
per period (a day for the drift) across every replica on the store: whoever sets the store's
meta key for it first (``Store.set_meta_if_absent``) sends it. The breaker is each process's
own, so each says so for itself. Webhook URLs may hold a token (Slack's do): logs name only
their host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from gateway.config import Config
from gateway.core.quota import period_key
from gateway.store.base import Store, StoreUnavailable
from gateway.upstream.breaker import CLOSED

log = logging.getLogger("gateway.notify")

MAX_BACKOFF_S = 30.0


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class Notifier:
    def __init__(
        self,
        config: Callable[[], Config],
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        backoff_s: float = 0.5,
    ) -> None:
        self._config = config  # read at each use: a reload changes URLs, shares and bounds
        self.store = store
        self.clock = clock
        self.backoff_s = backoff_s
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(config().notify.max_queue)
        self.dropped = 0
        self.sent = 0
        self.failed = 0
        self._breaker = CLOSED
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self._task = asyncio.create_task(self._run())

    async def close(self, grace_s: float = 2.0) -> None:
        """Send what is queued within ``grace_s``, then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), grace_s)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._session is not None:
            await self._session.close()

    # -- finding events (the background loop) ----------------------------------------------
    def event(self, kind: str, text: str, **fields: Any) -> None:
        if not self._config().notify.enabled:
            return
        payload = {"event": kind, "text": text, "at": _iso(self.clock()), **fields}
        try:
            self.queue.put_nowait(payload)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("notification dropped, %d waiting already: %s", self.queue.qsize(), text)

    def check_breaker(self, state: int) -> None:
        """Every tick: the breaker leaving closed (open, or half-open already when the
        cooldown was shorter than a tick), and coming back to closed. Its open / half-open
        cycles while the upstream stays down are not news."""
        before, self._breaker = self._breaker, state
        if before == CLOSED and state != CLOSED:
            self.event(
                "breaker_open",
                f"gateway {self.replica}: upstream failing, circuit open (cache misses "
                "answered 503)",
                replica=self.replica,
            )
        elif before != CLOSED and state == CLOSED:
            self.event(
                "breaker_closed",
                f"gateway {self.replica}: upstream answering again, circuit closed",
                replica=self.replica,
            )

    async def check_store(self, drift: float | None) -> None:
        """Every few seconds: quota shares crossed, and a drift past its bound. Store errors
        are logged and tried again at the next check."""
        config = self._config()
        if not config.notify.enabled:
            return
        try:
            await self._check_quotas(config)
            if drift is not None and abs(drift) > config.notify.drift_calls:
                await self._check_drift(config, drift)
        except StoreUnavailable as exc:
            log.warning("notifications: store unreadable: %s", exc)

    async def _check_quotas(self, config: Config) -> None:
        period = period_key(config.quota.period, self.clock())
        used = {u.team: u.charged for u in await self.store.usage(period)}
        for team in config.teams:
            charged = used.get(team.name, 0)
            if team.quota <= 0:
                continue
            for share in config.notify.quota_shares:
                if charged < share * team.quota:
                    break
                name = f"notify:quota:{team.name}:{period}:{share:g}"
                if await self.store.set_meta_if_absent(name, _iso(self.clock())):
                    self.event(
                        "quota",
                        f"team {team.name} has used {charged} of its {team.quota} upstream "
                        f"calls ({charged / team.quota:.0%}, past {share:.0%}) in {period}",
                        team=team.name,
                        period=period,
                        share=share,
                        used=charged,
                        quota=team.quota,
                    )

    async def _check_drift(self, config: Config, drift: float) -> None:
        day = period_key("day", self.clock())
        if await self.store.set_meta_if_absent(f"notify:drift:{day}", str(drift)):
            self.event(
                "ledger_drift",
                f"the upstream counted {drift:+.0f} calls more than the ledger charged "
                f"(bound {config.notify.drift_calls}): see GatewayLedgerDrift",
                drift_calls=drift,
                bound=config.notify.drift_calls,
            )

    # -- sending ---------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            payload = await self.queue.get()
            try:
                config = self._config().notify
                for url in config.webhook_urls:
                    await self._post(url, payload, config.slack, config.retries, config.timeout_s)
            finally:
                self.queue.task_done()

    async def _post(
        self, url: str, payload: dict[str, Any], slack: bool, retries: int, timeout_s: float
    ) -> None:
        assert self._session is not None
        body = {"text": payload["text"]} if slack else payload
        host = urlsplit(url).netloc.rpartition("@")[2]  # no path, query or credentials
        problem = ""
        for attempt in range(retries + 1):
            if attempt:
                await asyncio.sleep(min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
            try:
                async with self._session.post(
                    url,
                    json=body,
                    timeout=aiohttp.ClientTimeout(total=timeout_s),
                    allow_redirects=False,
                ) as r:
                    if r.status < 300:
                        self.sent += 1
                        return
                    problem = f"HTTP {r.status}"
                    if 400 <= r.status < 500 and r.status not in (408, 429):
                        break  # refused: the same body would be refused again
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = type(exc).__name__
        self.failed += 1
        log.warning(
            "notification %s to %s not delivered (%s, %d attempts)",
            payload["event"],
            host,
            problem,
            attempt + 1,
        )
