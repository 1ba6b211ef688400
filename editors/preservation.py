"""Preservation inputs: questions from the train split whose answers an edit should not move
(WISE's out-of-scope samples, UnKE's preserved keys)."""

from __future__ import annotations

from pathlib import Path

from datamodules.audio_io import AudioResolver
from datamodules.loader import SakeData
from lalms.prompt import Prompt


def preservation_prompts(
    root: str, audio_root: str | None, n_text: int, n_audio: int, sampling_rate: int = 16000
) -> list[Prompt]:
    """The first `n_text` distinct text-QA and `n_audio` audio questions among the train split's
    locality queries (text first), with their audio decoded."""
    train = SakeData.load(root).train
    if not train:
        raise FileNotFoundError(f"{root}: no train split to take preservation inputs from")
    resolver = AudioResolver(audio_root or Path(root) / "audio")
    text: list[Prompt] = []
    audio: list[Prompt] = []
    seen: set[tuple[str | None, str]] = set()
    for q in (q for inst in train for q in (*inst.text_locality, *inst.audio_locality)):
        if (q.file, q.question) in seen:
            continue
        seen.add((q.file, q.question))
        if q.file is None and len(text) < n_text:
            text.append(Prompt(q.question))
        elif q.file is not None and len(audio) < n_audio:
            audio.append(Prompt(q.question, audio=resolver.load(q.file, q.track, sampling_rate)))
        if len(text) == n_text and len(audio) == n_audio:
            break
    return text + audio
