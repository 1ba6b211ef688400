"""Build SAKE-mini: synthetic audio pools in SAKE's tracks, then SAKE splits over them.

    python -m datamodules.sake build-mini --out data/sake_mini [--seed 0]

Output (deterministic for a seed):
    data/...            the SAKE release layout (train, val, single and sequential test)
    audio/<track>/...   Ogg Vorbis clips at 16 kHz (Animal/, Emotion/, Gender/, Language/,
                        DynamicSuperb/<Task>/)
    pool.jsonl          every clip with its track, label and split (train clips only are for
                        pretraining the tiny LALM)
    world.yaml          the question wordings, knowledge base and text QA used
    build.json          seed, sizes and counts

The folder is built under a temporary name and renamed when complete, so an interrupted build
never leaves a folder that looks finished.

Determinism: the splits, the pool and the decoded samples of every clip are identical for a
seed (Ogg files differ only in their random stream serial numbers). Each utterance is
synthesised from a fresh espeak-ng state with libc's and espeak-ng's own random generators
seeded (see Espeak.isolated).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from common.progress import progress_bar
from datamodules.builder import Builder, PoolClip, SplitSizes, load_world, write_manifest, write_splits
from datamodules.mini.sounds import SR, animal, general
from datamodules.mini.speech import FEMALE_VARIANTS, MALE_VARIANTS, Espeak, Voice
from datamodules.schema import parse_options

log = logging.getLogger(__name__)

# What each build format changed; build.json records the one a folder was built in.
FORMATS = {1: "first release", 2: "validation edits on clips of their own, held out from pretraining"}
FORMAT = max(FORMATS)


@dataclass(frozen=True)
class MiniSizes:
    """Pool sizes (clips per label) and split sizes (edits per attribute)."""

    clips_per_label: int = 200  # emotion; gender gets 1.5x, language 2x, animals 0.6x
    general_per_label: int = 60
    test_fraction: float = 0.2
    val_fraction: float = 0.1  # extra clips, held out from pretraining: the validation edits' own
    train_per_attribute: int = 1000
    val_per_attribute: int = 100
    test_per_attribute: int = 300
    sequences: int = 10
    sequence_length: int = 10

    def per_label(self, attr: str) -> int:
        # Language needs the most distinct clips: each clip is a new sentence of 4,096 per language.
        scale = {"gender": 1.5, "language": 2.0, "animal": 0.6}.get(attr, 1.0)
        return max(5, int(round(self.clips_per_label * scale)))

    def split_sizes(self) -> SplitSizes:
        return SplitSizes(
            self.train_per_attribute, self.val_per_attribute, self.test_per_attribute,
            self.sequences, self.sequence_length,
        )  # fmt: skip


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to synthesise one clip; synthesis is a pure function of it."""

    path: str  # relative to audio/
    kind: str  # speech, animal or general
    label: str
    seed: int
    text: str = ""
    voice: Voice | None = None
    task: str = ""


@functools.cache
def _engine() -> Espeak:
    return Espeak()  # one per worker process


def _write(path: Path, wave: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.clip(wave, -1, 1), SR, format="OGG", subtype="VORBIS")


def synthesise(spec: ClipSpec, audio_root: str) -> None:
    out = Path(audio_root) / spec.path
    if spec.kind == "speech":
        _engine().isolated(spec.seed, lambda e: _write(out, e.say(spec.text, spec.voice, SR)), spec.path)
        return
    rng = np.random.default_rng(spec.seed)
    _write(out, animal(spec.label, rng) if spec.kind == "animal" else general(spec.task, spec.label, rng))


def _sentences(parts: dict[str, list[str]], rng: np.random.Generator) -> list[str]:
    """All subject-verb-object-place sentences of a language, shuffled."""
    combos = [
        " ".join(c)
        for c in itertools.product(parts["subject"], parts["verb"], parts["object"], parts["place"])
    ]
    return [combos[i] for i in rng.permutation(len(combos))]


# Language clips use one voice variant per gender: a dozen timbres on top of eight phonologies
# would make language too slow for a tiny model to learn.
LANGUAGE_VARIANTS = {"male": ("m3",), "female": ("f3",)}


def _speaker(
    rng: np.random.Generator, language: str, gender: str, fixed_timbre: bool = False
) -> dict[str, Any]:
    variants = MALE_VARIANTS if gender == "male" else FEMALE_VARIANTS
    variant = rng.choice(LANGUAGE_VARIANTS[gender] if fixed_timbre else variants)
    pitch = rng.uniform(15, 45) if gender == "male" else rng.uniform(55, 85)
    return {"language": language, "variant": str(variant), "pitch": int(pitch)}


def plan(world: dict[str, Any], sizes: MiniSizes, seed: int) -> tuple[list[ClipSpec], list[PoolClip]]:
    """The clip specs and pool entries of a build (cheap; synthesis happens later).

    Train and test clips come first; the validation clips (held out from pretraining like the
    test clips) are planned after them, so that they leave every earlier clip as it was."""
    rng = np.random.default_rng(seed)
    specs: list[ClipSpec] = []
    pool: list[PoolClip] = []
    langs = world["languages"]
    sentences = {name: _sentences(parts, rng) for name, parts in langs.items()}
    cursor = dict.fromkeys(sentences, 0)
    used: dict[str, set[int]] = {name: set() for name in sentences}

    def sentence(language: str, split: str) -> str:
        # train and test draw from disjoint halves of the shuffled sentences; validation takes
        # the test half's sentences that no test clip says, from its end
        pool_ = sentences[language]
        half = len(pool_) // 2
        if split == "val":
            index = next(j for j in range(len(pool_) - 1, half - 1, -1) if j not in used[language])
        else:
            i = cursor[language]
            cursor[language] += 1
            index = i % half if split == "train" else half + i % (len(pool_) - half)
        used[language].add(index)
        return pool_[index]

    def add(attr_track: str, prefix: str, label: str, split: str, kind: str, **kw: Any) -> None:
        idx = len(specs)
        path = f"{attr_track}/{prefix}{idx:05d}.ogg"
        question = kw.pop("question", None)
        specs.append(ClipSpec(path, kind, label, seed * 1_000_003 + idx, **kw))
        pool.append(PoolClip(Path(path).name, attr_track, label, split, question))

    def attribute_clip(attr: str, spec: dict[str, Any], label: str, split: str) -> None:
        if attr == "animal":
            add(spec["track"], "a", label, split, "animal")
            return
        gender = label if attr == "gender" else str(rng.choice(["male", "female"]))
        language = label if attr == "language" else "English"
        voice = _speaker(rng, langs[language]["voice"], gender, fixed_timbre=attr == "language")
        prosody = {"rate": int(rng.uniform(140, 200)), "range": int(rng.uniform(30, 70)),
                   "volume": int(rng.uniform(85, 115))}  # fmt: skip
        if attr == "emotion":
            profile = world["emotions"][label]
            shift = -8 if gender == "male" else 8
            prosody = {k: int(rng.uniform(*profile[k])) for k in ("rate", "range", "volume")}
            voice["pitch"] = int(np.clip(rng.uniform(*profile["pitch"]) + shift, 0, 100))
        text = sentence(language, split)
        add(spec["track"], attr[0], label, split, "speech", text=text, voice=Voice(**voice, **prosody))

    def general_clip(task: str, spec: dict[str, Any], label: str, split: str) -> None:
        add(f"DynamicSuperb/{task}", "g", label, split, "general", task=task, question=spec["question"])

    for attr, spec in world["attributes"].items():
        n = sizes.per_label(attr)
        n_test = max(3, int(round(n * sizes.test_fraction)))
        for label in spec["labels"]:
            for i in range(n):
                attribute_clip(attr, spec, label, "test" if i < n_test else "train")
    for task, spec in world["general_audio"].items():
        options = parse_options(spec["question"])
        assert [o.casefold() for o in options] == [lab.casefold() for lab in spec["labels"]], task
        n_test = max(3, int(round(sizes.general_per_label * sizes.test_fraction)))
        for label in spec["labels"]:
            for i in range(sizes.general_per_label):
                general_clip(task, spec, label, "test" if i < n_test else "train")
    for attr, spec in world["attributes"].items():
        n_val = max(3, int(round(sizes.per_label(attr) * sizes.val_fraction)))
        for label in spec["labels"]:
            for _ in range(n_val):
                attribute_clip(attr, spec, label, "val")
    n_val = max(1, int(round(sizes.general_per_label * sizes.val_fraction)))
    for task, spec in world["general_audio"].items():
        for label in spec["labels"]:
            for _ in range(n_val):
                general_clip(task, spec, label, "val")
    return specs, pool


def build_mini(
    out: str | Path, seed: int = 0, sizes: MiniSizes = MiniSizes(), workers: int | None = None
) -> Path:
    """Build SAKE-mini into `out` (which must not exist yet); returns `out`."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it to rebuild SAKE-mini")
    tmp = out.with_name(out.name + f".building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.time()
    world = load_world()
    specs, pool = plan(world, sizes, seed)
    audio_root = tmp / "audio"
    workers = workers or min(4, os.cpu_count() or 1)
    # Spawned workers import only what synthesis needs, so forking one per utterance is cheap.
    spawn = multiprocessing.get_context("spawn")
    bar = progress_bar("synthesising SAKE-mini audio", len(specs), unit="clips")
    with bar as advance, ProcessPoolExecutor(workers, mp_context=spawn) as ex:
        for _ in ex.map(synthesise, specs, itertools.repeat(str(audio_root)), chunksize=64):
            advance(1)
    write_manifest(pool, tmp / "pool.jsonl")
    splits = Builder(pool, world, seed).build(sizes.split_sizes())
    write_splits(splits, tmp)
    (tmp / "world.yaml").write_text(
        (Path(__file__).parent / "world.yaml").read_text(encoding="utf-8"), encoding="utf-8"
    )
    info = {
        "format": FORMAT,
        "seed": seed,
        "sizes": asdict(sizes),
        "clips": len(specs),
        "seconds": round(time.time() - start, 1),
    }
    (tmp / "build.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    try:
        tmp.rename(out)
    except OSError:  # another process (a DDP rank) finished the same build first: use its
        if not (out / "build.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("SAKE-mini: %d clips and splits written to %s in %.0f s", len(specs), out, time.time() - start)
    return out


def ensure_mini(root: str | Path, seed: int = 0, sizes: MiniSizes = MiniSizes()) -> Path:
    """Build SAKE-mini at `root` unless it is already there (in this version's format)."""
    root = Path(root)
    if not (root / "build.json").is_file():
        if root.exists():
            raise FileExistsError(f"{root} exists but holds no finished SAKE-mini build (no build.json)")
        log.info("SAKE-mini not found at %s: building it (once)", root)
        build_mini(root, seed, sizes)
        return root
    built = json.loads((root / "build.json").read_text(encoding="utf-8")).get("format", 1)
    if built != FORMAT:
        raise FileExistsError(
            f"{root} holds a SAKE-mini of format {built}, this version builds format {FORMAT} "
            f"({FORMATS[FORMAT]}); remove {root} to rebuild it"
        )
    return root
