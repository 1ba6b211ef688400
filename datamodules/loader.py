"""Load SAKE-format data: the real release, SAKE-mini, or a user-built split (layout in sake.py).

The train split is `train/ALL_train.json` when the release has one, else the attribute files
`train/{Animal,Emotion,Gender,Language}.json`. The real release's `train/ALL_val.json` repeats
400 of those attribute files' 4,000 records; training on them would validate on training data,
so the train split leaves out every record whose edit (attribute, clip, original and target
label, question) is a validation edit: 3,600 train + 400 validation edits, as the paper used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamodules.schema import ATTRIBUTES, EditInstance, SchemaError, attribute_of, parse_instance

TRAIN_DIR, VAL_FILE, ALL_TRAIN_FILE = "train", "train/ALL_val.json", "train/ALL_train.json"
TEST_DIR, SEQ_FILE = "test/single_editing", "test/sequential_editing/all_sequences.json"


def data_root(path: str | Path) -> Path:
    """DATA_DIR itself or its data/ subfolder, whichever holds train/ or test/."""
    path = Path(path)
    for cand in (path, path / "data"):
        if (cand / "train").is_dir() or (cand / "test").is_dir():
            return cand
    raise FileNotFoundError(f"{path}: no SAKE layout here (expected train/ or test/, or data/train/ ...)")


def train_files(root: Path) -> list[tuple[Path, str | None]]:
    """(file, attribute from its name or None) of the train split: ALL_train.json or the
    attribute files."""
    if (root / ALL_TRAIN_FILE).is_file():
        return [(root / ALL_TRAIN_FILE, None)]
    found = [(root / TRAIN_DIR / f"{a.capitalize()}.json", a) for a in ATTRIBUTES]
    return [(p, a) for p, a in found if p.is_file()]


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SchemaError(str(path), None, "<file>", f"not valid JSON ({err})") from err


def read_records(path: Path) -> list[Any]:
    records = read_json(path)
    if not isinstance(records, list):
        raise SchemaError(
            str(path), None, "<file>", f"expected a list of records, got {type(records).__name__}"
        )
    return records


def edit_key(record: Mapping[str, Any], attribute: str | None) -> tuple:
    """What makes two raw records the same edit: attribute, clip, labels and question."""
    track = record.get("track")
    attr = attribute_of(track) if isinstance(track, str) else attribute
    fields = ("file", "original_answer", "edited_answer", "reliability_question")
    return (attr, *(str(record.get(k, "")).strip().casefold() for k in fields))


def validation_keys(root: Path) -> frozenset[tuple]:
    """The edit keys of the validation records (empty without ALL_val.json)."""
    path = root / VAL_FILE
    return frozenset(edit_key(r, None) for r in read_records(path)) if path.is_file() else frozenset()


def load_file(
    path: str | Path, with_portability: bool = False, exclude: frozenset[tuple] = frozenset()
) -> list[EditInstance]:
    """All instances of one SAKE JSON file (a list of records), except those whose edit key is in
    `exclude`; instances keep their index in the file."""
    path = Path(path)
    return _instances(read_records(path), path, attribute_of(path.stem), with_portability, exclude)


def _instances(
    records: list[Any], path: Path, attribute: str | None, with_portability: bool, exclude: frozenset[tuple]
) -> list[EditInstance]:
    return [
        parse_instance(r, str(path), i, attribute, with_portability)
        for i, r in enumerate(records)
        if not (isinstance(r, Mapping) and edit_key(r, attribute) in exclude)
    ]


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
    """The splits of one SAKE-format dataset; absent files give empty splits. `overlap` counts
    the train records left out because they are validation edits."""

    root: Path
    train: list[EditInstance] = field(default_factory=list)
    val: list[EditInstance] = field(default_factory=list)
    test: list[EditInstance] = field(default_factory=list)
    sequences: list[list[EditInstance]] = field(default_factory=list)
    overlap: int = 0

    @classmethod
    def load(cls, path: str | Path) -> SakeData:
        root = data_root(path)
        data = cls(root)
        if (root / VAL_FILE).is_file():
            data.val = load_file(root / VAL_FILE)
        held_out = validation_keys(root)
        for file, attribute in train_files(root):
            records = read_records(file)
            kept = _instances(records, file, attribute, False, held_out)
            data.train += kept
            data.overlap += len(records) - len(kept)
        for name in ATTRIBUTES:
            if (f := root / TEST_DIR / f"{name.capitalize()}.json").is_file():
                data.test += load_file(f, with_portability=True)
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
