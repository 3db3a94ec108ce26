"""Operator commands: ``gateway usage``, ``gateway cache stats|purge``,
``gateway keys new|list|revoke|rotate``, ``gateway reload``.

``usage`` and ``cache`` read the configured store directly, so they work while a gateway runs
(SQLite in WAL mode, or Redis) and when none does. Exit codes: 0 ok, 1 failure, 2 usage or
config error.

Long because: one function per operator command and its output, sharing the argument helpers
and exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import secrets
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gateway.analysis import ANALYSIS_TYPES
from gateway.config import Config, ConfigError, hash_key, load_config
from gateway.core.keys import (
    DEFAULT_GRACE,
    REVOKE_BOUND_S,
    KeyProblem,
    config_key_counts,
    create_key,
    key_dict,
    key_state,
    revoke_key,
    rotate_key,
)
from gateway.core.usage import (
    PERIOD_FORMS,
    PeriodError,
    TeamLine,
    UsageReport,
    cache_report,
    compute_usage,
    derivation,
    human_age,
    human_bytes,
    iso_utc,
    money_places,
    parse_age,
    parse_period,
    range_period,
    stats_dict,
)
from gateway.store import StoreUnavailable, open_store
from gateway.store.base import CacheStats, KeyRecord, Store

ADMIN_COMMANDS = frozenset({"usage", "cache", "keys", "reload"})
T = TypeVar("T")


class UsageError(Exception):
    """A command line the command refuses (exit 2)."""


class Failure(Exception):
    """The command could not do its job (exit 1)."""


def add_admin_commands(sub: Any) -> None:
    """Add the operator commands to ``gateway``'s subparsers (``sub``)."""
    usage = sub.add_parser(
        "usage",
        help="per-team upstream calls, quota and calls saved (chargeback)",
        description="Per configured team: upstream calls charged, quota, remaining, cache "
        "hits (of them derived from a looser stored result), coalesced, calls saved (hits + "
        "coalesced) and undelivered (charged calls "
        "that were sent but delivered no result), with a total line. "
        "A period coarser than quota.period sums the ledger rows inside it.",
    )
    _config_arg(usage)
    usage.add_argument(
        "--period",
        default="current",
        help=f"{PERIOD_FORMS} (default: current, the quota period now)",
    )
    usage.add_argument(
        "--from",
        dest="start",
        metavar="YYYY-MM-DD",
        help="with --to: the days from this one (included), instead of --period",
    )
    usage.add_argument(
        "--to", dest="end", metavar="YYYY-MM-DD", help="with --from: up to this day (included)"
    )
    usage.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="csv is a chargeback file: header, one row per team, a total row",
    )

    cache = sub.add_parser(
        "cache",
        help="inspect or purge the stored results",
        description="Inspect or purge the stored results.",
    )
    actions = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    stats = actions.add_parser(
        "stats",
        help="entries, bytes, hits, oldest entry, by type",
        description="What the cache holds.",
    )
    _config_arg(stats)
    stats.add_argument("--format", choices=("table", "json"), default="table", help="output")
    purge = actions.add_parser(
        "purge",
        help="remove stored results",
        description="Remove stored results matching every filter given. Refuses to run "
        "without a filter unless --all is given (alone).",
    )
    _config_arg(purge)
    purge.add_argument("--hash", help="the image's X-Content-Hash (32 hex digits)")
    purge.add_argument("--type", choices=ANALYSIS_TYPES, help="one analysis type")
    purge.add_argument(
        "--older-than", metavar="AGE", help="stored longer ago than AGE: 30d, 12h, 90m, 2w"
    )
    purge.add_argument("--all", action="store_true", help="remove every stored result")

    keys = sub.add_parser("keys", help="team keys", description="Team keys.")
    key_actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    new = key_actions.add_parser(
        "new",
        help="make a fresh random key for a team",
        description="Print a fresh random team key once, and the config line with its hash. "
        "The gateway keeps only the hash; hand the key to the team. The team must be in the "
        "config; --new-team prints a whole [teams.NAME] table for a team that is not.",
    )
    new.add_argument("team", help="the team's name, as in [teams.NAME]")
    _config_arg(new)
    new.add_argument(
        "--new-team",
        action="store_true",
        help="the team is not in the config yet: print a whole table to add",
    )
    new.add_argument(
        "--store",
        action="store_true",
        help="issue the key through the store instead: running gateways on it accept it "
        "within a second, no config edit or reload; it can be listed, rotated and revoked",
    )
    new.add_argument("--label", default="", help="with --store: what the key is for")
    new.add_argument(
        "--expires",
        metavar="AGE",
        help="with --store: the key expires AGE from now (90d, 12h, 2w; default: never)",
    )
    listing = key_actions.add_parser(
        "list",
        help="the store-issued keys, their state, last use and uses",
        description="Every store-issued key (active, expired, revoked) with its label, "
        "times and the requests it authorized (written by the gateways about once a "
        "second), and how many keys config.toml gives each team.",
    )
    _config_arg(listing)
    listing.add_argument("--team", help="only this team's keys")
    listing.add_argument("--format", choices=("table", "json"), default="table", help="output")
    revoke = key_actions.add_parser(
        "revoke",
        help="refuse a store-issued key from now on",
        description="Refuse a store-issued key on every gateway on the store (within a "
        "second). Keys in config.toml are removed from the config instead.",
    )
    revoke.add_argument("key_id", help="the key's id, as `gateway keys list` shows it")
    _config_arg(revoke)
    rotate = key_actions.add_parser(
        "rotate",
        help="a new key for the same team; the old one ends after a grace",
        description="Print a new key for the key's team and label (shown once), and keep "
        "the old key valid for --grace more (never longer than it already was).",
    )
    rotate.add_argument("key_id", help="the key's id, as `gateway keys list` shows it")
    _config_arg(rotate)
    rotate.add_argument(
        "--grace",
        default=DEFAULT_GRACE,
        metavar="AGE",
        help="how long the old key keeps working (0s: not at all)",
    )
    rotate.add_argument(
        "--expires",
        metavar="AGE",
        help="the new key expires AGE from now (default: the old key's lifetime, if any)",
    )

    reload = sub.add_parser(
        "reload",
        help="make a running gateway re-read its config",
        description="With --pid, send SIGHUP to that process. Otherwise, with the admin token "
        "in the environment (the variable named by [admin] token_env), POST /admin/reload on "
        "server.host:port (or --url) and print the answer.",
    )
    _config_arg(reload)
    reload.add_argument(
        "--pid", type=int, help="the gateway's process id: send SIGHUP (even with a token)"
    )
    reload.add_argument(
        "--url",
        help="where the gateway listens, e.g. http://127.0.0.1:8080 (default: the config's "
        "server.host:port; give it when the edit changes them: the gateway listens on the old "
        "ones until restarted)",
    )
    reload.add_argument("--timeout", type=float, default=10.0, help="seconds (HTTP)")


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="config.toml", help="path to config.toml")


def run_admin_command(args: argparse.Namespace) -> int:
    """Run one operator command; ``ConfigError`` is left to ``gateway.cli`` (exit 2)."""
    name = f"gateway {args.command}"
    try:
        if args.command == "usage":
            return _usage(args)
        if args.command == "cache":
            return _cache_stats(args) if args.cache_command == "stats" else _cache_purge(args)
        if args.command == "keys":
            return _keys(args)
        return _reload(args)
    except (UsageError, PeriodError, KeyProblem) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    except (Failure, StoreUnavailable) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1


# -- store access -----------------------------------------------------------------------------
def _with_store(config: Config, action: Callable[[Store], Awaitable[T]]) -> T:
    storage = config.storage
    if storage.backend == "sqlite" and not Path(storage.path).exists():
        # Opening would create an empty store (and its directory): say what is wrong instead.
        raise Failure(
            f"no store at {storage.path} (storage.path in {config.source}); "
            "has a gateway run with this config?"
        )

    async def run() -> T:
        store = open_store(storage, repair_cache=False)  # a report never moves files
        await store.open()
        try:
            return await action(store)
        finally:
            await store.close()

    return asyncio.run(run())


# -- usage ------------------------------------------------------------------------------------
def _usage(args: argparse.Namespace) -> int:
    if (args.start is None) != (args.end is None):
        raise UsageError("--from and --to go together")
    if args.start is not None and args.period != "current":
        raise UsageError("give --period or --from/--to, not both")
    period = args.period if args.start is None else range_period(args.start, args.end)
    config = load_config(args.config, require_api_key=False)
    asked = parse_period(period, ledger=config.quota.period, now=time.time())
    report = _with_store(config, lambda store: compute_usage(store, config, asked))
    if args.format == "json":
        print(json.dumps(report.as_dict(), indent=2))
    elif args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerows(report.csv_rows())
    else:
        print(usage_table(report))
    return 0


def usage_table(report: UsageReport) -> str:
    head = (
        "team",
        "charged",
        "quota",
        "remaining",
        "cache hits",
        "derived",
        "coalesced",
        "calls saved",
        "undelivered",
        f"spend {report.pricing.currency}",
        f"savings {report.pricing.currency}",
    )
    places = money_places(report.pricing.per_call)
    rows = [
        (
            t.team,
            t.charged,
            _dash(t.quota),
            _dash(t.remaining),
            t.hits,
            t.derived,
            t.coalesced,
            t.saved,
            t.undelivered,
            f"{report.spend(t):.{places}f}",
            f"{report.savings(t):.{places}f}",
        )
        for t in (*report.teams, report.total)
    ]
    title = f"Usage for {report.period.key} (quota per {report.quota_period})"
    lines = [title, *_table(head, rows, footer=True)]
    if report.note:
        lines.append(f"note: {report.note}")
    if any(t.quota is None for t in report.teams):
        lines.append("note: a team with quota '-' is in the ledger but not in the config")
    if report.total.undelivered:
        lines.append(
            "note: undelivered calls were sent upstream (so maybe billed) but delivered no "
            "result: the gateway died or the upstream failed mid-call; they stay charged"
        )
    if not report.pricing.per_call:
        lines.append("note: no [pricing] per_call in the config, so spend and savings read 0")
    if report.pricing_note:
        lines.append(f"note: {report.pricing_note}")
    return "\n".join(lines)


def _dash(value: int | None) -> str | int:
    return "-" if value is None else value


def _table(
    head: Sequence[str], rows: Sequence[Sequence[object]], *, footer: bool = False
) -> list[str]:
    """Aligned columns: the first left, numbers right; a rule above the footer row."""
    cells = [[str(c) for c in row] for row in (head, *rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]

    def line(row: list[str]) -> str:
        out = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        return "  ".join(out).rstrip()

    lines = [line(r) for r in cells]
    if footer:
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return lines


# -- cache ------------------------------------------------------------------------------------
def _cache_stats(args: argparse.Namespace) -> int:
    config = load_config(args.config, require_api_key=False)
    now = time.time()
    stats, period = _with_store(config, lambda store: cache_report(store, config, now=now))
    if args.format == "json":
        print(json.dumps(stats_dict(stats, period), indent=2))
    else:
        print(stats_table(stats, period, now=now, derived=derivation(stats, config)))
    return 0


def stats_table(
    stats: CacheStats, period: TeamLine, *, now: float, derived: dict[str, str] | None = None
) -> str:
    oldest = (
        "-"
        if stats.oldest is None
        else f"{iso_utc(stats.oldest)} ({human_age(now - stats.oldest)} ago)"
    )
    lines = [
        f"entries       {stats.entries}",
        f"size          {human_bytes(stats.size_bytes)} ({stats.size_bytes} bytes)",
        f"hits          {stats.hits}",
        f"hit ratio     {_ratio(period)} this quota period ({period.saved} answered without "
        f"an upstream call, {period.charged} upstream calls)",
        f"oldest entry  {oldest}",
    ]
    if derived:
        lines += [f"derived hits  {t}: {state}" for t, state in derived.items()]
    if stats.by_type:
        rows = [(t, n, human_bytes(b), b) for t, n, b in stats.by_type]
        lines += ["", "by type:", *_table(("type", "entries", "size", "bytes"), rows)]
    return "\n".join(lines)


def _ratio(line: TeamLine) -> str:
    ratio = line.hit_ratio
    return "-" if ratio is None else f"{ratio:.1%}"


def _cache_purge(args: argparse.Namespace) -> int:
    content_hash = args.hash.strip().lower() if args.hash else None
    if content_hash is not None and (
        len(content_hash) != 32 or set(content_hash) - set("0123456789abcdef")
    ):
        raise UsageError("--hash must be the 32 hex digits of X-Content-Hash")
    try:
        age = parse_age(args.older_than) if args.older_than else None
    except ValueError as exc:
        raise UsageError(f"--older-than: {exc}") from None
    filtered = content_hash is not None or args.type is not None or age is not None
    if args.all and filtered:
        raise UsageError("--all removes every stored result: give it alone, without filters")
    if not filtered and not args.all:
        raise UsageError(
            "refusing to purge without a filter: give --hash, --type or "
            "--older-than, or --all to remove every stored result"
        )
    config = load_config(args.config, require_api_key=False)
    cutoff = time.time() - age if age is not None else None
    started = time.monotonic()
    if sys.stderr.isatty():  # one DELETE: on a large store it can take a while
        print("purging (one transaction; a running gateway keeps serving)...", file=sys.stderr)
    removed = _with_store(
        config,
        lambda store: store.purge(content_hash=content_hash, type_=args.type, older_than=cutoff),
    )
    print(
        f"removed {removed} cached result{'' if removed == 1 else 's'} "
        f"in {time.monotonic() - started:.1f}s"
    )
    return 0


# -- keys -------------------------------------------------------------------------------------
def _keys_new(team: str, config_path: str, *, new_team: bool) -> int:
    if not team or not team.replace("_", "").replace("-", "").isalnum():
        raise UsageError(f"team {team!r}: team names use letters, digits, - and _")
    try:
        config: Config | None = load_config(config_path, require_api_key=False)
    except ConfigError:
        if not new_team:
            raise  # the caller prints each problem: no key for a config that cannot run
        config = None  # e.g. the image's config, which has no teams yet
    known = [t.name for t in config.teams] if config is not None else []
    if new_team and team in known:
        raise UsageError(f"team {team} is already in {config_path}: drop --new-team")
    if not new_team and team not in known:
        raise UsageError(
            f"team {team} is not in {config_path} (teams: {', '.join(known)}); "
            "check the name, or pass --new-team for a whole [teams.NAME] table to add"
        )
    key = secrets.token_urlsafe(32)
    print(
        f"New key for team {team} (shown once: hand it to the team now; the gateway "
        "stores only its hash):\n"
    )
    print(f"  {key}\n")
    if new_team:
        print("Add this table to the config, set its quota, and run `gateway reload`:\n")
    else:
        print(
            f"Add this under [teams.{team}] in the config (to rotate, list it beside the old "
            "key, then remove the old one), and run `gateway reload`:\n"
        )
    if new_team:
        print(f"[teams.{team}]")
    print(f'keys = ["{hash_key(key)}"]')
    if new_team:
        print("quota = 1000  # upstream calls per quota.period: set this team's")
    return 0


def _keys(args: argparse.Namespace) -> int:
    command = args.keys_command
    if command == "new" and not args.store:
        if args.label or args.expires:
            raise UsageError("--label and --expires need --store (a config key has neither)")
        return _keys_new(args.team, args.config, new_team=args.new_team)
    if command == "new" and args.new_team:
        raise UsageError("--store needs a team in the config (its quota): drop --new-team")
    config = load_config(args.config, require_api_key=False)
    now = time.time()
    if command == "new":
        lifetime = _age("--expires", args.expires)
        plaintext, key = _with_store(
            config,
            lambda store: create_key(
                store, config, args.team, now=now, label=args.label, lifetime_s=lifetime
            ),
        )
        _print_new_key(plaintext, key)
        print(
            f"Gateways on this store accept it within {REVOKE_BOUND_S:g} s: no config edit, "
            f"no reload. Revoke: gateway keys revoke {key.id}; rotate: gateway keys rotate "
            f"{key.id} --grace 7d"
        )
        return 0
    if command == "list":
        keys = _with_store(config, lambda store: store.list_keys())
        shown = [k for k in keys if args.team in (None, k.team)]
        counts = config_key_counts(config, args.team)
        if args.format == "json":
            out = {"keys": [key_dict(k, now) for k in shown], "config_keys": counts}
            print(json.dumps(out, indent=2))
        else:
            print(keys_table(shown, counts, now=now))
        return 0
    if command == "revoke":
        key = _with_store(config, lambda store: revoke_key(store, args.key_id, now=now))
        print(
            f"revoked {key.id} (team {key.team}): refused by every gateway on this store "
            f"within {REVOKE_BOUND_S:g} s"
        )
        return 0
    grace = _age("--grace", args.grace)
    assert grace is not None
    lifetime = _age("--expires", args.expires)
    plaintext, key, old = _with_store(
        config,
        lambda store: rotate_key(
            store, config, args.key_id, now=now, grace_s=grace, lifetime_s=lifetime
        ),
    )
    _print_new_key(plaintext, key)
    print(f"The old key {old.id} works until {_when(old.expires_at)}, then is refused.")
    return 0


def _age(option: str, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return parse_age(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _when(ts: float | None) -> str:
    return "-" if ts is None else iso_utc(ts)


def _print_new_key(plaintext: str, key: KeyRecord) -> None:
    label = f', label "{key.label}"' if key.label else ""
    print(
        f"New key {key.id} for team {key.team}{label}, expires {_when(key.expires_at)} "
        "(shown once: hand it to the team now; the store keeps only its hash):\n"
    )
    print(f"  {plaintext}\n")


def keys_table(keys: Sequence[KeyRecord], config_keys: dict[str, int], *, now: float) -> str:
    head = ("id", "team", "label", "state", "created", "expires", "last used", "uses")
    rows = [
        (
            k.id,
            k.team,
            k.label or "-",
            key_state(k, now),
            _when(k.created_at),
            _when(k.expires_at),
            _when(k.last_used_at) if k.last_used_at is not None else "never",
            k.uses,
        )
        for k in keys
    ]
    cells = [[str(c) for c in row] for row in (head, *rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = [  # text left, the count right
        "  ".join(
            [*(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)), r[-1].rjust(widths[-1])]
        )
        for r in cells
    ]
    if not rows:
        lines = ["no store-issued keys (gateway keys new TEAM --store)"]
    if config_keys:
        counts = ", ".join(f"{team} {n}" for team, n in config_keys.items())
        lines.append(f"keys in the config (no id, times or uses): {counts}")
    return "\n".join(lines)


# -- reload -----------------------------------------------------------------------------------
def _reload(args: argparse.Namespace) -> int:
    config = load_config(args.config, require_api_key=False)
    if args.pid is not None:
        return _reload_signal(args.pid)  # asked for by name: the token does not override it
    if config.admin.enabled:
        return _reload_http(config, args.timeout, args.url)
    where = (
        f"set {config.admin.token_env} (named by [admin] token_env) to reload over HTTP"
        if config.admin.token_env
        else "the config has no [admin] token_env for reloading over HTTP"
    )
    raise UsageError(f"{where}, or pass --pid PID to send SIGHUP")


def _reload_http(config: Config, timeout: float, base: str | None = None) -> int:
    if base is not None:
        if not base.startswith(("http://", "https://")):
            raise UsageError(f"--url must be an http:// or https:// URL, not {base!r}")
        url = base.rstrip("/") + "/admin/reload"
    else:
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(
            config.server.host, config.server.host
        )
        url = f"http://{f'[{host}]' if ':' in host else host}:{config.server.port}/admin/reload"
    request = urllib.request.Request(
        url,
        data=b"",
        method="POST",
        headers={"Authorization": f"Bearer {config.admin.token.reveal()}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        hint = (
            ""
            if base is not None
            else " (if this edit changes server.host or server.port, the gateway still listens "
            "on the old ones: pass --url or --pid)"
        )
        raise Failure(f"cannot reach the gateway at {url}: {reason}{hint}") from None
    if status == 401:
        raise Failure(f"the gateway refused the admin token in {config.admin.token_env}")
    if status == 404:
        raise Failure(f"{url}: no admin API there (is the gateway's {config.admin.token_env} set?)")
    try:
        answer = json.loads(body)
        ok, message = bool(answer["ok"]), str(answer["message"])
    except (ValueError, KeyError, TypeError):
        raise Failure(f"{url} answered HTTP {status}: {body[:200]!r}") from None
    print(message)
    return 0 if ok and status == 200 else 1


def _reload_signal(pid: int) -> int:
    if pid <= 0:
        raise UsageError("--pid must be a process id > 0")  # 0 and -1 would signal groups
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            argv = ["gateway", "serve"]
        command = " ".join(argv).strip()
        if "gateway" not in command or "serve" not in argv:
            # SIGHUP ends most programs (`gateway sim` too): only a `gateway serve` gets it.
            raise UsageError(f"process {pid} is not `gateway serve` ({command[:80]})")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise Failure(f"no process {pid}") from None
    except PermissionError:
        raise Failure(f"not allowed to signal process {pid}") from None
    print(f"sent SIGHUP to {pid}; the gateway logs whether the new config was applied")
    return 0
