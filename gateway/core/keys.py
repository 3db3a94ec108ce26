"""Team keys issued through the store: created, listed, rotated and revoked by ``gateway keys``
and ``/admin/keys`` while gateways run, seen by every process on the store.

Keys in ``config.toml`` are untouched by this module and looked up first (a dict lookup, as
always). A store-issued key is kept as its ``sha256:`` hash only (``KeyRecord``); its plaintext
is returned once, by ``create_key`` or ``rotate_key``. Each process holds a ``KeyRing``: the
store's keys by hash, re-read when the store's ``keys_generation`` meta row changes, which it
checks every ``REFRESH_INTERVAL_S``. So a key created or revoked anywhere is accepted or
refused everywhere within about a second (``REVOKE_BOUND_S``, the documented bound); expiry
is checked on every request against the clock, so an expired key is refused at once. If the
store cannot be read for ``STALE_AFTER_S``, store-issued keys are answered 503 (fail closed:
a revoke this process can't see must not stay usable); config keys keep working.

Uses are counted in memory on the request path and written in batches off it, each refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from gateway.config import Config, TeamConfig, hash_key
from gateway.core.usage import iso_utc
from gateway.store.base import KeyRecord, Store, StoreUnavailable

log = logging.getLogger("gateway.keys")

GENERATION_META = "keys_generation"
REFRESH_INTERVAL_S = 1.0
REVOKE_BOUND_S = 2.0  # a refresh interval plus a store round trip, with room to spare
STALE_AFTER_S = 10.0
MAX_LABEL = 100
DEFAULT_GRACE = "7d"


class KeyProblem(Exception):
    """A key operation the caller asked wrongly (an unknown team or id, a bad label)."""


class UnknownKey(KeyProblem):
    """No store-issued key has this id."""


def key_state(key: KeyRecord, now: float) -> str:
    """``revoked``, ``expired`` or ``active``."""
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and now >= key.expires_at:
        return "expired"
    return "active"


def key_dict(key: KeyRecord, now: float) -> dict[str, Any]:
    """A key as the admin API and ``keys list --format json`` show it: never its hash."""

    def when(ts: float | None) -> str | None:
        return None if ts is None else iso_utc(ts)

    return {
        "id": key.id,
        "team": key.team,
        "label": key.label,
        "state": key_state(key, now),
        "created_at": when(key.created_at),
        "expires_at": when(key.expires_at),
        "revoked_at": when(key.revoked_at),
        "last_used_at": when(key.last_used_at),
        "uses": key.uses,
    }


def config_key_counts(config: Config, team: str | None = None) -> dict[str, int]:
    """Per configured team, how many keys config.toml gives it (they have no id or times)."""
    return {t.name: len(t.key_hashes) for t in config.teams if team in (None, t.name)}


def _check_label(label: str) -> str:
    label = label.strip()
    if len(label) > MAX_LABEL or not label.isprintable():
        raise KeyProblem(f"label: at most {MAX_LABEL} printable characters")
    return label


def _new_key(team: str, label: str, now: float, lifetime_s: float | None) -> tuple[str, KeyRecord]:
    if lifetime_s is not None and (not math.isfinite(lifetime_s) or lifetime_s <= 0):
        raise KeyProblem("expires: give a positive age, e.g. 90d")
    plaintext = secrets.token_urlsafe(32)
    record = KeyRecord(
        id="key_" + secrets.token_hex(6),
        team=team,
        key_hash=hash_key(plaintext),
        label=label,
        created_at=now,
        expires_at=None if lifetime_s is None else now + lifetime_s,
    )
    return plaintext, record


async def create_key(
    store: Store,
    config: Config,
    team: str,
    *,
    now: float,
    label: str = "",
    lifetime_s: float | None = None,
) -> tuple[str, KeyRecord]:
    """A new key for a configured team: (plaintext, shown once; its record, as stored)."""
    if config.team(team) is None:
        known = ", ".join(t.name for t in config.teams) or "none"
        raise KeyProblem(
            f"team {team} is not in {config.source} (teams: {known}): a key needs the team's "
            "quota, so add [teams.NAME] first"
        )
    plaintext, record = _new_key(team, _check_label(label), now, lifetime_s)
    await store.save_key(record)
    return plaintext, record


async def find_key(store: Store, key_id: str) -> KeyRecord:
    for key in await store.list_keys():
        if key.id == key_id:
            return key
    raise UnknownKey(f"no store-issued key {key_id!r} (see `gateway keys list`)")


async def revoke_key(store: Store, key_id: str, *, now: float) -> KeyRecord:
    """Refuse the key from now on, everywhere; revoking it again changes nothing."""
    key = await find_key(store, key_id)
    if key.revoked_at is not None:
        return key
    revoked = replace(key, revoked_at=now)
    await store.save_key(revoked)
    return revoked


async def rotate_key(
    store: Store,
    config: Config,
    key_id: str,
    *,
    now: float,
    grace_s: float,
    lifetime_s: float | None = None,
) -> tuple[str, KeyRecord, KeyRecord]:
    """A new key for the same team and label, and the old one valid ``grace_s`` more (never
    longer than it already was): (new plaintext, new record, old record). Without
    ``lifetime_s`` the new key lives as long as the old one was made to (or for ever)."""
    if not math.isfinite(grace_s) or grace_s < 0:
        raise KeyProblem("grace: give an age, e.g. 7d (0s ends the old key now)")
    old = await find_key(store, key_id)
    state = key_state(old, now)
    if state != "active":
        raise KeyProblem(f"key {key_id} is {state}: make a new one with `gateway keys new`")
    if config.team(old.team) is None:
        raise KeyProblem(f"key {key_id} is for team {old.team}, which {config.source} lacks")
    if lifetime_s is None and old.expires_at is not None:
        lifetime_s = old.expires_at - old.created_at
    plaintext, new = _new_key(old.team, old.label, now, lifetime_s)
    await store.save_key(new)  # the new key first: a failure after it leaves the old valid
    ends = now + grace_s if old.expires_at is None else min(old.expires_at, now + grace_s)
    old = replace(old, expires_at=ends)
    await store.save_key(old)
    return plaintext, new, old


class KeyRing:
    """This process's view of the store-issued keys, for ``gateway.http.api._authorize``."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time):
        self.store = store
        self.clock = clock
        self.by_hash: dict[str, KeyRecord] = {}
        self.generation: str | None = None
        self.read_at = -math.inf  # time.monotonic() of the last good read of the store
        self.uses: dict[str, tuple[int, float]] = {}
        self._teams: tuple[Config | None, dict[str, TeamConfig]] = (None, {})
        self._task: asyncio.Task[None] | None = None

    def team_for(self, key_hash: str, config: Config) -> TeamConfig | None:
        """The team of a valid store-issued key (its use counted), else None. Raises
        StoreUnavailable while the keys could not be re-read for STALE_AFTER_S."""
        key = self.by_hash.get(key_hash)
        if key is None:
            return None
        if time.monotonic() - self.read_at > STALE_AFTER_S:
            raise StoreUnavailable("store-issued team keys could not be re-read")
        now = self.clock()
        if key.expires_at is not None and now >= key.expires_at:
            return None
        if self._teams[0] is not config:  # a reload: teams by name again, once
            self._teams = (config, {t.name: t for t in config.teams})
        team = self._teams[1].get(key.team)
        if team is not None:
            n, _ = self.uses.get(key.id, (0, 0.0))
            self.uses[key.id] = (n + 1, now)
        return team

    async def refresh(self, *, force: bool = False) -> None:
        generation = await self.store.get_meta(GENERATION_META)
        if force or generation != self.generation or self.read_at == -math.inf:
            keys = await self.store.list_keys()
            self.by_hash = {k.key_hash: k for k in keys if k.revoked_at is None}
            self.generation = generation
        self.read_at = time.monotonic()

    async def flush(self) -> None:
        batch, self.uses = self.uses, {}
        try:
            await self.store.record_key_uses(batch)
        except StoreUnavailable:
            for key_id, (n, at) in batch.items():  # kept for the next round
                m, later = self.uses.get(key_id, (0, 0.0))
                self.uses[key_id] = (n + m, max(at, later))
            raise

    async def start(self) -> None:
        """Read the keys before the first request, then re-read them in the background."""
        await self.refresh()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(REFRESH_INTERVAL_S)
            try:
                await self.refresh()
                await self.flush()
            except StoreUnavailable as exc:
                if not failing:
                    log.warning("team keys: store unreadable, keeping the last read: %s", exc)
                failing = True
            else:
                failing = False

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.flush()
        except StoreUnavailable as exc:
            log.warning("team keys: last uses not recorded: %s", exc)
