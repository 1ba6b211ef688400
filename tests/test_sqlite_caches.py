"""The SQLite caches open in write-ahead-log mode even while another process holds the file."""

import sqlite3
import threading

import pytest

from common.sqlite import connect_wal


def test_a_fresh_database_locked_by_another_connection_is_switched_to_wal_once_released(tmp_path):
    """Switching to WAL is not covered by SQLite's busy timeout: two ranks opening a new cache
    at once saw "database is locked". The switch is retried until the other side lets go."""
    path = tmp_path / "cache.sqlite"
    holder = sqlite3.connect(path, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        sqlite3.connect(path, timeout=0.05).execute("PRAGMA journal_mode=WAL")
    threading.Timer(0.5, holder.rollback).start()
    db = connect_wal(path, timeout=0.05)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    holder.close()


def test_other_errors_are_not_retried(tmp_path):
    (tmp_path / "not-a-db").write_bytes(b"plain text, not a database file" * 100)
    with pytest.raises(sqlite3.DatabaseError, match="not a database"):
        connect_wal(tmp_path / "not-a-db")
