"""The train split of SAKE-format data as editors draw on it (common.TrainPool)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

from common import Demonstration
from common.prompt import Prompt
from datamodules.audio_io import AudioResolver
from datamodules.examples import PromptMaker
from datamodules.loader import SakeData
from datamodules.schema import EditInstance, Query, norm_label


class SakeTrainPool:
    """The train split at `root` (read on first use, by `load` when given), its clips under
    `audio_root` (default `<root>/audio`) decoded at `sampling_rate`."""

    def __init__(
        self,
        root: str | Path,
        audio_root: str | Path | None,
        sampling_rate: int,
        load: Callable[[], SakeData] | None = None,
    ) -> None:
        self.root = Path(root)
        self.prompt = PromptMaker(AudioResolver(audio_root or self.root / "audio"), sampling_rate)
        self._load = load or (lambda: SakeData.load(self.root))

    @cached_property
    def train(self) -> list[EditInstance]:
        train = self._load().train
        if not train:
            raise FileNotFoundError(f"{self.root}: no train split, which this editor draws on")
        return train

    def preservation(self, n_text: int, n_audio: int) -> list[Prompt]:
        text: list[Prompt] = []
        audio: list[Prompt] = []
        seen: set[tuple[str | None, str]] = set()
        for q in (q for inst in self.train for q in (*inst.text_locality, *inst.audio_locality)):
            if (q.file, q.question) in seen:
                continue
            seen.add((q.file, q.question))
            if q.file is None and len(text) < n_text:
                text.append(self.prompt(q))
            elif q.file is not None and len(audio) < n_audio:
                audio.append(self.prompt(q))
            if len(text) == n_text and len(audio) == n_audio:
                break
        return text + audio

    @cached_property
    def _by_label(self) -> dict[tuple[str, str], list[Query]]:
        """(attribute, original label) -> the audio questions about clips of that label."""
        out: dict[tuple[str, str], list[Query]] = defaultdict(list)
        for inst in self.train:
            for q in (inst.reliability, *inst.generality):
                if q.file is not None:
                    out[(inst.attribute, norm_label(inst.original))].append(q)
        return out

    def label_questions(self, attribute: str, label: str, count: int, seed: int) -> list[Prompt]:
        queries = list(self._by_label.get((attribute, norm_label(label)), []))
        random.Random(f"{seed}:{attribute}:{label}").shuffle(queries)
        return [self.prompt(q) for q in queries[:count]]

    def demonstration(self, attribute: str, original: str, target: str | None = None) -> Demonstration | None:
        orig, tgt = norm_label(original), None if target is None else norm_label(target)
        for inst in self.train:
            if inst.attribute != attribute or norm_label(inst.original) != orig:
                continue
            if tgt is not None and norm_label(inst.target) != tgt:
                continue
            locality = (*inst.audio_locality, *inst.text_locality[:1])
            return Demonstration(
                original=inst.original,
                target=inst.target,
                edit=self.prompt(inst.reliability),
                generality=tuple(self.prompt(q) for q in inst.generality),
                locality=tuple((self.prompt(q), q.answer) for q in locality),
            )
        return None
