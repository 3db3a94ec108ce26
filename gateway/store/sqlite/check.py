"""``gateway check-store`` on the SQLite files: verify them and, where SQLite can, repair them.

The cache is expendable (it costs money to refill, nothing more): a damaged cache file is
moved aside and recreated. The ledger is the record of spend: it is copied page by page
into a fresh file (``VACUUM INTO``) and replaced only if the copy checks clean; otherwise
the operator restores it from a backup.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time

from gateway.config import Config
from gateway.store.sqlite.schema import (
    CACHE_MIGRATIONS,
    CACHE_PROBE,
    LEDGER_MIGRATIONS,
    LEDGER_PROBE,
    cache_path_for,
    create_private,
    prepare_file,
    quarantine,
)


def check_sqlite(config: Config, *, repair: bool) -> int:
    """0: healthy (or repaired); 1: damage left for the operator; prints one line a finding."""
    ledger = config.storage.path
    cache = config.storage.cache_path or cache_path_for(ledger)
    status = 0
    if not os.path.exists(ledger):  # a mistyped path must not read as a healthy store
        print(f"ledger {ledger}: MISSING (no such file; `gateway serve` creates it)")
        return 1
    problem = _integrity(ledger)
    if problem is None:
        print(f"ledger {ledger}: ok ({_pending(ledger)} pending reservations)")
    elif not repair:
        print(f"ledger {ledger}: DAMAGED: {problem} (run with --repair, or restore a backup)")
        status = 1
    else:
        status = max(status, _repair_ledger(ledger, problem))
    if not os.path.exists(cache):
        print(f"cache {cache}: none yet (created empty on start; quota data is unaffected)")
        return status
    problem = _integrity(cache)
    if problem is None:
        fixed = _fix_totals(cache) if repair else False
        note = "; totals recomputed" if fixed else ""
        print(f"cache {cache}: ok ({_entries(cache)} entries{note})")
    elif not repair:
        print(
            f"cache {cache}: DAMAGED: {problem} (run with --repair: it is moved aside and "
            "recreated empty; quota data is unaffected)"
        )
        status = 1
    else:
        aside = quarantine(cache)
        prepare_file(cache, CACHE_MIGRATIONS, CACHE_PROBE)
        print(f"cache {cache}: was damaged ({problem}); moved to {aside}, recreated empty")
    return status


def _integrity(path: str) -> str | None:
    """None if ``path`` (which exists) checks clean, else what SQLite reports."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA integrity_check(20)")]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return str(exc)
    return None if rows == ["ok"] else "; ".join(rows)


def _repair_ledger(path: str, problem: str) -> int:
    """Copy the readable pages into a new file (0600 from the start: it holds the spend),
    rebuild its indexes from the tables (VACUUM INTO copies a damaged index as it is), and
    swap it in only if it checks clean."""
    copy = f"{path}.repair-{int(time.time())}"
    create_private(copy)  # empty: VACUUM INTO accepts it and keeps its mode
    try:
        conn = sqlite3.connect(path, timeout=10)
        try:
            conn.execute("VACUUM INTO ?", (copy,))
        finally:
            conn.close()
        conn = sqlite3.connect(copy, timeout=10)
        try:
            conn.execute("REINDEX")
            conn.commit()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        _remove(copy)
        print(f"ledger {path}: DAMAGED: {problem}; cannot copy it ({exc}): restore a backup")
        return 1
    if _integrity(copy) is not None:
        _remove(copy)
        print(f"ledger {path}: DAMAGED: {problem}; the copy is damaged too: restore a backup")
        return 1
    aside = quarantine(path)
    os.replace(copy, path)
    prepare_file(path, LEDGER_MIGRATIONS, LEDGER_PROBE)
    print(
        f"ledger {path}: was damaged ({problem}); rebuilt from its readable pages, "
        f"original kept at {aside}"
    )
    return 0


def _remove(path: str) -> None:
    for suffix in ("", "-journal", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)


def _query(path: str, sql: str) -> int:
    if not os.path.exists(path):
        return 0
    conn = sqlite3.connect(path, timeout=10)
    try:
        return int(conn.execute(sql).fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def _pending(path: str) -> int:
    return _query(path, "SELECT COUNT(*) FROM reservations")


def _entries(path: str) -> int:
    return _query(path, "SELECT COUNT(*) FROM results")


def _fix_totals(path: str) -> bool:
    """Recompute cache_totals from the rows (they are kept by triggers; this is a backstop)."""
    if not os.path.exists(path):
        return False
    conn = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN IMMEDIATE")
        actual = conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM results").fetchone()
        kept = conn.execute("SELECT entries, bytes FROM cache_totals").fetchone()
        changed = tuple(actual) != tuple(kept)
        if changed:
            conn.execute("UPDATE cache_totals SET entries = ?, bytes = ?", actual)
        conn.execute("COMMIT")
        return changed
    except sqlite3.Error:
        return False
    finally:
        conn.close()
