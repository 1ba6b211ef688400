"""Build SAKE-format splits from any labelled audio pool, following the paper's construction.

A pool is a manifest of clips (`file`, `track`, `label`, `split`; general-audio clips also
carry their `question`), and a world gives question wordings, the knowledge base and text QA
(datamodules/mini/world.yaml for SAKE's labels). Users with real clips (CREMA-D, ESC-50,
Common Voice, their own) write a manifest and run

    python -m datamodules.sake build --manifest pool.jsonl --out DIR [--world world.yaml]

Invariants (tested): per attribute N train / M test edits with original != target and every
label equally often original and target (exactly so when N is a multiple of n(n-1));
generality types 1-3 and audio-locality types 1-4 as SAKE defines them; train and test use
disjoint clips; sequences hold mutually distinct original and target labels, and every
audio-locality sample in a sequence is unrelated to the original labels of all its edits.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from datamodules.schema import ATTRIBUTES, norm_label, with_options

WORLD_FILE = Path(__file__).parent / "mini" / "world.yaml"
SPLITS = ("train", "val", "test")  # of pool clips


@dataclass(frozen=True)
class PoolClip:
    file: str
    track: str  # Animal, Emotion, Gender, Language or DynamicSuperb/<Task>
    label: str
    split: str  # train, val or test
    question: str | None = None  # general-audio clips: their question with options


@dataclass(frozen=True)
class SplitSizes:
    train_per_attribute: int = 1000
    val_per_attribute: int = 100
    test_per_attribute: int = 300
    sequences: int = 10
    sequence_length: int = 10


def load_world(path: str | Path = WORLD_FILE) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def read_manifest(path: str | Path) -> list[PoolClip]:
    clips = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                clips.append(PoolClip(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as err:
                raise ValueError(f"{path}: line {i + 1}: not a pool clip record ({err})") from err
    return clips


def write_manifest(clips: Iterable[PoolClip], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for c in clips:
            f.write(
                json.dumps({k: v for k, v in asdict(c).items() if v is not None}, ensure_ascii=False) + "\n"
            )


def balanced_pairs(labels: list[str], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """n ordered (original, target) pairs, cycling through shuffled rounds of all n(n-1) pairs."""
    pairs = [(o, t) for o in labels for t in labels if o != t]
    out: list[tuple[str, str]] = []
    while len(out) < n:
        rnd = pairs[:]
        rng.shuffle(rnd)
        out += rnd
    return out[:n]


class Builder:
    """Turns a pool and a world into SAKE records; deterministic for a seed."""

    def __init__(self, pool: Iterable[PoolClip], world: Mapping[str, Any], seed: int = 0) -> None:
        self.world = world
        self.attrs = {a: world["attributes"][a] for a in ATTRIBUTES if a in world["attributes"]}
        self.track_attr = {spec["track"]: a for a, spec in self.attrs.items()}
        self.rng = random.Random(seed)
        self.clips: dict[tuple[str, str, str], list[PoolClip]] = defaultdict(list)  # (split, attr, label)
        self.general: dict[str, list[PoolClip]] = defaultdict(list)  # split -> clips
        for clip in pool:
            attr = self.track_attr.get(clip.track)
            if attr is not None:
                self.clips[(clip.split, attr, norm_label(clip.label))].append(clip)
            elif clip.question:
                self.general[clip.split].append(clip)
            else:
                raise ValueError(
                    f"pool clip {clip.file}: track {clip.track!r} is no attribute and has no question"
                )
        # Validation edits use clips of their own (held out from any pretraining on the train
        # clips) when the pool has a val split; otherwise they share the train clips.
        self.val_split = "val" if any(k[0] == "val" for k in self.clips) else "train"
        for split in sorted({"train", "test", self.val_split}):
            for attr, spec in self.attrs.items():
                for label in spec["labels"]:
                    if len(self.clips[(split, attr, norm_label(label))]) < 3:
                        raise ValueError(
                            f"pool: {split} split needs >= 3 clips of {attr} {label!r} (generality)"
                        )
            if not self.general[split]:
                raise ValueError(f"pool: {split} split has no general-audio clips (audio locality type 4)")
        files = {s: {c.file for k, v in self.clips.items() if k[0] == s for c in v} for s in SPLITS}
        for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
            if files[a] & files[b]:
                raise ValueError(f"pool: {len(files[a] & files[b])} clips are in both {a} and {b}")

    # ------------------------------------------------------------------------ queries
    def question(self, attr: str, kind: str = "reliability") -> str:
        labels = list(self.attrs[attr]["labels"])
        self.rng.shuffle(labels)
        return with_options(self.rng.choice(self.attrs[attr][kind]), labels)

    def clip(self, split: str, attr: str, label: str, exclude: Iterable[str] = ()) -> PoolClip:
        excluded = set(exclude)
        options = [c for c in self.clips[(split, attr, norm_label(label))] if c.file not in excluded]
        return self.rng.choice(options)

    def audio_query(self, split: str, attr: str, label: str) -> dict[str, str]:
        c = self.clip(split, attr, label)
        return {"track": c.track, "file": c.file, "question": self.question(attr), "answer": label}

    def portability(self, attr: str, original: str, target: str, file: str) -> dict[str, str] | None:
        """A knowledge question whose right option differs between original and target."""
        cats = []
        for name, cat in self.world["knowledge"].get(attr, {}).items():
            facts = cat["facts"]
            if norm_label(facts[original]) != norm_label(facts[target]):
                cats.append((name, cat))
        if not cats:
            return None
        name, cat = self.rng.choice(cats)
        facts = cat["facts"]
        others = sorted(
            {
                f
                for lab, f in facts.items()
                if norm_label(f) not in {norm_label(facts[original]), norm_label(facts[target])}
            }
        )
        options = [facts[target], facts[original], *self.rng.sample(others, min(2, len(others)))]
        self.rng.shuffle(options)
        return {
            "file": file,
            "question": with_options(cat["question"], options),
            "answer": facts[target],
            "category": name,
        }

    def text_query(self) -> dict[str, Any]:
        qa = self.rng.choice(self.world["text_qa"])
        options = list(qa["options"])
        self.rng.shuffle(options)
        return {
            "question": with_options(qa["question"], options),
            "answer": qa["answer"],
            "original_answer": options.index(qa["answer"]),
            "subject": qa["subject"],
        }

    # ---------------------------------------------------------------------- instances
    def instance(
        self,
        split: str,
        attr: str,
        original: str,
        target: str,
        *,
        avoid: frozenset[str] = frozenset(),
        portability: bool = False,
        track: bool = False,
    ) -> dict[str, Any]:
        """One SAKE record. `avoid`: labels no audio-locality sample may carry (sequence rule 2)."""
        labels = self.attrs[attr]["labels"]
        edit = self.clip(split, attr, original)
        rel = self.question(attr)
        para = self.question(attr, "paraphrase")
        other2 = self.clip(split, attr, original, exclude=[edit.file])
        other3 = self.clip(split, attr, original, exclude=[edit.file, other2.file])
        generality = [
            {"file": edit.file, "question": para, "answer": target},  # type 1: same audio, paraphrase
            {"file": other2.file, "question": rel, "answer": target},  # type 2: other clip, same question
            {"file": other3.file, "question": para, "answer": target},  # type 3: other clip and paraphrase
        ]
        blocked = {norm_label(x) for x in avoid}
        other_attr = self.rng.choice([a for a in self.attrs if a != attr])
        free = [lab for lab in self.attrs[other_attr]["labels"] if norm_label(lab) not in blocked]
        locality = [self.audio_query(split, other_attr, self.rng.choice(free))]  # type 1: another attribute
        if attr != "gender":  # type 2: same attribute, neither original nor target
            rest = [
                lab
                for lab in labels
                if norm_label(lab) not in blocked | {norm_label(original), norm_label(target)}
            ]
            locality.append(self.audio_query(split, attr, self.rng.choice(rest)))
        locality.append(self.audio_query(split, attr, target))  # type 3: clips of the target label
        g = self.rng.choice(self.general[split])  # type 4: a general audio task
        locality.append({"track": g.track, "file": g.file, "question": g.question, "answer": g.label})
        rec: dict[str, Any] = {
            "file": edit.file,
            "original_answer": original,
            "edited_answer": target,
            "reliability_question": rel,
            "generality": generality,
            "locality": {"audio": locality, "text": [self.text_query()]},
        }
        if portability:
            port = self.portability(attr, original, target, edit.file)
            if port is not None:
                rec["portability"] = {"audio": port}
        if track:
            rec["track"] = self.attrs[attr]["track"]
        return rec

    def split(self, split: str, attr: str, n: int, **kw: Any) -> list[dict[str, Any]]:
        pairs = balanced_pairs(list(self.attrs[attr]["labels"]), n, self.rng)
        return [self.instance(split, attr, o, t, **kw) for o, t in pairs]

    def sequence(self, length: int) -> list[dict[str, Any]]:
        """`length` test edits whose original and target labels are all distinct."""
        slots = [a for a, spec in self.attrs.items() for _ in range(len(spec["labels"]) // 2)]
        if len(slots) < length:
            raise ValueError(
                f"a sequence of {length} edits needs {2 * length} distinct labels; "
                f"the world allows {len(slots)} disjoint pairs"
            )
        chosen = self.rng.sample(slots, length)
        edits = []
        for attr in self.attrs:
            k = chosen.count(attr)
            labels = self.rng.sample(list(self.attrs[attr]["labels"]), 2 * k)
            edits += [(attr, labels[2 * i], labels[2 * i + 1]) for i in range(k)]
        self.rng.shuffle(edits)
        originals = frozenset(o for _, o, _ in edits)
        return [
            self.instance("test", a, o, t, avoid=originals, portability=True, track=True) for a, o, t in edits
        ]

    def build(self, sizes: SplitSizes) -> dict[str, Any]:
        return {
            "train": {a: self.split("train", a, sizes.train_per_attribute) for a in self.attrs},
            "val": [
                r
                for a in self.attrs
                for r in self.split(self.val_split, a, sizes.val_per_attribute, track=True)
            ],
            "test": {
                a: self.split("test", a, sizes.test_per_attribute, portability=True) for a in self.attrs
            },
            "sequences": [self.sequence(sizes.sequence_length) for _ in range(sizes.sequences)],
        }


def write_splits(splits: Mapping[str, Any], out: str | Path) -> Path:
    """Write splits in the SAKE release layout under out/data; returns that folder."""
    root = Path(out) / "data"

    def dump(obj: Any, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")

    for attr, recs in splits["train"].items():
        dump(recs, root / "train" / f"{attr.capitalize()}.json")
    dump(splits["val"], root / "train" / "ALL_val.json")
    for attr, recs in splits["test"].items():
        dump(recs, root / "test" / "single_editing" / f"{attr.capitalize()}.json")
    seq_dir = root / "test" / "sequential_editing"
    dump(splits["sequences"], seq_dir / "all_sequences.json")
    for i, seq in enumerate(splits["sequences"]):
        dump(seq, seq_dir / "sequences" / f"seq_{i}.json")
    return root
