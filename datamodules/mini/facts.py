"""Build the offline spoken-facts world: invented subjects, SAKE-mini's labels as objects, every
prompt spoken by espeak-ng with its word times taken from espeak-ng's word events.

    python -m datamodules.spoken_facts build-mini --out data/spoken_facts_mini [--seed 0]

Output (deterministic for a seed, like SAKE-mini: datamodules/mini/build.py):
    val.jsonl, test.jsonl   manifests (datamodules/spoken_facts.py), audio relative to the folder
    audio/<fact id>_<k>.ogg the prompt (k = 0) and its paraphrases (k = 1, 2, ...), 16 kHz
    pretrain.jsonl          what the tiny LALM learns the facts from (datamodules/pretrain.py):
                            every prompt and paraphrase of every fact spoken `renditions` more
                            times, in other voices than the val/test clips (a model that knows a
                            fact hears its edit prompt in a voice it never heard it in), one
                            {"id", "relation", "object", "text", "audio"} a line
    pretrain/<fact id>_<k>_<r>.ogg  those renditions
    facts.yaml              the world used
    build.json              seed, sizes, counts

Neighbours are other facts of the same split with the same relation and true object (as
CounterFact's neighbourhood prompts: an edit that spills over to them is caught), their own
prompt's audio reused.
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import yaml

from common.progress import progress_bar
from datamodules.mini.sounds import SR
from datamodules.mini.speech import FEMALE_VARIANTS, MALE_VARIANTS, Espeak, Voice

log = logging.getLogger(__name__)

WORLD_FILE = Path(__file__).with_name("facts.yaml")
FORMAT = 3  # 2: pretrain.jsonl and its renditions; 3: 30 facts a relation (was 100)
SPLITS = ("val", "test")


@dataclass(frozen=True)
class FactSizes:
    # 30: what the tiny LALM learns to know on CPU (README, "Spoken facts": with 100 a relation
    # it learnt which objects a relation takes, not which subject takes which)
    facts_per_relation: int = 30
    val_fraction: float = 1 / 3
    neighbours: int = 2
    renditions: int = 4  # training renditions of each prompt and paraphrase (pretrain.jsonl)


@dataclass(frozen=True)
class Utterance:
    """One prompt to synthesise; synthesis is a pure function of it."""

    path: str  # relative to audio/
    text: str
    subject: str
    voice: Voice
    seed: int


@functools.cache
def _engine() -> Espeak:
    return Espeak()  # one per worker process


def speak(u: Utterance, audio_root: str) -> dict[str, Any]:
    """Write the utterance's clip; return its prompt record (text, audio, words, subject_words)."""
    out = Path(audio_root) / u.path
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sidecar = Path(tmp) / "words.json"

        def work(engine: Espeak) -> None:
            wave, words = engine.say_words(u.text, u.voice, SR)
            sf.write(out, np.clip(wave, -1, 1), SR, format="OGG", subtype="VORBIS")
            sidecar.write_text(json.dumps(words), encoding="utf-8")

        _engine().isolated(u.seed, work, u.path)  # the child synthesises: see Espeak.isolated
        words = json.loads(sidecar.read_text(encoding="utf-8"))
    return {
        "text": u.text,
        "audio": f"audio/{u.path}",
        "words": [{"word": w, "start": round(s, 4), "end": round(e, 4)} for w, s, e in words],
        "subject_words": subject_words(u.text, u.subject),
    }


def subject_words(text: str, subject: str) -> list[int]:
    """[first, last] indices of the subject's words among the whitespace-separated words."""
    words, n = text.split(), len(subject.split())
    for i in range(len(words) - n + 1):
        if " ".join(words[i : i + n]).startswith(subject):
            return [i, i + n - 1]
    raise ValueError(f"{subject!r} is not in {text!r}")


def _names(world: dict[str, Any], count: int, rng: np.random.Generator) -> list[str]:
    """`count` distinct invented names of 1-3 words of two syllables each."""
    syl, lengths, names = world["syllables"], world["subject_words"], set()
    while len(names) < count:
        words = int(rng.choice(lengths))
        names.add(" ".join("".join(rng.choice(syl, 2)).capitalize() for _ in range(words)))
    ordered = sorted(names)  # not the set's order, which string hashing changes per process
    return [ordered[i] for i in rng.permutation(len(ordered))]


def _voice(rng: np.random.Generator) -> Voice:
    male = bool(rng.random() < 0.5)
    variant = str(rng.choice(MALE_VARIANTS if male else FEMALE_VARIANTS))
    pitch = rng.uniform(20, 45) if male else rng.uniform(55, 80)
    return Voice("en", variant, rate=int(rng.uniform(150, 190)), pitch=int(pitch))


def plan(
    world: dict[str, Any], sizes: FactSizes, seed: int
) -> tuple[list[dict[str, Any]], list[Utterance], list[Utterance], list[dict[str, Any]]]:
    """The facts (without their prompts' words yet), the utterances to synthesise for them, and
    the training renditions with their pretrain.jsonl records."""
    rng = np.random.default_rng(seed)
    voices = np.random.default_rng(seed + 2)
    renditions: list[Utterance] = []
    taught: list[dict[str, Any]] = []
    relations = world["relations"]
    names = iter(_names(world, sizes.facts_per_relation * len(relations), rng))
    facts, utterances = [], []
    for relation, spec in relations.items():
        objects = spec["objects"]
        n_val = round(sizes.facts_per_relation * sizes.val_fraction)
        for i in range(sizes.facts_per_relation):
            subject, obj = next(names), objects[i % len(objects)]
            target = str(rng.choice([o for o in objects if o != obj]))
            fid = f"{relation}-{i:04d}"
            texts = [spec["prompt"], *spec["paraphrases"]]
            prompts = []
            for k, template in enumerate(texts):
                u = Utterance(
                    f"{fid}_{k}.ogg",
                    template.format(subject=subject),
                    subject,
                    _voice(rng),
                    int(rng.integers(2**31)),
                )
                utterances.append(u)
                prompts.append(u.path)
            split = "val" if i < n_val else "test"
            for k, template in enumerate(texts):  # other voices, from a stream of their own, so
                for r in range(sizes.renditions):  # the val/test clips do not depend on them
                    renditions.append(
                        Utterance(
                            f"{fid}_{k}_{r}.ogg",
                            template.format(subject=subject),
                            subject,
                            _voice(voices),
                            int(voices.integers(2**31)),
                        )
                    )
                    said = renditions[-1]
                    taught.append({"id": fid, "relation": relation, "object": obj, "text": said.text,
                                   "audio": f"pretrain/{said.path}"})  # fmt: skip
            facts.append(
                {
                    "id": fid,
                    "subject": subject,
                    "relation": relation,
                    "object": obj,
                    "target": target,
                    "split": split,
                    "clips": prompts,
                }
            )
    return facts, utterances, renditions, taught


def _with_neighbours(facts: list[dict[str, Any]], spoken: dict[str, dict], count: int, seed: int) -> None:
    rng = np.random.default_rng(seed + 1)
    for fact in facts:
        peers = [
            f
            for f in facts
            if f is not fact
            and f["split"] == fact["split"]
            and f["relation"] == fact["relation"]
            and f["object"] == fact["object"]
        ]
        chosen = [peers[i] for i in rng.permutation(len(peers))[:count]]
        fact["prompt"] = spoken[fact["clips"][0]]
        fact["paraphrases"] = [spoken[c] for c in fact["clips"][1:]]
        fact["neighbours"] = [
            {"subject": p["subject"], "object": p["object"], "prompt": spoken[p["clips"][0]]} for p in chosen
        ]


def build_facts(
    out: str | Path, seed: int = 0, sizes: FactSizes = FactSizes(), workers: int | None = None
) -> Path:
    """Build the spoken-facts world into `out` (which must not exist yet); returns `out`."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it to rebuild the spoken facts")
    tmp = out.with_name(out.name + f".building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.time()
    world = yaml.safe_load(WORLD_FILE.read_text(encoding="utf-8"))
    facts, utterances, renditions, taught = plan(world, sizes, seed)
    spawn = multiprocessing.get_context("spawn")
    spoken = {}
    todo = [(u, "audio") for u in utterances] + [(u, "pretrain") for u in renditions]
    bar = progress_bar("synthesising spoken facts", len(todo), unit="clips")
    with bar as advance, ProcessPoolExecutor(workers or min(4, os.cpu_count() or 1), mp_context=spawn) as ex:
        for (u, folder), record in zip(
            todo,
            ex.map(speak, [u for u, _ in todo], [str(tmp / f) for _, f in todo], chunksize=32),
            strict=True,
        ):
            if folder == "audio":
                spoken[u.path] = record
            advance(1)
    _with_neighbours(facts, spoken, sizes.neighbours, seed)
    keys = ("id", "subject", "relation", "object", "target", "prompt", "paraphrases", "neighbours")
    for split in SPLITS:
        lines = [
            json.dumps({k: f[k] for k in keys}, ensure_ascii=False) for f in facts if f["split"] == split
        ]
        (tmp / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp / "pretrain.jsonl").write_text(
        "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in taught), encoding="utf-8"
    )
    shutil.copyfile(WORLD_FILE, tmp / "facts.yaml")
    info = {
        "format": FORMAT,
        "seed": seed,
        "sizes": asdict(sizes),
        "facts": len(facts),
        "clips": len(utterances),
        "pretrain_clips": len(renditions),
        "seconds": round(time.time() - start, 1),
    }
    (tmp / "build.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same build first: use its
        if not (out / "build.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "spoken facts: %d facts, %d clips written to %s in %.0f s",
        len(facts),
        len(utterances),
        out,
        time.time() - start,
    )
    return out


def ensure_facts(root: str | Path, seed: int = 0, sizes: FactSizes = FactSizes()) -> Path:
    """Build the spoken facts at `root` unless a build of this format is already there."""
    root = Path(root)
    info = root / "build.json"
    if not info.is_file():
        if root.exists():
            raise FileExistsError(f"{root} exists but holds no finished spoken-facts build (no build.json)")
        log.info("spoken facts not found at %s: building them (once)", root)
        return build_facts(root, seed, sizes)
    built = json.loads(info.read_text(encoding="utf-8")).get("format")
    if built != FORMAT:
        raise FileExistsError(
            f"{root} holds spoken facts of format {built}, this version builds {FORMAT}; "
            f"remove {root} to rebuild them"
        )
    return root
