"""One process per run folder: an advisory lock held for the whole run.

A second `evaluate.py` in a folder that another process is writing would append the same
instances twice. The lock is `fcntl.flock` on `.lock`, held on an open descriptor for as long
as the run lasts: the kernel grants it to one process at a time and releases it when that
process ends however it ends (a crash or SIGKILL leaves no stale lock to clean up). Existence
of the file means nothing; its content (JSON with the holder's PID, host and start time,
written once the lock is held) only names the holder in the refusal.

The file is never removed: removing it would let a process that opened the old file and one
that creates a new one both hold "the" lock. `flock` is per host on some network file
systems (NFS without lock forwarding); a run folder shared by several hosts needs one that
forwards locks.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

LOCK = ".lock"


class RunLocked(RuntimeError):
    """Another live process holds the run folder."""


class RunLock:
    """`with RunLock(folder):` holds `folder/.lock` for the block, or raises `RunLocked`."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunLocked(
                f"{self.path.parent} is in use by PID {holder.get('pid', '?')} on {holder.get('host', '?')} "
                f"(since {holder.get('since', '?')}); wait for it to finish or pick another run_name=..."
            ) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # names no holder once released
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read(fd: int) -> dict:
    """The holder as it wrote itself; empty while it is still writing (or an older format)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
