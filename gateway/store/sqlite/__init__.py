"""The SQLite backend: ``store`` (the Store), ``schema`` (migrations, probes, preparing a
file), ``check`` (``gateway check-store`` on SQLite files)."""

from gateway.store.sqlite.schema import (
    CACHE_MIGRATIONS,
    CACHE_PROBE,
    LEDGER_MIGRATIONS,
    LEDGER_PROBE,
    cache_path_for,
    prepare_file,
)
from gateway.store.sqlite.store import SQLiteStore

__all__ = [
    "CACHE_MIGRATIONS",
    "CACHE_PROBE",
    "LEDGER_MIGRATIONS",
    "LEDGER_PROBE",
    "SQLiteStore",
    "cache_path_for",
    "prepare_file",
]
