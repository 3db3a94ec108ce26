"""Command line: ``gateway serve|sim|demo|check-config|hash-key``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.admin_cli import ADMIN_COMMANDS, add_admin_commands, run_admin_command
from gateway.config import ConfigError, hash_key, load_config
from gateway.store.base import StoreUnavailable


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="Caching, quota-enforcing proxy for the ImageRecognize v2 API"
    )
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default="config.toml", help="path to config.toml")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--log-format", choices=("text", "json"), default="text")
    serve.add_argument("--log-level", default="INFO")

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", default="config.toml")

    cs = sub.add_parser("check-store", help="verify the store; --repair fixes what SQLite can")
    cs.add_argument("--config", default="config.toml")
    cs.add_argument(
        "--repair",
        action="store_true",
        help="move a damaged cache aside; rebuild a damaged ledger from its pages",
    )

    hk = sub.add_parser("hash-key", help="print the sha256: form of a team key for config.toml")
    hk.add_argument("key", nargs="?", help="the key (read from stdin when omitted)")

    sim = sub.add_parser("sim", help="run the upstream simulator (tests and demos only)")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8090)
    sim.add_argument("--api-key", default=os.environ.get("IMAGERECOGNIZE_API_KEY", "sim-key"))
    sim.add_argument("--quota", type=int, default=10000)
    sim.add_argument("--latency-ms", type=float, default=0.0)

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
            from gateway.server import serve

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
                print(
                    f"note: {config.admin.token_env} is not set here (or only whitespace): "
                    "the admin API is off and the status page open",
                    file=sys.stderr,
                )
            print(
                f"{args.config}: ok ({len(config.teams)} teams, storage {config.storage.backend}, "
                f"quota per {config.quota.period})"
            )
            return 0
        if args.command == "check-store":
            from gateway.check_store import check_store

            return check_store(load_config(args.config, require_api_key=False), repair=args.repair)
        if args.command == "hash-key":
            key = args.key if args.key is not None else sys.stdin.readline().strip()
            if not key:
                print("gateway hash-key: no key given", file=sys.stderr)
                return 2
            print(hash_key(key))
            return 0
        if args.command == "sim":
            from gateway.sim import serve_sim

            serve_sim(
                host=args.host,
                port=args.port,
                api_key=args.api_key,
                quota=args.quota,
                latency_ms=args.latency_ms,
            )
            return 0
        if args.command == "demo":
            from gateway.demo import run_demo

            return run_demo(requests_per_team=args.requests, images=args.images)
    except ConfigError as exc:
        print(f"gateway: config error: {exc}", file=sys.stderr)
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
