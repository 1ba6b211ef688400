"""Pretraining data for the tiny LALM: what a model must know for SAKE's metrics to mean something.

From SAKE-mini's *training* clips only (pool.jsonl, split == "train") and its world.yaml:
- attribute recognition: a clip and a reliability or paraphrase wording, options shuffled;
- portability-style multi-hop: a clip and a knowledge question (audio -> label -> fact);
- the general-audio tasks (locality type 4);
- the text QA (text locality);
- spoken facts (`fact`, with `facts` set): the spoken-facts world's training renditions
  (datamodules/mini/facts.py: pretrain.jsonl), a fact's prompt heard with the data's instruction
  and completed with its object, so the model knows the facts the spoken-facts study traces and
  edits, and hears their val/test prompts in voices it never learnt them from.
Answers are the option text, as in SAKE. Example i is a pure function of (seed, i), so any
index can be drawn in any order and runs are reproducible.
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from common.prompt import Prompt
from datamodules.audio_io import AudioResolver, load_audio
from datamodules.builder import PoolClip, load_world, read_manifest
from datamodules.examples import PromptBatches
from datamodules.mini.build import ensure_mini
from datamodules.resume import ResumableBatches, ResumeSampler
from datamodules.schema import norm_label, with_options

log = logging.getLogger(__name__)

TASKS = ("attribute", "portability", "general", "text", "fact", "transcribe")


@dataclass(frozen=True)
class TaughtFact:
    """One spoken rendition of a fact's prompt, completed with its object."""

    audio: str  # relative to the spoken-facts root
    relation: str
    object: str
    text: str  # what the rendition says (the `transcribe` task's answer)


@dataclass(frozen=True)
class PretrainExample:
    prompt: Prompt
    answer: str
    task: str  # one of TASKS
    attribute: str | None  # for attribute and portability tasks; a fact's relation


class PretrainTasks(Dataset):
    """A reproducible stream of pretraining examples over a pool of decoded clips.

    `mix`: the shares of TASKS; `attribute_mix` and `portability_mix`: the shares of the
    attributes within the attribute and portability tasks (configs/experiment/pretrain_tiny.yaml
    gives all three); `augment`: small gain and noise changes to every clip (training only);
    `transcribe_instruction`: the `transcribe` task's question (repeat a rendition's words)."""

    def __init__(
        self,
        clips: list[PoolClip],
        waves: dict[tuple[str, str], np.ndarray],
        world: dict[str, Any],
        *,
        length: int,
        seed: int,
        mix: Mapping[str, float],
        attribute_mix: Mapping[str, float],
        portability_mix: Mapping[str, float],
        augment: bool,
        facts: list[TaughtFact] = (),
        fact_waves: Mapping[str, np.ndarray] | None = None,
        fact_instruction: str = "",
        transcribe_instruction: str = "",
    ) -> None:
        self.world, self.waves, self.length, self.seed, self.augment = world, waves, length, seed, augment
        self.tasks, self.weights = list(mix), list(mix.values())
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"pretraining mix: unknown tasks {unknown} (known: {', '.join(TASKS)})")
        for task in ("fact", "transcribe"):
            if mix.get(task) and not facts:
                raise ValueError(f"pretraining mix has a {task!r} share but no spoken facts (data.facts)")
        self.facts, self.fact_waves, self.fact_instruction = list(facts), fact_waves or {}, fact_instruction
        self.transcribe_instruction = transcribe_instruction
        self.attrs = world["attributes"]
        self.attr_mix = {
            task: ([a for a in self.attrs if a in m], [m[a] for a in self.attrs if a in m])
            for task, m in (("attribute", attribute_mix), ("portability", portability_mix))
        }
        track_attr = {spec["track"]: a for a, spec in self.attrs.items()}
        self.by_label: dict[tuple[str, str], list[PoolClip]] = defaultdict(list)
        self.general: list[PoolClip] = []
        for c in clips:
            if c.track in track_attr:
                self.by_label[(track_attr[c.track], norm_label(c.label))].append(c)
            elif c.question:
                self.general.append(c)

    def __len__(self) -> int:
        return self.length

    def audio(self, clip: PoolClip | None, rng: random.Random, wave: np.ndarray | None = None) -> np.ndarray:
        wave = self.waves[(clip.track, clip.file)] if wave is None else wave
        if self.augment:  # small gain and noise changes: more distinct inputs from the same clips
            wave = wave * rng.uniform(0.8, 1.2)
            noise = np.random.default_rng(rng.getrandbits(32)).standard_normal(len(wave)).astype(np.float32)
            wave = (wave + rng.uniform(0.0, 0.004) * noise).astype(np.float32)
        return wave

    def labelled_clip(self, rng: random.Random, task: str) -> tuple[str, str, PoolClip]:
        names, weights = self.attr_mix[task]
        attr = rng.choices(names, weights)[0]
        label = rng.choice(self.attrs[attr]["labels"])
        return attr, label, rng.choice(self.by_label[(attr, norm_label(label))])

    def __getitem__(self, i: int) -> PretrainExample:
        rng = random.Random(self.seed * 1_000_003 + i)
        task = rng.choices(self.tasks, self.weights)[0]
        if task == "attribute":
            attr, label, clip = self.labelled_clip(rng, task)
            spec = self.attrs[attr]
            options = rng.sample(spec["labels"], len(spec["labels"]))
            stem = rng.choice(spec["reliability"] + spec["paraphrase"])
            return PretrainExample(
                Prompt(with_options(stem, options), self.audio(clip, rng)), label, task, attr
            )
        if task == "portability":
            attr, label, clip = self.labelled_clip(rng, task)
            cat = rng.choice(list(self.world["knowledge"][attr].values()))
            facts = cat["facts"]
            answer = facts[label]
            others = sorted({f for f in facts.values() if norm_label(f) != norm_label(answer)})
            options = [answer, *rng.sample(others, min(3, len(others)))]
            rng.shuffle(options)
            prompt = Prompt(with_options(cat["question"], options), self.audio(clip, rng))
            return PretrainExample(prompt, answer, task, attr)
        if task in ("fact", "transcribe"):  # a rendition completed with its object, or repeated
            fact = rng.choice(self.facts)
            heard = self.audio(None, rng, self.fact_waves[fact.audio])
            if task == "fact":
                return PretrainExample(Prompt(self.fact_instruction, heard), fact.object, task, fact.relation)
            return PretrainExample(Prompt(self.transcribe_instruction, heard), fact.text, task, fact.relation)
        if task == "general":
            clip = rng.choice(self.general)
            return PretrainExample(Prompt(clip.question, self.audio(clip, rng)), clip.label, task, None)
        qa = rng.choice(self.world["text_qa"])
        options = rng.sample(qa["options"], len(qa["options"]))
        return PretrainExample(Prompt(with_options(qa["question"], options)), qa["answer"], task, None)


def collate(batch: list[PretrainExample]) -> dict[str, Any]:
    return {
        "prompts": [b.prompt for b in batch],
        "answers": [b.answer for b in batch],
        "tasks": [b.task for b in batch],
        "attributes": [b.attribute for b in batch],
    }


def stratified_holdout(
    clips: list[PoolClip], fraction: float, seed: int
) -> tuple[list[PoolClip], list[PoolClip]]:
    """(train, held-out) with at least one held-out clip of every (track, label)."""
    groups: dict[tuple[str, str], list[PoolClip]] = defaultdict(list)
    for c in clips:
        groups[(c.track, norm_label(c.label))].append(c)
    rng = random.Random(seed)
    train, held = [], []
    for key in sorted(groups):
        group = groups[key][:]
        rng.shuffle(group)
        k = max(1, round(fraction * len(group)))
        held += group[:k]
        train += group[k:]
    return train, held


class PretrainDataModule(PromptBatches, ResumableBatches, L.LightningDataModule):
    """Pretraining batches from SAKE-mini's training clips (built on first use).

    A small share of the training clips (`holdout`) is kept out of training and used for the
    validation accuracies logged to TensorBoard.
    """

    def __init__(
        self,
        *,
        root: str,
        mini_seed: int,
        batch_size: int,
        steps: int,
        val_examples: int,
        holdout: float,
        seed: int,
        mix: Mapping[str, float],
        attribute_mix: Mapping[str, float],
        portability_mix: Mapping[str, float],
        facts: Mapping[str, Any] | None,
        sampling_rate: int = 16000,
    ) -> None:
        """Every value but `sampling_rate` (the tiny LALM's) comes from the config
        (configs/experiment/pretrain_tiny.yaml: `data`); `steps` batches of `batch_size` are one
        pass, `val_examples` are drawn from the `holdout` share of the clips. `facts`: the
        spoken-facts world the `fact` and `transcribe` tasks teach ({root, mini_seed, instruction,
        transcribe}: built on first use; `transcribe` the transcription task's instruction), None
        for none."""
        super().__init__()
        self.mixes = {"mix": mix, "attribute_mix": attribute_mix, "portability_mix": portability_mix}
        self.root, self.mini_seed = Path(root), mini_seed
        self.batch_size, self.steps, self.val_examples = batch_size, steps, val_examples
        self.holdout, self.rate, self.seed = holdout, sampling_rate, seed
        self.facts = dict(facts) if facts else None
        keys = ("root", "mini_seed", "instruction", "transcribe")
        missing = [k for k in keys if k not in self.facts] if self.facts else []
        if missing:  # every key is the config's, none a default here
            recipe = "configs/experiment/pretrain_tiny_facts.yaml"
            raise ValueError(f"data.facts: missing {', '.join(missing)} (see {recipe})")
        self.train_set: PretrainTasks | None = None
        self.val_set: PretrainTasks | None = None

    def prepare_data(self) -> None:
        ensure_mini(self.root, self.mini_seed)
        if self.facts:
            from datamodules.mini.facts import ensure_facts

            ensure_facts(self.facts["root"], self.facts["mini_seed"])

    def taught_facts(self) -> tuple[list[TaughtFact], list[TaughtFact], dict[str, np.ndarray], str]:
        """(train, held-out) renditions of the spoken facts, their decoded clips, the instruction."""
        if not self.facts:
            return [], [], {}, ""
        root = Path(self.facts["root"])
        records = [
            json.loads(line) for line in (root / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()
        ]
        taught = [TaughtFact(r["audio"], r["relation"], r["object"], r["text"]) for r in records]
        log.info("decoding %d spoken-fact renditions into memory", len(taught))
        waves = {t.audio: load_audio(root / t.audio, self.rate) for t in taught}
        order = list(range(len(taught)))
        random.Random(self.seed).shuffle(order)
        k = max(1, round(self.holdout * len(order)))
        held = [taught[i] for i in sorted(order[:k])]
        train = [taught[i] for i in sorted(order[k:])]
        return train, held, waves, self.facts["instruction"]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        world = load_world(self.root / "world.yaml")
        clips = [c for c in read_manifest(self.root / "pool.jsonl") if c.split == "train"]
        resolver = AudioResolver(self.root / "audio")
        log.info("decoding %d SAKE-mini training clips into memory", len(clips))
        waves = {(c.track, c.file): resolver.load(c.file, c.track, self.rate) for c in clips}
        train_clips, val_clips = stratified_holdout(clips, self.holdout, self.seed)
        length = self.steps * self.batch_size  # one pass: every step sees new examples
        mixes = {k: dict(v) for k, v in self.mixes.items()}
        train_facts, val_facts, fact_waves, instruction = self.taught_facts()
        said = {"fact_waves": fact_waves, "fact_instruction": instruction,
                "transcribe_instruction": self.facts["transcribe"] if self.facts else ""}  # fmt: skip
        self.train_set = PretrainTasks(
            train_clips, waves, world, length=length, seed=self.seed, augment=True, facts=train_facts,
            **said, **mixes,
        )  # fmt: skip
        self.val_set = PretrainTasks(
            val_clips, waves, world, length=self.val_examples, seed=self.seed + 1, augment=False,
            facts=val_facts, **said, **mixes,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        # Example i is already a random draw (a function of seed and i): in order, so that a
        # resumed run passes over the batches already trained on and continues with the next.
        sampler = ResumeSampler(len(self.train_set), self.batches_to_skip() * self.batch_size)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=64, collate_fn=collate)
