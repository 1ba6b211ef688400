"""Load and check SAKE-format data (the real release, SAKE-mini, or a user-built split).

    python -m datamodules.sake check DATA_DIR [--audio-root DIR]
    python -m datamodules.sake build-mini --out DIR [--seed N] [--train-per-attribute N ...] [--if-missing]
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
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from common.progress import progress_bar
from datamodules.audio_io import AudioError, AudioResolver, load_audio
from datamodules.availability import MissingAudio, find_missing
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
    if data.overlap:
        lines.append(f"train      {data.overlap} records left out: they are validation edits (ALL_val.json)")
    if data.sequences:
        lines.append(
            f"sequences  {len(data.sequences)} of lengths {sorted({len(s) for s in data.sequences})}"
        )
    return lines


def option_report(items: Iterable[EditInstance]) -> list[str]:
    """Per track: distinct questions, how many state readable options, and how many answers
    name one of them (label ids such as `vocal_fry` or `C` resolved)."""
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    seen: set[tuple[str, str, str]] = set()
    for inst in items:
        for q in inst.queries():
            track = q.track or "text QA"
            if (track, q.question, q.answer) in seen:
                continue
            seen.add((track, q.question, q.answer))
            row = per[track]
            row[0] += 1
            row[1] += bool(q.options)
            row[2] += q.truth is not None

    def short(track: str, width: int = 48) -> str:
        track = track.removeprefix("DynamicSuperb/")
        return track if len(track) <= width else track[: width - 3] + "..."

    lines = ["options per track (distinct questions; general-audio tasks by their DynamicSuperb/ name):",
             f"  {'':<48} questions  with options  answer is one"]  # fmt: skip
    for track in sorted(per, key=lambda t: (t.startswith("DynamicSuperb/"), t)):
        n, with_options, resolved = per[track]
        lines.append(f"  {short(track):<48} {n:>9}  {with_options:>12}  {resolved:>13}")
    return lines


def answer_warnings(items: Iterable[EditInstance]) -> list[str]:
    out = []
    for inst in items:
        for q in inst.queries():
            if q.options and q.truth is None:
                where = f"{inst.source}: record {inst.index}: {q.name}"
                out.append(f"{where}: answer {q.answer!r} is not among its options")
    return out


def audio_problems(
    items: Iterable[EditInstance], resolver: AudioResolver, rate: int = 16000, decode: bool = True
) -> tuple[int, MissingAudio, list[str]]:
    """(distinct audio references, the missing ones, the found ones that cannot be decoded)."""
    items = list(items)
    refs = {(q.file, q.track) for inst in items for q in inst.queries() if q.file}
    missing = find_missing(items, resolver)
    unreadable = []
    if decode:
        found = sorted(refs - missing.files, key=lambda r: (r[1] or "", r[0]))
        with progress_bar("decoding audio", len(found), "clips") as advance:
            for file, track in found:
                try:
                    load_audio(resolver.path(file, track), rate)
                except AudioError as err:
                    unreadable.append(str(err))
                advance(1)
    return len(refs), missing, unreadable


def check(path: str | Path, audio_root: str | Path | None = None, show: int = 5, decode: bool = True) -> int:
    """Validate a dataset; print counts and problems. Returns the process exit code: 2 for a
    record that breaks the schema, 1 for missing or unreadable audio, 0 otherwise."""
    try:
        data = SakeData.load(path)
    except (SchemaError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"SAKE data at {data.root}")
    print("\n".join(summarize(data)))
    items = [i for split in data.splits().values() for i in split]
    print("\n".join(option_report(items)))
    warnings = answer_warnings(items)
    if warnings:
        print(f"note: {len(warnings)} answers name none of their question's options (judged as text), e.g.:")
        print("\n".join(f"  {w}" for w in warnings[:show]))
    if audio_root is None:
        return 0
    try:
        resolver = AudioResolver(audio_root)
    except AudioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n, missing, unreadable = audio_problems(items, resolver, decode=decode)
    print(f"audio: {n} clips referenced, {len(missing.files)} missing, {len(unreadable)} unreadable")
    for track, count in sorted(missing.by_track().items()):
        examples = sorted(f for f, t in missing.files if (t or "(no track)") == track)[:show]
        print(f"  missing {track}: {count} (e.g. {', '.join(examples)})")
    for p in unreadable[:show]:
        print(f"  {p}")
    return 1 if missing.files or unreadable else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datamodules.sake", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate a SAKE-format dataset")
    c.add_argument("data_dir", type=Path)
    c.add_argument("--audio-root", type=Path, default=None, help="check that every clip is there")
    c.add_argument("--no-decode", action="store_true", help="with --audio-root: only look for the files")
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
    b.add_argument("--if-missing", action="store_true", help="do nothing where a build of this version is")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "check":
        return check(args.data_dir, args.audio_root, decode=not args.no_decode)
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
    from datamodules.mini.build import MiniSizes, build_mini, ensure_mini

    overrides = {
        k: v for k, v in vars(args).items() if k.endswith(("per_attribute", "per_label")) and v is not None
    }
    (ensure_mini if args.if_missing else build_mini)(args.out, seed=args.seed, sizes=MiniSizes(**overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
