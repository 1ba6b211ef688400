"""SQLite caches shared by processes (the ranks of a run, runs side by side)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

# Back-off between tries of switching a database to write-ahead logging, in seconds (~6 s in all).
_WAL_WAITS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)


def connect_wal(path: str | Path, timeout: float = 60.0) -> sqlite3.Connection:
    """A connection to `path` in write-ahead-log mode (readers and one writer side by side).

    Switching a new database to WAL needs a lock that SQLite does not wait for (its busy timeout
    does not cover it): two processes that open a fresh file at once can find it "locked". The
    switch is retried after a short wait; it is a no-op once the file is in WAL mode."""
    db = sqlite3.connect(path, timeout=timeout)
    for wait in (*_WAL_WAITS, None):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or wait is None:
                db.close()
                raise
            time.sleep(wait)
    return db
