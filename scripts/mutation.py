"""Mutation testing of the code that decides money and trust, by hand (docs/testing.md).

    python scripts/mutation.py                      # every module below
    python scripts/mutation.py cache_key cors       # some of them
    python scripts/mutation.py --score cache_key    # only print the scores of the last run
    python scripts/mutation.py --at HEAD quota      # on a clean export of a commit
    python scripts/mutation.py --at HEAD --again quota  # its survivors, with HEAD's tests
    python scripts/mutation.py --at HEAD --sample 60 form  # 60 of its mutants (fixed seed)

Runs mutmut (``[tool.mutmut]`` in pyproject.toml) at nice 19 with one child process: the
machine is shared, and a mutant run is hours of CPU otherwise. For each module it mutates only
the functions named below and collects coverage only from that module's test files; mutmut
then runs, for each mutant, only the tests that executed the mutated function. The work folder
``mutants/`` (git-ignored) is made afresh each run: mutmut keeps its copies of files it does
not mutate, which would go stale while others change them.
Survivors: ``mutmut show NAME``; the score is killed / (killed + survived + no tests).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SQLITE = "gateway.store.sqlite.store.xǁSQLiteStoreǁ"
REDIS = "gateway.store.redis.store.xǁRedisStoreǁ"
STORE_PARTS = ("reserve", "mark_sent", "settle", "keep_undelivered", "refund", "save_result")
SERVICE = "gateway.core.service.xǁRecognitionServiceǁ"
# The request path (look up, derive, coalesce, reserve, forward, store, answer) and the refund
# rules; the background (flush, reconcile, the audit's bookkeeping) and type=cache are not.
SERVICE_PARTS = (
    "recognize", "_lookup", "_used", "derivable", "_widened", "_usable", "_derived",
    "_answer_from", "_start_audit", "_audit", "_stale", "_hit", "_lead",
    "_follow", "_coalesced", "_forward", "_call_upstream", "_fetch",
    "_end_unanswered", "_retry_unended", "_reserve",
)

# name: (file, mutant name globs, test files that can kill them)
MODULES: dict[str, tuple[str, list[str], list[str]]] = {
    "quota": ("gateway/core/quota.py", ["gateway.core.quota.*"],
              ["tests/core/test_quota.py", "tests/http/test_api.py"]),
    "cache_key": ("gateway/core/cache_key.py", ["gateway.core.cache_key.*"],
                  ["tests/core/test_cache_key.py", "tests/http/test_api.py"]),
    "cors": ("gateway/http/cors.py", ["gateway.http.cors.*"], ["tests/http/test_cors.py"]),
    # Cache-Control read and Cache-Status / Warning written (the service returns facts).
    "cache_headers": ("gateway/http/api.py",
                      [f"gateway.http.api.x_{f}*" for f in ("parse_cache_control", "cache_status")],
                      ["tests/http/test_api.py", "tests/upstream/test_resilience.py",
                       "tests/core/test_service_rules.py", "tests/core/test_derive.py"]),
    "admin_auth": ("gateway/http/admin.py",
                   [f"gateway.http.admin.x_{f}*"
                    for f in ("token_matches", "_admin", "_status_denied")],
                   ["tests/http/test_admin.py"]),
    "service": ("gateway/core/service.py",
                [f"{SERVICE}{f}*" for f in SERVICE_PARTS],
                ["tests/http/test_api.py", "tests/upstream/test_resilience.py",
                 "tests/core/test_cache_key.py", "tests/core/test_derive.py",
                 "tests/core/test_coalescing_replicas.py",
                 "tests/core/test_service_rules.py", "tests/store/test_store_faults.py",
                 "tests/core/test_ledger_honesty.py"]),
    # The flight table and the locks across processes (gateway.core.coalesce).
    "coalesce": ("gateway/core/coalesce.py",
                 [f"gateway.core.coalesce.xǁFlightsǁ{f}*"
                  for f in ("start", "land", "claim", "follow_shared")],
                 ["tests/http/test_api.py", "tests/core/test_coalescing_replicas.py",
                  "tests/core/test_ledger_honesty.py", "tests/upstream/test_resilience.py"]),
    "derive": ("gateway/core/derive.py", ["gateway.core.derive.*"],
               ["tests/core/test_derive.py"]),
    "sqlite": ("gateway/store/sqlite/store.py",
               [f"{SQLITE}{part}*" for part in STORE_PARTS]
               + ["gateway.store.sqlite.store.x__transact*"],
               ["tests/store/test_store_contract.py", "tests/store/test_store_faults.py",
                "tests/core/test_quota.py"]),
    "redis": ("gateway/store/redis/store.py",
              [f"{REDIS}{part}*" for part in (*STORE_PARTS, "_end_one")],
              ["tests/store/test_store_contract.py", "tests/core/test_quota.py"]),
    # What an answer is (success, error envelope, garbage) and whether it was billed...
    "upstream": ("gateway/upstream/__init__.py",
                 ["gateway.upstream.xǁUpstreamClientǁ_interpret*",
                  "gateway.upstream.x_mark_billed*",
                  "gateway.upstream.x_was_billed*",
                  "gateway.upstream.x__parse_envelope*",
                  "gateway.upstream.x__suspect*",
                  "gateway.upstream.x__sound*"],
                 ["tests/upstream/test_upstream.py", "tests/upstream/test_resilience.py"]),
    # ...and the attempts loop and its verdicts (retries, redirects, caps, timeouts): every
    # mutant runs every upstream test, so this one is sampled (--sample).
    "upstream_call": ("gateway/upstream/__init__.py",
                      ["gateway.upstream.xǁUpstreamClientǁ_call*",
                       "gateway.upstream.xǁUpstreamClientǁrecognize*"],
                      ["tests/upstream/test_upstream.py", "tests/upstream/test_resilience.py"]),
    # What decides the file's bytes, hash and size and what is refused; not the part
    # headers' parsing (name, filename, content type), which the differential test covers.
    "form": ("gateway/http/form.py",
             [f"gateway.http.form.{f}*" for f in (
                 "x_read_form", "x__read_streamed", "x__read_body", "x__unquote",
                 "xǁ_FileSinkǁwrite", "xǁ_FileSinkǁresult", "xǁ_MultipartParserǁfeed",
                 "xǁ_MultipartParserǁ_content", "xǁ_UrlencodedParserǁfeed")],
             ["tests/http/test_form.py"]),
}
SEED = 18  # the sample's seed: the same sample on every run of a commit
KILLED = {1, 3, 36, 37, -24, 24, 152, 255}  # a failing test, a timeout, the type checker
SURVIVED, NO_TESTS = {0}, {5, 33}


def sampled(names: list[str], size: int) -> list[str]:
    """``size`` mutants of each module, drawn with a fixed seed from those its globs name: a
    module's whole run is hours at nice 19 here, a sample's score estimates it."""
    from mutmut.__main__ import copy_also_copy_files, copy_src_dir, create_mutants

    copy_src_dir()
    copy_also_copy_files()
    create_mutants(1)  # what `mutmut run` does first; it then finds them made and unchanged
    picked: list[str] = []
    for name in names:
        file, globs, _ = MODULES[name]
        codes = json.loads((Path("mutants") / (file + ".meta")).read_text())["exit_code_by_key"]
        mine = sorted(k for k in codes if any(fnmatch.fnmatch(k, g) for g in globs))
        picked += random.Random(SEED).sample(mine, min(size, len(mine)))
    return picked


def run(names: list[str], deselect: list[str], mutants: list[str], sample: int = 0) -> None:
    from mutmut import configuration  # imported here: it reads pyproject.toml from the cwd

    cfg = configuration.config()
    cfg.pytest_add_cli_args = [*cfg.pytest_add_cli_args, *(f"--deselect={d}" for d in deselect)]
    cfg.only_mutate = sorted({MODULES[n][0] for n in names})
    tests = {t for n in names for t in MODULES[n][2] if Path(t).exists()}  # at --at REV too
    cfg.pytest_add_cli_args_test_selection = sorted(tests)
    from mutmut.__main__ import cli

    globs = mutants or (sampled(names, sample) if sample else
                        [g for n in names for g in MODULES[n][1]])
    cli(["run", "--max-children", "1", *globs], standalone_mode=False)


def unkilled(root: Path, name: str) -> list[str]:
    """The last run's survivors and untested mutants of ``name`` (those ``--again`` reruns)."""
    file, globs, _ = MODULES[name]
    meta = root / "mutants" / (file + ".meta")
    if not meta.exists():
        return []
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return sorted(k for k, v in codes.items()
                  if v in SURVIVED | NO_TESTS and any(fnmatch.fnmatch(k, g) for g in globs))


def score(root: Path, name: str) -> str:
    file, globs, _ = MODULES[name]
    meta = root / "mutants" / (file + ".meta")
    if not meta.exists():
        return f"{name:<11} not run"
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    mine = {k: v for k, v in codes.items() if any(fnmatch.fnmatch(k, g) for g in globs)}
    killed = sum(v in KILLED for v in mine.values())
    survived = sorted(k for k, v in mine.items() if v in SURVIVED)
    untested = sorted(k for k, v in mine.items() if v in NO_TESTS)
    other = len(mine) - killed - len(survived) - len(untested)
    judged = killed + len(survived) + len(untested)
    pct = f"{100 * killed / judged:5.1f}%" if judged else "  n/a"
    lines = [f"{name:<11} {pct}  killed {killed}, survived {len(survived)}, "
             f"no tests {len(untested)}, not checked {other} (of {len(mine)})"]
    lines += [f"    survived: {k}" for k in survived] + [f"    no tests: {k}" for k in untested]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE",
                        help=f"some of: {', '.join(MODULES)} (default: all)")
    parser.add_argument("--score", action="store_true", help="print the last run's scores")
    parser.add_argument("--deselect", action="append", default=[], metavar="NODEID",
                        help="leave out a test that fails on the unmutated code (say why)")
    parser.add_argument("--at", metavar="REV", help="run on `git archive REV` in"
                        " mutation-work/MODULE+.../ instead of the work tree (which others may"
                        " be changing)")
    parser.add_argument("--sample", type=int, default=0, metavar="N",
                        help="run only N mutants of each module, drawn with a fixed seed")
    parser.add_argument("--again", action="store_true",
                        help="with --at: keep the last run of these modules, take REV's tests"
                        " and rerun only its survivors (new tests get their coverage first)")
    args = parser.parse_args()
    if unknown := [n for n in args.modules if n not in MODULES]:
        parser.error(f"unknown module(s) {', '.join(unknown)}; known: {', '.join(MODULES)}")
    names = args.modules or list(MODULES)
    if args.again and args.at is None:
        parser.error("--again needs --at (the mutants kept are those of an export)")
    # One work folder per set of modules, so that each keeps its last run for --again.
    root = ROOT if args.at is None else ROOT / "mutation-work" / "+".join(names)
    again = [m for n in names for m in unkilled(root, n)] if args.again else []
    if args.again and not again:
        print("nothing to run again")
    elif args.at is not None and not args.score:
        if not args.again:
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
        # Again: only the tests are taken (mutmut copies tests/ into mutants/ on each run);
        # the sources and their mutants stay, so their results stand.
        paths = ["tests"] if args.again else []
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.at, *paths],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    os.chdir(root)
    if not args.score and (again or not args.again):
        os.nice(19)
        if not args.again:
            shutil.rmtree(root / "mutants", ignore_errors=True)
        run(names, args.deselect, again, args.sample)
    print("\n".join(score(root, n) for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
