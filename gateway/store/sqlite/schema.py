"""The SQLite files' shape, in one place: both files' migrations, the probes that prove a file
readable, and preparing a file (created 0600, WAL, migrated). Read by the store, by
``gateway check-store`` (``gateway.store.sqlite.check``) and by the tests that build an older
file."""

from __future__ import annotations

import os
import random
import sqlite3
import time
from pathlib import Path

Migrations = tuple[tuple[str, str], ...]

LEDGER_MIGRATIONS: Migrations = (
    (
        "quota ledger and meta",
        """
        CREATE TABLE quota_usage (
            team      TEXT NOT NULL,
            period    TEXT NOT NULL,
            used      INTEGER NOT NULL DEFAULT 0,
            hits      INTEGER NOT NULL DEFAULT 0,
            coalesced INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (team, period)
        );
        CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    ),
    (
        "pending reservations",
        """
        CREATE TABLE reservations (
            id         TEXT PRIMARY KEY,
            team       TEXT NOT NULL,
            period     TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE INDEX reservations_by_age ON reservations(created_at);
    """,
    ),
    (
        "reservation owners, the sent mark, undelivered charges",
        """
        -- Rows from before this migration are taken as sent: their charge is kept.
        ALTER TABLE reservations ADD COLUMN owner TEXT NOT NULL DEFAULT '';
        ALTER TABLE reservations ADD COLUMN sent INTEGER NOT NULL DEFAULT 1;
        CREATE INDEX reservations_by_owner ON reservations(owner);
        ALTER TABLE quota_usage ADD COLUMN undelivered INTEGER NOT NULL DEFAULT 0;
        CREATE TABLE owners (
            id      TEXT PRIMARY KEY,
            host    TEXT NOT NULL,
            pid     INTEGER NOT NULL,
            started TEXT NOT NULL,
            beat    INTEGER NOT NULL DEFAULT 0
        );
    """,
    ),
    (
        "team keys issued through the store",
        """
        CREATE TABLE team_keys (
            id           TEXT PRIMARY KEY,
            team         TEXT NOT NULL,
            key_hash     TEXT NOT NULL,
            label        TEXT NOT NULL DEFAULT '',
            created_at   REAL NOT NULL,
            expires_at   REAL,
            revoked_at   REAL,
            last_used_at REAL,
            uses         INTEGER NOT NULL DEFAULT 0
        );
    """,
    ),
    (
        "derived hits counted apart (still within hits)",
        """
        ALTER TABLE quota_usage ADD COLUMN derived INTEGER NOT NULL DEFAULT 0;
    """,
    ),
)

CACHE_MIGRATIONS: Migrations = (
    (
        "results with totals kept by triggers",
        """
        CREATE TABLE results (
            key          TEXT PRIMARY KEY,
            content_hash TEXT NOT NULL,
            type         TEXT NOT NULL,
            params       TEXT NOT NULL,
            scope        TEXT NOT NULL DEFAULT '',
            data         BLOB NOT NULL,
            size         INTEGER NOT NULL,
            created_at   REAL NOT NULL,
            last_hit_at  REAL NOT NULL,
            hit_count    INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX results_by_hash ON results(content_hash, scope);
        CREATE INDEX results_by_last_hit ON results(last_hit_at);
        CREATE INDEX results_by_created ON results(created_at);
        CREATE TABLE cache_totals (
            id      INTEGER PRIMARY KEY CHECK (id = 1),
            entries INTEGER NOT NULL,
            bytes   INTEGER NOT NULL
        );
        INSERT INTO cache_totals VALUES (1, 0, 0);
        CREATE TRIGGER results_ins AFTER INSERT ON results BEGIN
            UPDATE cache_totals SET entries = entries + 1, bytes = bytes + NEW.size;
        END;
        CREATE TRIGGER results_del AFTER DELETE ON results BEGIN
            UPDATE cache_totals SET entries = entries - 1, bytes = bytes - OLD.size;
        END;
        CREATE TRIGGER results_upd AFTER UPDATE OF size ON results BEGIN
            UPDATE cache_totals SET bytes = bytes - OLD.size + NEW.size;
        END;
    """,
    ),
)


def is_corrupt(exc: BaseException) -> bool:
    """SQLITE_CORRUPT or SQLITE_NOTADB: the file is damaged (not merely busy or locked)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in (11, 26)


def cache_path_for(path: str) -> str:
    """``data/gateway.db`` -> ``data/gateway-cache.db``."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}-cache{p.suffix or '.db'}"))


def create_private(path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # Created 0600 before SQLite touches it: the files hold paid-for results and spend.
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))


def migrate(conn: sqlite3.Connection, migrations: Migrations) -> None:
    """Apply what this file has not seen yet, in order, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        for number, (_name, sql) in enumerate(migrations, start=1):
            if number > version:
                for statement in _statements(sql):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def prepare_file(path: str, migrations: Migrations, probe: str, *, verify: bool = False) -> None:
    """Create (0600), switch to WAL, migrate, and read ``probe``: raises sqlite3 errors.

    ``verify``: also run ``PRAGMA integrity_check`` (the ledger: small, and a damaged index
    there reads as "no usage yet", which would let a spent team spend again)."""
    create_private(path)
    conn = sqlite3.connect(path, isolation_level=None, timeout=PREPARE_TIMEOUT_S)
    try:
        _switch_to_wal(conn)
        if verify:
            problems = [row[0] for row in conn.execute("PRAGMA integrity_check(5)")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("integrity check failed: " + "; ".join(problems))
        migrate(conn, migrations)
        conn.execute(probe).fetchall()
    finally:
        conn.close()


PREPARE_TIMEOUT_S = 10.0


def _switch_to_wal(conn: sqlite3.Connection) -> None:
    """``PRAGMA journal_mode = WAL``, waiting for other processes doing the same.

    Switching a file to WAL needs it to itself for a moment, and SQLite answers "database is
    locked" at once rather than through the busy timeout when another connection is in the
    middle of it: two workers starting together on a new file (``server.workers = 2``), or
    two gateways, failed that way about half the time (tests/store/test_store_faults.py)."""
    deadline = time.monotonic() + PREPARE_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = "locked" in str(exc) or "busy" in str(exc)
            if not busy or time.monotonic() >= deadline:
                raise
        time.sleep(0.01 + random.random() * 0.02)


def quarantine(path: str) -> str:
    """Move a corrupt file (and its WAL/SHM) aside; returns where it went."""
    aside = f"{path}.corrupt-{int(time.time())}"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, aside + suffix)
    return aside


CACHE_PROBE = (
    "SELECT entries, bytes FROM cache_totals JOIN (SELECT key FROM results "
    "ORDER BY last_hit_at LIMIT 1) ON 1"
)
LEDGER_PROBE = "SELECT COUNT(*) FROM quota_usage"


def _statements(sql: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies whole."""
    out, buf = [], ""
    for line in sql.strip().splitlines():
        buf += line + "\n"
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out
