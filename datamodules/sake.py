"""Load and check SAKE-format data (the real release, SAKE-mini, or a user-built split).

    python -m datamodules.sake check DATA_DIR [--audio-root DIR]
    python -m datamodules.sake build-mini --out DIR [--seed N] [--train-per-attribute N ...]
    python -m datamodules.sake build --manifest pool.jsonl --out DIR [--world world.yaml] [--seed N]

Layout (DATA_DIR or DATA_DIR/data):
    train/{Animal,Emotion,Gender,Language}.json      edit instances per attribute
    train/ALL_val.json                               validation instances, each with "track"
    test/single_editing/{Animal,...}.json            test instances, with portability
    test/sequential_editing/all_sequences.json       10 lists of 10 instances, with "track"
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from datamodules.audio_io import AudioError, AudioResolver, load_audio
from datamodules.loader import SakeData
from datamodules.schema import ATTRIBUTES, EditInstance, SchemaError, norm_label

log = logging.getLogger(__name__)


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
    u = sub.add_parser(
        "build", help="build SAKE splits from your own labelled clips (see datamodules/builder.py)"
    )
    u.add_argument(
        "--manifest", type=Path, required=True, help="JSONL: file, track, label, split[, question]"
    )
    u.add_argument("--out", type=Path, required=True)
    u.add_argument("--world", type=Path, default=None, help="question wordings, knowledge base, text QA")
    u.add_argument("--seed", type=int, default=0)
    for flag in (
        "train-per-attribute",
        "val-per-attribute",
        "test-per-attribute",
        "sequences",
        "sequence-length",
    ):
        u.add_argument(f"--{flag}", type=int, default=None)
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
    if args.command == "build":
        from datamodules.builder import (
            WORLD_FILE,
            Builder,
            SplitSizes,
            load_world,
            read_manifest,
            write_splits,
        )

        fields = (
            "train_per_attribute",
            "val_per_attribute",
            "test_per_attribute",
            "sequences",
            "sequence_length",
        )
        sizes = SplitSizes(**{k: getattr(args, k) for k in fields if getattr(args, k) is not None})
        world = load_world(args.world or WORLD_FILE)
        root = write_splits(Builder(read_manifest(args.manifest), world, args.seed).build(sizes), args.out)
        print(f"wrote SAKE splits to {root}; check them with: python -m datamodules.sake check {args.out}")
        return 0
    from datamodules.mini.build import MiniSizes, build_mini

    overrides = {
        k: v for k, v in vars(args).items() if k.endswith(("per_attribute", "per_label")) and v is not None
    }
    build_mini(args.out, seed=args.seed, sizes=MiniSizes(**overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
