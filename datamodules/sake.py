"""Load and check SAKE-format data (the real release, SAKE-mini, or a user-built split).

    python -m datamodules.sake check DATA_DIR [--audio-root DIR]
    python -m datamodules.sake build-mini --out DIR [--seed N] [--train-per-attribute N ...]

Layout (DATA_DIR or DATA_DIR/data):
    train/{Animal,Emotion,Gender,Language}.json      edit instances per attribute
    train/ALL_val.json                               validation instances, each with "track"
    test/single_editing/{Animal,...}.json            test instances, with portability
    test/sequential_editing/all_sequences.json       10 lists of 10 instances, with "track"
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from datamodules.audio_io import AudioError, AudioResolver, load_audio
from datamodules.schema import ATTRIBUTES, EditInstance, SchemaError, attribute_of, norm_label, parse_instance

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------- check
def summarize(data: SakeData) -> list[str]:
    lines = []
    for split, items in data.splits().items():
        if not items:
            lines.append(f"{split:<11} absent")
            continue
        per_attr = Counter(i.attribute for i in items)
        lines.append(
            f"{split:<11} {len(items):>6} instances  " + "  ".join(f"{a}={per_attr[a]}" for a in ATTRIBUTES)
        )
        for attr in ATTRIBUTES:
            sub = [i for i in items if i.attribute == attr]
            if sub:
                orig = Counter(norm_label(i.original) for i in sub)
                targ = Counter(norm_label(i.target) for i in sub)
                labels = sorted(set(orig) | set(targ))
                lines.append(
                    f"  {attr:<9} original/target: "
                    + ", ".join(f"{lab} {orig[lab]}/{targ[lab]}" for lab in labels)
                )
    if data.sequences:
        lines.append(
            f"sequences  {len(data.sequences)} of lengths {sorted({len(s) for s in data.sequences})}"
        )
    return lines


def answer_warnings(items: Iterable[EditInstance]) -> list[str]:
    out = []
    for inst in items:
        for q in inst.queries():
            if norm_label(q.answer) not in {norm_label(o) for o in q.options}:
                where = f"{inst.source}: record {inst.index}: {q.name}"
                out.append(f"{where}: answer {q.answer!r} is not among its options")
    return out


def audio_problems(
    items: Iterable[EditInstance], resolver: AudioResolver, rate: int = 16000
) -> tuple[int, list[str]]:
    """(number of distinct audio references, problems) for every audio file the items use."""
    refs = {(q.file, q.track) for inst in items for q in inst.queries() if q.file}
    problems = []
    for file, track in sorted(refs, key=lambda r: (r[1] or "", r[0])):
        try:
            load_audio(resolver.path(file, track), rate)
        except AudioError as err:
            problems.append(str(err))
    return len(refs), problems


def check(path: str | Path, audio_root: str | Path | None = None, show: int = 5) -> int:
    """Validate a dataset; print counts and problems. Returns the process exit code."""
    try:
        data = SakeData.load(path)
    except (SchemaError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"SAKE data at {data.root}")
    print("\n".join(summarize(data)))
    items = [i for split in data.splits().values() for i in split]
    warnings = answer_warnings(items)
    if warnings:
        print(f"warning: {len(warnings)} answers not among their options, e.g.:")
        print("\n".join(f"  {w}" for w in warnings[:show]))
    if audio_root is None:
        return 0
    try:
        resolver = AudioResolver(audio_root)
    except AudioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n, problems = audio_problems(items, resolver)
    print(f"audio: {n} files referenced, {len(problems)} missing or unreadable")
    for p in problems[:show]:
        print(f"  {p}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datamodules.sake", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate a SAKE-format dataset")
    c.add_argument("data_dir", type=Path)
    c.add_argument("--audio-root", type=Path, default=None)
    b = sub.add_parser("build-mini", help="build the offline SAKE-mini world")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--train-per-attribute", type=int, default=None)
    b.add_argument("--test-per-attribute", type=int, default=None)
    b.add_argument("--val-per-attribute", type=int, default=None)
    b.add_argument("--clips-per-label", type=int, default=None, help="scale of the audio pools")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "check":
        return check(args.data_dir, args.audio_root)
    from datamodules.mini.build import MiniSizes, build_mini

    overrides = {
        k: v for k, v in vars(args).items() if k.endswith(("per_attribute", "per_label")) and v is not None
    }
    build_mini(args.out, seed=args.seed, sizes=MiniSizes(**overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
