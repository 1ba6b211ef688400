"""Load SAKE-format data: the real release, SAKE-mini, or a user-built split (layout in sake.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from datamodules.schema import ATTRIBUTES, EditInstance, SchemaError, attribute_of, parse_instance

TRAIN_DIR, VAL_FILE = "train", "train/ALL_val.json"
TEST_DIR, SEQ_FILE = "test/single_editing", "test/sequential_editing/all_sequences.json"


def data_root(path: str | Path) -> Path:
    """DATA_DIR itself or its data/ subfolder, whichever holds train/ or test/."""
    path = Path(path)
    for cand in (path, path / "data"):
        if (cand / "train").is_dir() or (cand / "test").is_dir():
            return cand
    raise FileNotFoundError(f"{path}: no SAKE layout here (expected train/ or test/, or data/train/ ...)")


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SchemaError(str(path), None, "<file>", f"not valid JSON ({err})") from err


def load_file(path: str | Path, with_portability: bool = False) -> list[EditInstance]:
    """All instances of one SAKE JSON file (a list of records, or a list of lists for sequences)."""
    path = Path(path)
    records = read_json(path)
    if not isinstance(records, list):
        raise SchemaError(
            str(path), None, "<file>", f"expected a list of records, got {type(records).__name__}"
        )
    attribute = attribute_of(path.stem)
    return [parse_instance(r, str(path), i, attribute, with_portability) for i, r in enumerate(records)]


def load_sequences(path: str | Path) -> list[list[EditInstance]]:
    path = Path(path)
    seqs = read_json(path)
    if not isinstance(seqs, list) or not all(isinstance(s, list) for s in seqs):
        raise SchemaError(str(path), None, "<file>", "expected a list of sequences (lists of records)")
    out, index = [], 0
    for seq in seqs:
        out.append([parse_instance(r, str(path), index + i, None, True) for i, r in enumerate(seq)])
        index += len(seq)
    return out


@dataclass
class SakeData:
    """The splits of one SAKE-format dataset; absent files give empty splits."""

    root: Path
    train: list[EditInstance] = field(default_factory=list)
    val: list[EditInstance] = field(default_factory=list)
    test: list[EditInstance] = field(default_factory=list)
    sequences: list[list[EditInstance]] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> SakeData:
        root = data_root(path)
        data = cls(root)
        for name in ATTRIBUTES:
            stem = name.capitalize()
            if (f := root / TRAIN_DIR / f"{stem}.json").is_file():
                data.train += load_file(f)
            if (f := root / TEST_DIR / f"{stem}.json").is_file():
                data.test += load_file(f, with_portability=True)
        if (root / VAL_FILE).is_file():
            data.val = load_file(root / VAL_FILE)
        if (root / SEQ_FILE).is_file():
            data.sequences = load_sequences(root / SEQ_FILE)
        return data

    def splits(self) -> dict[str, list[EditInstance]]:
        return {
            "train": self.train,
            "val": self.val,
            "test": self.test,
            "sequential": [i for s in self.sequences for i in s],
        }
