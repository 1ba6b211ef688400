"""CSV output shared by the analyses."""

from __future__ import annotations

import csv
from pathlib import Path


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows of dicts (the first row's keys are the header) to `path`."""
    if not rows:
        raise ValueError(f"{path}: no rows to write")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
