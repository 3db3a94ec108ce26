"""Command line: ``gateway serve|sim|demo|check-config|check-store|migrate-store|hash-key``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from gateway import __version__
from gateway.config import ConfigError, hash_key, load_config
from gateway.ops.admin_cli import ADMIN_COMMANDS, add_admin_commands, run_admin_command
from gateway.store.base import StoreUnavailable


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after each option's help, unless the help says its default itself or
    there is none to say (no value, a flag that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every ``--help`` of every subcommand shows each option's default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gateway", description="Caching, quota-enforcing proxy for the ImageRecognize v2 API"
    )
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )

    serve = sub.add_parser("serve", help="run the gateway", description="Run the gateway.")
    serve.add_argument("--config", default="config.toml", help="path to config.toml")
    serve.add_argument("--host", help="override server.host (default: the config's)")
    serve.add_argument("--port", type=int, help="override server.port (default: the config's)")
    serve.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="log line format"
    )
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")

    check = sub.add_parser(
        "check-config",
        help="validate a config file and exit",
        description="Validate a config file: every problem, one line each, then exit 2; "
        "or one ok line and exit 0.",
    )
    check.add_argument("--config", default="config.toml", help="path to config.toml")

    cs = sub.add_parser("check-store", help="verify the store; --repair fixes what SQLite can")
    cs.add_argument("--config", default="config.toml", help="path to config.toml")
    cs.add_argument(
        "--repair",
        action="store_true",
        help="move a damaged cache aside; rebuild a damaged ledger from its pages",
    )

    mig = sub.add_parser(
        "migrate-store",
        help="copy the quota ledger and the cache between SQLite and Redis",
        description="Copy every period of the quota ledger (charged, hits, coalesced, "
        "undelivered), the cache and the meta rows from one store to another, SQLite to Redis "
        "or back. Pending reservations of gateways that died are settled first; refused while "
        "a gateway uses either store, or when the destination's ledger differs from the "
        "source's. Run twice, the second run copies nothing. STORE: a config file, a "
        "redis:// URL (?prefix=gw: by default) or a SQLite ledger path.",
    )
    mig.add_argument("--from", dest="source", required=True, metavar="STORE", help="copy from")
    mig.add_argument("--to", dest="dest", required=True, metavar="STORE", help="copy into")
    mig.add_argument(
        "--wait-s",
        type=float,
        default=12.0,
        help="how long to watch the beats of gateways another host registered (a running "
        "one beats every 5 s)",
    )

    hk = sub.add_parser("hash-key", help="print the sha256: form of a team key for config.toml")
    hk.add_argument("key", nargs="?", help="the key (read from stdin when omitted)")

    sim = sub.add_parser(
        "sim",
        help="run the upstream simulator (tests and demos only)",
        description="A local stand-in for the ImageRecognize v2 API: deterministic fake "
        "results, its own account quota, optional latency. Never bills anything.",
    )
    sim.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sim.add_argument("--port", type=int, default=8090, help="port to listen on")
    sim.add_argument(
        "--api-key",
        default=os.environ.get("IMAGERECOGNIZE_API_KEY", "sim-key"),
        help="the one key it accepts (default: $IMAGERECOGNIZE_API_KEY, else sim-key)",
    )
    sim.add_argument(
        "--quota", type=int, default=10000, help="the account's calls before it answers 402"
    )
    sim.add_argument(
        "--latency-ms", type=float, default=0.0, help="added to every answer, milliseconds"
    )

    demo = sub.add_parser("demo", help="simulator + gateway + a short workload, then a table")
    demo.add_argument("--requests", type=_positive, default=40, help="requests per team")
    demo.add_argument(
        "--images", type=_positive, default=14, help="distinct images in the workload"
    )
    add_admin_commands(sub)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ADMIN_COMMANDS:
            return run_admin_command(args)
        if args.command == "serve":
            # Until the running gateway installs its reload handler, a SIGHUP (an operator's
            # reload, or a supervisor's) must not kill a gateway that is still starting.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            from gateway.ops.serve import serve

            return serve(
                args.config,
                host=args.host,
                port=args.port,
                log_format=args.log_format,
                log_level=args.log_level,
            )
        if args.command == "check-config":
            config = load_config(args.config, require_api_key=False)
            if not config.upstream.api_key:
                where = (
                    f"upstream.api_key_file {config.upstream.api_key_file} is not readable"
                    if config.upstream.api_key_file
                    else f"{config.upstream.api_key_env} is not set"
                )
                print(
                    f"note: {where} here; `gateway serve` will refuse to start without it",
                    file=sys.stderr,
                )
            if config.admin.token_env and not config.admin.token:
                status = (
                    "open to anyone (public_status = true)"
                    if config.admin.public_status
                    else "for the viewer token only"
                    if config.admin.status_token
                    else "off (403)"
                )
                print(
                    f"note: {config.admin.token_env} is not set here (or only whitespace): "
                    f"the admin API is off and the status page {status}",
                    file=sys.stderr,
                )
            print(
                f"{args.config}: ok ({len(config.teams)} teams, storage {config.storage.backend}, "
                f"quota per {config.quota.period})"
            )
            return 0
        if args.command == "check-store":
            from gateway.store.check import check_store

            return check_store(load_config(args.config, require_api_key=False), repair=args.repair)
        if args.command == "migrate-store":
            from gateway.store.migrate import run_migrate

            return run_migrate(args.source, args.dest, wait_s=args.wait_s)
        if args.command == "hash-key":
            key = args.key if args.key is not None else sys.stdin.readline().strip()
            if not key:
                print("gateway hash-key: no key given", file=sys.stderr)
                return 2
            print(hash_key(key))
            return 0
        if args.command == "sim":
            from gateway.devtools.sim import serve_sim

            serve_sim(
                host=args.host,
                port=args.port,
                api_key=args.api_key,
                quota=args.quota,
                latency_ms=args.latency_ms,
            )
            return 0
        if args.command == "demo":
            from gateway.devtools.demo import run_demo

            return run_demo(requests_per_team=args.requests, images=args.images)
    except ConfigError as exc:
        for problem in str(exc).splitlines():  # every problem of the file, one line each
            print(f"gateway: config error: {problem}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(f"gateway: store error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the port is taken: one line, not a traceback
        print(f"gateway: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2
