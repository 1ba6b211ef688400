"""The one LALM adapter interface, implemented once for processor-based transformers models.

A family file (qwen2_audio.py, audio_flamingo3.py, ...) subclasses `LALM` and fills in its
model and processor classes, its chat template and its tiny configuration; everything else
(prompt rendering, batching with answer-only labels, greedy generation, teacher-forced loss,
edit sites) is shared here.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel, ProcessorMixin

from lalms.audio import check_audio
from lalms.edit_sites import EditSites
from lalms.loading import load_pretrained, resolve_device, resolve_dtype
from lalms.prompt import Prompt

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class LALM:
    """A large audio-language model behind the project's one interface.

    Holds a transformers model and its processor. All public methods take batches of
    `Prompt`s; audio is checked (mono, finite, float) and resampled to `sampling_rate`.
    """

    model_class: ClassVar[type[PreTrainedModel]]
    processor_class: ClassVar[type[ProcessorMixin]]
    config_class: ClassVar[type[PretrainedConfig]]
    audio_token: ClassVar[str]
    chat_template: ClassVar[str]
    answer_suffix: ClassVar[str] = "<|im_end|>"  # closes the assistant turn in the chat template
    special_tokens: ClassVar[tuple[str, ...]] = ()  # added to the tiny tokenizer

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        *,
        chat_template: str | None = None,
        system_prompt: str | None = None,
        edit_sites: Mapping[str, str] | None = None,
        edit_layers: Sequence[int] = (-3, -2, -1),
        name: str | None = None,
        max_new_tokens: int = 32,
    ) -> None:
        self.model = model.eval()
        self.name = name or type(self).__name__.lower()  # short name for output folders
        self.edit_layers = tuple(edit_layers)  # LLM layers the hypernetwork editors edit
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = chat_template or type(self).chat_template
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        self.audio_token_id = self.tokenizer.convert_tokens_to_ids(self.audio_token)
        if self.audio_token_id is None or self.audio_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no audio token {self.audio_token!r}")
        if self.tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token")
        self.pad_token_id = self.tokenizer.pad_token_id
        self.answer_suffix_ids = self.tokenizer(self.answer_suffix, add_special_tokens=False).input_ids
        self.edit_sites = EditSites.probe(model, edit_sites)

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        path: str,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        random_init: bool = False,
        arch: Mapping[str, Any] | None = None,
        processor_path: str | None = None,
        **adapter_kwargs: Any,
    ) -> LALM:
        """Load weights and processor from a local directory or Hub id.

        With `random_init=True` the architecture is built without weights, from the config at
        `path` when reachable, else from `arch` (the published config kept in the model's yaml).
        """
        model, processor = load_pretrained(
            cls,
            path,
            dtype=resolve_dtype(dtype),
            device=resolve_device(device),
            random_init=random_init,
            arch=arch,
            processor_path=processor_path,
        )
        return cls(model, processor, **adapter_kwargs)

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        self.model.save_pretrained(out)
        self.processor.save_pretrained(out)
        return out

    # ----------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def sampling_rate(self) -> int:
        return int(self.processor.feature_extractor.sampling_rate)

    def fingerprint(self) -> str:
        """A digest of every weight and buffer and of how prompts are rendered: caches of the
        unedited model's answers are keyed by it, so a model with one changed value never
        shares another's. Hashed where the tensors live (benchmarks/fingerprint.py)."""
        h = hashlib.sha256()
        h.update(f"{type(self).__name__}|{self.template}|{self.system_prompt}".encode())
        for name, p in self.model.state_dict().items():
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
            h.update(tensor_digest(p))
        return h.hexdigest()[:16]

    # ----------------------------------------------------------------- prompts
    def messages(self, prompt: Prompt) -> list[dict]:
        """The prompt as chat messages in the transformers format (audio items carry no data)."""
        system = prompt.system if prompt.system is not None else self.system_prompt
        msgs: list[dict] = []
        if system is not None:
            msgs.append({"role": "system", "content": [{"type": "text", "text": system}]})
        for i, turn in enumerate(prompt.turns):
            content: list[dict] = [{"type": "audio"}] if turn.audio is not None else []
            content.append({"type": "text", "text": turn.question})
            msgs.append({"role": "user", "content": content})
            if i < len(prompt.history):
                if turn.answer is None:
                    raise ValueError(f"prior turn {i} ({turn.question[:40]!r}) has no answer")
                msgs.append({"role": "assistant", "content": [{"type": "text", "text": turn.answer}]})
        return msgs

    def render(self, prompt: Prompt) -> str:
        """The prompt text up to the start of the assistant's answer, one audio token per clip."""
        return self.tokenizer.apply_chat_template(
            self.messages(prompt), chat_template=self.template, tokenize=False, add_generation_prompt=True
        )

    def _audios(self, prompts: Sequence[Prompt]) -> list[np.ndarray]:
        audios = []
        for p, prompt in enumerate(prompts):
            for t, turn in enumerate(prompt.turns):
                if turn.audio is not None:
                    where = f"prompt {p}" + (f", turn {t}" if prompt.history else "") + " audio"
                    audios.append(check_audio(turn.audio, turn.sampling_rate, self.sampling_rate, where))
        return audios

    # ----------------------------------------------------------------- batching
    def encode(
        self, prompts: Sequence[Prompt], answers: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Tokenise a batch (left-padded), with audio features and, given answers, labels.

        Labels are IGNORE_INDEX everywhere except the answer tokens and the turn-closing suffix,
        so a loss on them measures only the answer.
        """
        if answers is not None and len(answers) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        if not prompts:
            raise ValueError("empty batch")
        audios = self._audios(prompts)
        features: dict[str, torch.Tensor] = {}
        runs: list[int] = []  # audio tokens per clip, in order of appearance
        if audios:
            # One placeholder text per clip keeps every processor's 1:1 text/audio rule and gives
            # the per-clip expansion length; feature tensors keep the clips' order.
            out = self.processor(
                text=[self.audio_token] * len(audios),
                audio=audios,
                sampling_rate=self.sampling_rate,
                return_tensors="pt",
                text_kwargs={"padding": True},  # audio keeps each processor's own padding
            )
            text_keys = set(self.tokenizer.model_input_names)
            features = {k: v for k, v in out.items() if k not in text_keys and isinstance(v, torch.Tensor)}
            runs = (out["input_ids"] == self.audio_token_id).sum(dim=1).tolist()

        rows, label_rows, clip = [], [], 0
        for i, prompt in enumerate(prompts):
            ids = self.tokenizer(self.render(prompt), add_special_tokens=False).input_ids
            n_clips = sum(t.audio is not None for t in prompt.turns)
            if ids.count(self.audio_token_id) != n_clips:
                raise ValueError(
                    f"prompt {i}: {ids.count(self.audio_token_id)} audio placeholders {self.audio_token!r} "
                    f"for {n_clips} clips (does the question text contain the audio token?)"
                )
            expanded: list[int] = []
            for tok in ids:
                if tok == self.audio_token_id:
                    expanded.extend([tok] * runs[clip])
                    clip += 1
                else:
                    expanded.append(tok)
            labels = [IGNORE_INDEX] * len(expanded)
            if answers is not None:
                answer_ids = (
                    self.tokenizer(answers[i], add_special_tokens=False).input_ids + self.answer_suffix_ids
                )
                expanded += answer_ids
                labels += answer_ids
            rows.append(expanded)
            label_rows.append(labels)

        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, label_rows, strict=True)):
            input_ids[i, width - len(r) :] = torch.tensor(r)
            attention_mask[i, width - len(r) :] = 1
            labels[i, width - len(r) :] = torch.tensor(lab)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, **features}
        if answers is not None:
            batch["labels"] = labels
        return batch

    def to_device(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = self.model.dtype
        return {
            k: v.to(self.device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()
        }

    # ----------------------------------------------------------------- model calls
    def forward(self, batch: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None):
        """Run the model on an encoded batch (labels are not passed: losses are computed here).

        `params` replaces the named parameters for this call only (torch.func.functional_call):
        how editors evaluate an edited model without copying or modifying it.
        """
        batch = self.to_device(batch)
        batch.pop("labels", None)
        mask = batch["attention_mask"]
        # Left padding: positions count real tokens only, as generation does.
        kwargs = dict(batch, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)
        if params:
            return torch.func.functional_call(self.model, dict(params), args=(), kwargs=kwargs, strict=False)
        return self.model(**kwargs)

    def logits(self, batch: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None):
        return self.forward(batch, params).logits

    def loss(
        self,
        prompts: Sequence[Prompt],
        answers: Sequence[str],
        reduction: str = "mean",
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Teacher-forced NLL of `answers`: per-example token means ('none') or their mean ('mean')."""
        batch = self.encode(prompts, answers)
        return answer_nll(self.logits(batch, params), batch["labels"].to(self.device), reduction)

    def generation_config(self, max_new_tokens: int) -> GenerationConfig:
        cfg = GenerationConfig.from_dict(self.model.generation_config.to_dict())
        cfg.update(
            do_sample=False,  # greedy, always: the benchmark compares deterministic answers
            temperature=None,
            top_p=None,
            top_k=None,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_token_id,
        )
        return cfg

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers to a batch of prompts, as stripped strings."""
        batch = self.to_device(self.encode(prompts))
        cfg = self.generation_config(max_new_tokens or self.max_new_tokens)
        out = self.model.generate(**batch, generation_config=cfg)
        new = out[:, batch["input_ids"].shape[1] :]
        return [s.strip() for s in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


_CHUNK = 1 << 26  # bytes hashed per step on an accelerator
_MULTIPLIERS = (0x9E3779B97F4A7C15 - (1 << 64), 0xC2B2AE3D27D4EB4F - (1 << 64))  # as signed int64


def tensor_digest(t: torch.Tensor) -> bytes:
    """A digest of every byte of `t`. On the CPU, sha256 of the bytes; on an accelerator, where
    copying a 7B model out would dominate, two position-weighted 64-bit sums per chunk (odd
    weights: any one changed byte changes them), computed there and then hashed."""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if flat.device.type == "cpu":
        return hashlib.sha256(flat.numpy().tobytes()).digest()
    return device_digest(flat)


def device_digest(flat: torch.Tensor) -> bytes:
    """`tensor_digest` of a flat uint8 tensor, computed on its device."""
    h = hashlib.sha256()
    for start in range(0, flat.numel(), _CHUNK):
        x = flat[start : start + _CHUNK].to(torch.int64)
        pos = torch.arange(start, start + len(x), device=x.device, dtype=torch.int64)
        sums = [(x * (pos * m + 1 | 1)).sum() for m in _MULTIPLIERS]  # int64 wraps: sums mod 2**64
        h.update(torch.stack(sums).cpu().numpy().tobytes())
    return h.digest()


def answer_nll(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean next-token NLL over labelled positions, per example ('none') or averaged ('mean')."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE_INDEX
    if not mask.any(dim=1).all():
        raise ValueError("a batch row has no answer tokens")
    nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    per_example = (nll * mask).sum(1) / mask.sum(1)
    if reduction == "none":
        return per_example
    if reduction == "mean":
        return per_example.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def greedy_hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) whether every answer token (and the turn end) of each row is the argmax: exactly
    when greedy decoding produces the answer."""
    answer = labels[:, 1:] != IGNORE_INDEX
    hit = (logits[:, :-1].argmax(-1) == labels[:, 1:]) | ~answer
    return hit.all(-1)


def hidden(output: Any) -> torch.Tensor:
    """A layer's output hidden states (layers and attention return a tensor or a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output: Any, states: torch.Tensor) -> Any:
    """`output` with its hidden states replaced (what a forward hook returns to change them)."""
    return (states, *output[1:]) if isinstance(output, tuple) else states
