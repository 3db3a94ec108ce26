"""``GET /metrics`` that holds with thousands of teams: the text is rendered in a thread, one
render at a time shared by every scrape waiting for it, and renders are spaced so that they
take at most ``SHARE`` of the time.

A scrape is never answered from a render that started before it arrived, unless one was
already under way (concurrent scrapes share it): one process's ``/metrics`` stays exact for a
client that scrapes after reading its answers. When renders are slow, a scrape that comes
sooner than ``render time / SHARE`` after the last one waits (at most ``MAX_GAP_S``) instead.

The thread reads the registry as prometheus-client's own HTTP server does, concurrently with
the loop's updates: each value has its lock, a histogram's sum and buckets may be one fold
apart in one scrape.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from gateway.config import Config

SHARE = 0.2  # of the time spent rendering, at most
MAX_GAP_S = 1.0  # a scrape waits at most this long for its turn


Render = Callable[[], bytes]


class MetricsPage:
    def __init__(
        self,
        prepare: Callable[[], Awaitable[Render]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._prepare = prepare  # on the loop: reads the store, folds; returns the render
        self._clock = clock
        self._pending: asyncio.Future[bytes] | None = None
        self._next_at = 0.0  # when the next render may start
        self.renders = 0

    async def body(self) -> bytes:
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._turn())
        # Shielded: one scraper hanging up does not cancel the render the others wait for.
        return await asyncio.shield(self._pending)

    async def _turn(self) -> bytes:
        try:
            wait = self._next_at - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
            render = await self._prepare()
            started = self._clock()
            body = await asyncio.to_thread(render)  # in a thread: the loop serves meanwhile
            took = self._clock() - started
            self._next_at = self._clock() + min(MAX_GAP_S, took * (1 - SHARE) / SHARE)
            self.renders += 1
            return body
        finally:
            self._pending = None


class TeamGauges:
    """``gateway_quota_used`` and ``gateway_quota_limit``: one sample per team, read from the
    store at each scrape and written straight into the page's text rather than kept as
    metric values. Every process on a store reads the same numbers, so nothing needs to be
    shared between workers; and 10,000 such lines cost a few milliseconds this way against
    ~100 ms through prometheus-client's renderer. A store that cannot be read leaves the
    last values read."""

    def __init__(self) -> None:
        self._teams: list[tuple[str, str, int]] = []  # name, label text, quota
        self._used: dict[str, int] = {}

    def configure(self, config: Config) -> None:
        self._teams = [(t.name, f'{{team="{_escape(t.name)}"}}', t.quota) for t in config.teams]

    def set_used(self, used: dict[str, int]) -> None:
        self._used = used

    def render(self) -> Render:
        """The text as of now, built later (in the render thread) from this snapshot."""
        teams, used = self._teams, self._used

        def text() -> bytes:
            out = [
                "# HELP gateway_quota_used Upstream calls charged this period\n",
                "# TYPE gateway_quota_used gauge\n",
            ]
            out += [f"gateway_quota_used{label} {used.get(n, 0)}.0\n" for n, label, _ in teams]
            out += [
                "# HELP gateway_quota_limit Team sub-quota per period\n",
                "# TYPE gateway_quota_limit gauge\n",
            ]
            out += [f"gateway_quota_limit{label} {quota}.0\n" for _, label, quota in teams]
            return "".join(out).encode()

        return text


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
