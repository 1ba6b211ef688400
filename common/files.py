"""Durable file writes: what is renamed into place, or what a deletion depends on, is on disk
first (the file and its folder fsynced), so a crash or a killed job never leaves a half-written
file under a final name, nor a deleted source whose replacement was still in a page cache."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: str | Path) -> None:
    """Persist a folder's entries (a rename, a new file) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, text: str) -> None:
    """Write via a temporary file, fsynced, renamed into place, the folder fsynced: readers see
    the old file or the whole new one, and after a crash the new one is there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file under `folder` and the folders themselves (before renaming it)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)
