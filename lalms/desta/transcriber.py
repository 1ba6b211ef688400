"""The transcripts DeSTA2.5's LLM reads after each clip's connector vectors, and their cache.

Whisper's decoder transcribes a clip (greedy, at most 128 tokens) when a voice-activity detector
(silero-vad) hears speech in it; otherwise the transcript is " ". Upstream transcribes on every
call; `Transcriber` batches the clips and caches each transcript, and uses a cached one only
while Whisper would transcribe the clip the same way:

- A clip is found in the cache by its samples. A transcript is kept with the decoder's tokens that
  produced it (Whisper's prompt tokens, the text, the end token) and a digest of the logits
  Whisper computes for those tokens on the clip, one clip alone (so the same shapes every time).
- On a later call that forward runs again: the same digest, bit for bit, and the cached
  transcript is used; another, and the clip is transcribed again. Greedy decoding takes each token
  from the logits at a prefix of that token sequence, so while those logits are the same,
  transcribing again would give the same tokens.
- So the cache follows what Whisper computes, not how its modules look: a write to any of its
  weights, a hook on any of its modules (registered any way, or one whose effect changes while
  it stays registered), a replaced module or forward method all change the logits on the clip
  (or, where they do not, do not change its transcript). A change the check would miss would
  have to act only in KV-cached decoding steps, which nothing in this project does. Runs that
  differ numerically (nondeterministic kernels) only make it transcribe again.

Checking costs one forward of Whisper (its encoder, and its decoder over the cached tokens at
once) per cached clip and call. The detector's verdict depends on the samples only and is kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

NO_SPEECH = " "  # the transcript of a clip without speech, as upstream
VADS = ("silero", "none")


@dataclass(frozen=True)
class _Cached:
    """A clip's transcript, the decoder's tokens (1-D, on the CPU) that produced it and the digest
    of Whisper's logits for them on the clip."""

    text: str
    tokens: torch.Tensor
    digest: str


class _Sequences(StoppingCriteria):
    """Keeps the sequences `generate` has made so far, its decoder prompt included (which the
    output of Whisper's `generate` leaves out); stops nothing."""

    def __init__(self) -> None:
        self.sequences: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.sequences = input_ids
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class Transcriber:
    """Whisper's transcripts of clips, batched and cached per clip (see the module docstring).

    A cached transcript is used only while Whisper computes, for the clip and the tokens that
    made it, what it computed then: an edit that writes Whisper's weights or hooks one of its
    modules and so changes what is transcribed makes the next call transcribe again.
    """

    def __init__(
        self,
        whisper: WhisperForConditionalGeneration,
        feature_extractor: WhisperFeatureExtractor,
        tokenizer,
        *,
        vad: str = "silero",
        max_new_tokens: int = 128,
        batch_size: int = 16,
    ) -> None:
        if vad not in VADS:
            raise ValueError(f"model.vad must be one of {VADS}, got {vad!r}")
        self.whisper = whisper
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.vad = vad
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self._speech = _silero() if vad == "silero" else None
        # Whisper's own settings (language detection, task), greedy, at most max_new_tokens.
        self.generation_config = GenerationConfig.from_dict(whisper.generation_config.to_dict())
        self.generation_config.update(
            do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, max_length=None
        )
        eos = self.generation_config.eos_token_id
        ends = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self._ends = torch.tensor(ends, dtype=torch.long)
        self._cache: dict[str, _Cached] = {}  # transcripts of clips with speech, by their samples
        self._silent: set[str] = set()  # clips the detector hears no speech in

    def has_speech(self, clip: np.ndarray) -> bool:
        return self._speech is None or self._speech(clip, self.feature_extractor.sampling_rate)

    @torch.no_grad()
    def __call__(self, clips: Sequence[np.ndarray]) -> list[str]:
        if not clips:
            return []
        keys = [hashlib.sha256(c.tobytes()).hexdigest() for c in clips]
        texts: dict[str, str] = {}
        speech: dict[str, np.ndarray] = {}
        for key, clip in zip(keys, clips, strict=True):
            if key in texts or key in speech:
                continue
            if key in self._silent or (key not in self._cache and not self.has_speech(clip)):
                self._silent.add(key)
                texts[key] = NO_SPEECH
            else:
                speech[key] = clip
        todo: dict[str, torch.Tensor] = {}  # the features of clips to transcribe
        for key, clip in speech.items():
            features = self._features(clip)
            cached = self._cache.get(key)
            if cached is not None and self._digest(features, cached.tokens) == cached.digest:
                texts[key] = cached.text
            else:
                todo[key] = features
        listed = list(todo)
        for start in range(0, len(listed), self.batch_size):
            chunk = listed[start : start + self.batch_size]
            features = torch.stack([todo[k] for k in chunk])
            ids, sequences = self._generate(features)
            decoded = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
            for i, (key, text) in enumerate(zip(chunk, decoded, strict=True)):
                texts[key] = text.strip()
                if sequences is not None:
                    tokens = self._trimmed(sequences[i].cpu())
                    self._cache[key] = _Cached(texts[key], tokens, self._digest(todo[key], tokens))
                else:  # not a sequence per clip (a fallback re-ran some): not checkable, not kept
                    self._cache.pop(key, None)
        return [texts[k] for k in keys]

    def _features(self, clip: np.ndarray) -> torch.Tensor:
        """Whisper's input features of one clip (padded to its window), on its device in its
        dtype; extracted alone, so the same whichever clips it comes with."""
        param = next(self.whisper.parameters())
        return (
            self.feature_extractor(
                [clip], sampling_rate=self.feature_extractor.sampling_rate, return_tensors="pt"
            )
            .input_features[0]
            .to(param.device, param.dtype)
        )

    def _generate(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Whisper's output for a batch (the text's tokens) and the whole decoder sequences it made
        (None where generate did not end on one sequence per clip)."""
        seen = _Sequences()
        ids = self.whisper.generate(
            input_features=features,
            attention_mask=torch.ones(
                features.shape[0], features.shape[-1], dtype=torch.long, device=features.device
            ),
            generation_config=self.generation_config,
            stopping_criteria=StoppingCriteriaList([seen]),
        )
        sequences = seen.sequences
        if sequences is None or sequences.shape[0] != features.shape[0]:
            sequences = None
        return ids, sequences

    def _trimmed(self, sequence: torch.Tensor) -> torch.Tensor:
        """The sequence up to its end token (what follows is the batch's padding)."""
        ends = torch.isin(sequence[1:], self._ends).nonzero()
        return sequence if len(ends) == 0 else sequence[: int(ends[0]) + 2]

    def _digest(self, features: torch.Tensor, tokens: torch.Tensor) -> str:
        """A digest of Whisper's logits for the decoder tokens `tokens` on one clip's features."""
        logits = self.whisper(
            input_features=features[None],
            decoder_input_ids=tokens[None].to(features.device),
            use_cache=False,
        ).logits
        return hashlib.sha256(logits.to("cpu", torch.float32).numpy().tobytes()).hexdigest()


def _silero():
    """silero-vad's speech detector (its ONNX model, shipped in the package), as upstream calls it."""
    try:
        from silero_vad import get_speech_timestamps, load_silero_vad
    except ImportError as err:
        raise ImportError(
            "model.vad=silero needs the silero-vad and onnxruntime packages (`pip install silero-vad "
            "onnxruntime`, part of this project's dependencies); model.vad=none transcribes every clip"
        ) from err
    detector = load_silero_vad(onnx=True)

    def has_speech(clip: np.ndarray, sampling_rate: int) -> bool:
        return bool(get_speech_timestamps(torch.from_numpy(clip), detector, sampling_rate=sampling_rate))

    return has_speech
