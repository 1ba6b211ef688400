"""One process per run folder: a lock file naming its holder.

A second `evaluate.py` in a folder that another process is writing would append the same
instances twice. The lock (`.lock`, JSON with the holder's PID, host and start time) is created
exclusively; a process that finds it refuses, naming the holder, unless the holder is a process
of this host that no longer exists (a killed run), whose lock it takes over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

LOCK = ".lock"


class RunLocked(RuntimeError):
    """Another live process holds the run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class RunLock:
    """`with RunLock(folder):` holds `folder/.lock` for the block."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}

    def _create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({**self.me, "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def __enter__(self) -> RunLock:
        for _ in range(3):
            if self._create():
                return self
            try:
                holder = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # half-written by a process that died: stale
                holder = {}
            gone = not holder or (holder.get("host") == self.me["host"] and not _alive(int(holder["pid"])))
            if gone:
                log.warning("%s: taking over the lock of a finished process (%s)", self.path.parent, holder)
                self.path.unlink(missing_ok=True)
                continue
            raise RunLocked(
                f"{self.path.parent} is in use by PID {holder.get('pid')} on {holder.get('host')} "
                f"(since {holder.get('since')}); wait for it to finish, pick another run_name=..., or "
                f"remove {self.path} if that process is gone"
            )
        raise RunLocked(f"{self.path}: could not take the lock")

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.path.unlink(missing_ok=True)
