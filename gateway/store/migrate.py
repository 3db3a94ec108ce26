"""``gateway migrate-store``: copy the quota ledger and the cache from one store to another,
SQLite to Redis (one replica grows to many) or back.

The source's pending reservations are settled first, as housekeeping would settle them, and
the copy refuses while a gateway uses either store: a live owner on this host, or a beat that
moves on another. The ledger is copied row by row (every period: charged, hits, coalesced,
undelivered), the cache entry by entry, meta rows the destination lacks; a second run finds
everything there and changes nothing. A destination whose ledger holds a row the source does
not hold the same way is refused: copying over it would lose what was charged there.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

from gateway.config import load_config
from gateway.store import Store, open_store
from gateway.store.base import Reclaimed
from gateway.store.owners import Owner, gone_locally, this_host
from gateway.store.redis import RedisStore
from gateway.store.sqlite import SQLiteStore

PAGE = 500  # cached results read per round trip
UNLIMITED = 10**15  # bytes: a destination named by URL evicts nothing
NOT_COPIED_META = frozenset({"cache_generation"})  # one store's own purge marker


class MigrationRefused(Exception):
    """The copy would lose or mix up charges: nothing was copied."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    store: Store
    label: str  # what it is, without a password
    max_bytes: int  # the cache's size cap, when it is a destination


@dataclass(slots=True)
class Report:
    settled: Reclaimed
    rows_copied: int = 0
    rows_present: int = 0
    results_copied: int = 0
    results_present: int = 0
    results_kept: int = 0  # newer in the destination: left as they are
    meta_copied: int = 0
    meta_present: int = 0
    keys_copied: int = 0
    keys_present: int = 0

    def lines(self) -> list[str]:
        return [
            f"settled first: {self.settled.refunded} refunded, {self.settled.undelivered} "
            "kept as undelivered (reservations of gateways that died)",
            f"ledger: {self.rows_copied} rows copied, {self.rows_present} already there",
            f"cache: {self.results_copied} results copied, {self.results_present} already "
            f"there, {self.results_kept} newer in the destination kept",
            f"meta: {self.meta_copied} copied, {self.meta_present} already there",
            f"team keys: {self.keys_copied} copied, {self.keys_present} already there",
        ]


def endpoint(spec: str) -> Endpoint:
    """A config file (its [storage] and cache.max_mb), a redis:// URL (``?prefix=`` names
    the key prefix, default ``gw:``) or a SQLite ledger path (``sqlite:`` optional)."""
    if spec.startswith(("redis://", "rediss://", "unix://")):
        parts = urlsplit(spec)
        query = parse_qs(parts.query)
        prefix = query.pop("prefix", ["gw:"])[0]
        rest = "&".join(f"{k}={v}" for k, vs in query.items() for v in vs)
        url = urlunsplit((parts.scheme, parts.netloc, parts.path, rest, ""))
        redis = RedisStore(url, prefix=prefix, max_connections=16)
        return Endpoint(redis, f"redis {redis._safe_url()} prefix {prefix}", UNLIMITED)
    path = spec.removeprefix("sqlite:")
    if path.endswith(".toml"):
        config = load_config(path, require_api_key=False)
        store = open_store(config.storage, repair_cache=False, max_inflight=16)
        return Endpoint(
            store, f"{config.storage.backend} of {path}", int(config.cache.max_mb * 1024 * 1024)
        )
    return Endpoint(SQLiteStore(path, repair_cache=False), f"sqlite {path}", UNLIMITED)


def _identity(store: Store) -> tuple[str, ...]:
    if isinstance(store, RedisStore):
        return ("redis", store._safe_url(), store.prefix)
    if isinstance(store, SQLiteStore):
        return ("sqlite", str(Path(store.path).resolve()))
    return (repr(store),)


async def _in_use(stores: dict[str, Store], wait_s: float) -> dict[str, list[Owner]]:
    """Refuse while a gateway uses a store; else each store's owners that are gone."""
    host = this_host()
    owners: dict[str, dict[str, Owner]] = {}
    remote: list[tuple[str, Owner]] = []
    for role, store in stores.items():
        found = {o.id: o for o in await store.owners()}
        for o in await store.pending_owners():
            found.setdefault(o.id, o)
        owners[role] = found
        for o in found.values():
            local = gone_locally(o, host) if o.host else True
            if local is False:
                raise MigrationRefused(
                    f"a gateway (pid {o.pid}) on this host uses the {role} store: stop it first"
                )
            if local is None:
                remote.append((role, o))
    if remote:
        # Another host's gateway beats every few seconds while it runs.
        await asyncio.sleep(wait_s)
        for role, o in remote:
            now = {x.id: x.beat for x in await stores[role].owners()}
            if now.get(o.id, o.beat) != o.beat:
                raise MigrationRefused(
                    f"a gateway on {o.host.partition('/')[0]} (pid {o.pid}) is writing to "
                    f"the {role} store (its beat moved): stop every gateway first"
                )
    return {role: list(found.values()) for role, found in owners.items()}


async def migrate(source: Endpoint, dest: Endpoint, *, wait_s: float) -> Report:
    """Copy ``source`` into ``dest`` (both opened); ``MigrationRefused`` changes nothing
    in the destination."""
    if _identity(source.store) == _identity(dest.store):
        raise MigrationRefused("--from and --to are the same store")
    gone = await _in_use({"source": source.store, "destination": dest.store}, wait_s)
    refunded = undelivered = 0
    for owner in gone["source"]:
        done = await source.store.reclaim_owner(owner.id)
        refunded, undelivered = refunded + done.refunded, undelivered + done.undelivered
    if await source.store.pending_owners():
        raise MigrationRefused("the source still holds pending reservations: try again")
    report = Report(Reclaimed(refunded, undelivered))

    rows = {(r.team, r.period): r for r in await source.store.ledger_rows()}
    there = {(r.team, r.period): r for r in await dest.store.ledger_rows()}
    for (team, period), row in sorted(there.items()):
        if rows.get((team, period)) != row:
            raise MigrationRefused(
                f"the destination's ledger differs from the source's (team {team}, period "
                f"{period}): copying would overwrite charges; migrate into an empty store"
            )
    for key, row in sorted(rows.items()):
        if key in there:
            report.rows_present += 1
        else:
            await dest.store.put_ledger_row(row)
            report.rows_copied += 1

    cursor = ""
    while True:
        page, cursor = await source.store.results_page(cursor, PAGE)
        for result in page:
            held, _ = await dest.store.lookup(result.key, "", "")
            if held is not None and held.created_at > result.created_at:
                report.results_kept += 1
            elif held == result:
                report.results_present += 1
            else:
                await dest.store.save_result(result, max_bytes=dest.max_bytes)
                report.results_copied += 1
        if not cursor:
            break

    # Store-issued team keys (hashes only), with their uses and last use: without them every
    # client of such a key would get 401 after the move.
    held_keys = {k.id for k in await dest.store.list_keys()}
    for record in await source.store.list_keys():
        if record.id in held_keys:
            report.keys_present += 1
            continue
        await dest.store.save_key(record)
        if record.uses or record.last_used_at is not None:
            last = record.last_used_at if record.last_used_at is not None else record.created_at
            await dest.store.record_key_uses({record.id: (record.uses, last)})
        report.keys_copied += 1

    meta = await dest.store.meta_items()
    for name, value in sorted((await source.store.meta_items()).items()):
        if name in NOT_COPIED_META:
            continue
        if name in meta:
            report.meta_present += 1
        else:
            await dest.store.set_meta(name, value)
            report.meta_copied += 1
    return report


def run_migrate(source_spec: str, dest_spec: str, *, wait_s: float) -> int:
    """The command: 0 copied (or nothing left to copy), 1 refused."""
    source, dest = endpoint(source_spec), endpoint(dest_spec)
    if isinstance(source.store, SQLiteStore) and not Path(source.store.path).exists():
        print(f"gateway migrate-store: no store at {source.store.path}", file=sys.stderr)
        return 1

    async def run() -> Report:
        await source.store.open()
        try:
            await dest.store.open()
            try:
                return await migrate(source, dest, wait_s=wait_s)
            finally:
                await dest.store.close()
        finally:
            await source.store.close()

    print(f"from: {source.label}\nto:   {dest.label}")
    try:
        report = asyncio.run(run())
    except MigrationRefused as exc:
        print(f"gateway migrate-store: refused, nothing copied: {exc}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    return 0
