"""The LALM interface every editor, trainer and sweep relies on, and what all families share.

`LALM` is the contract: load a model (`load`, `tiny`, `save`), render and batch prompts
(`render`, `encode`), answer them (`generate`), score answers (`loss`, `logits`, `forward`), name
its edit sites (`edit_sites`) and identify it (`fingerprint`). A family implements the abstract
methods with its own internals: `ProcessorLALM` (lalms/processor_based.py) for the models a
transformers processor feeds (Qwen2-Audio, Audio Flamingo 3), `DeSTA25` (lalms/desta/) for the
Whisper + Q-Former + Llama assembly. Everything that follows from the contract (losses on answer
tokens, greedy generation, device placement, the fingerprint) is implemented once, here.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from common.prompt import Prompt
from lalms.audio import check_audio
from lalms.edit_sites import EditSites

if TYPE_CHECKING:
    from lalms.enhancement import Enhancement

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class LALM(abc.ABC):
    """A large audio-language model behind the project's one interface.

    `model` is the torch module editors read and edit (its parameters, submodules and forward),
    frozen: editors train their own copies of what they change (fine-tuned tensors, side
    memories, hypernetwork outputs), and pretraining unfreezes it; `tokenizer` is the LLM's.
    All public methods take batches of `Prompt`s; audio is checked (mono, finite, float) and
    resampled to `sampling_rate`. An encoded batch holds `input_ids` (left
    padded), `attention_mask`, the audio inputs and, given answers, `labels`; the positions of
    audio in `input_ids` hold `audio_token_id`.
    """

    audio_token: ClassVar[str]  # marks one clip in rendered prompt text
    answer_suffix: ClassVar[str]  # closes the assistant turn; labelled after every answer
    special_tokens: ClassVar[tuple[str, ...]] = ()  # what a tiny tokenizer of the family needs

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        template: str,
        audio_token_id: int,
        system_prompt: str | None = None,
        edit_sites: Mapping[str, str] | None = None,
        edit_layers: Sequence[int] = (-3, -2, -1),
        name: str | None = None,
        max_new_tokens: int = 32,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name or type(self).__name__.lower()  # short name for output folders
        self.edit_layers = tuple(edit_layers)  # LLM layers the hypernetwork editors edit
        self.template = template  # the chat template prompts are rendered with
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token")
        self.pad_token_id = tokenizer.pad_token_id
        self.audio_token_id = audio_token_id
        self.answer_suffix_ids = tokenizer(self.answer_suffix, add_special_tokens=False).input_ids
        self.edit_sites = EditSites.probe(model, edit_sites)
        # AudioLens's enhancement in effect (lalms/enhancement.py: `Enhancement.apply` sets it,
        # with its hooks, and `undo` clears it): a setting, so part of `settings()`
        self.enhancement: Enhancement | None = None

    # ----------------------------------------------------------------- what a family implements
    @classmethod
    @abc.abstractmethod
    def load(cls, path: str, **kwargs: Any) -> LALM:
        """The model at `path` (a local folder or a Hub id, with `model.*` settings as kwargs)."""

    @classmethod
    @abc.abstractmethod
    def tiny(cls, tokenizer: PreTrainedTokenizerBase, sizes: Any) -> LALM:
        """A randomly initialised tiny model of the family (lalms/tiny.py), on `tokenizer`."""

    @abc.abstractmethod
    def save(self, out_dir: str | Path) -> Path:
        """Write the model so that `load(out_dir)` reads it back identically."""

    @property
    @abc.abstractmethod
    def sampling_rate(self) -> int:
        """The audio rate the model's features are computed at."""

    @property
    def feature_hop_seconds(self) -> float:
        """Seconds between two frames of the audio features the encoder reads (Whisper's: 10 ms)."""
        fe = self.feature_extractor
        return fe.hop_length / fe.sampling_rate

    @abc.abstractmethod
    def render(self, prompt: Prompt) -> str:
        """The prompt text up to the start of the assistant's answer, one `audio_token` per clip."""

    @abc.abstractmethod
    def encode(
        self, prompts: Sequence[Prompt], answers: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Tokenise a batch (left-padded), with audio inputs and, given answers, labels.

        Labels are IGNORE_INDEX everywhere except the answer tokens and the turn-closing suffix,
        so a loss on them measures only the answer.
        """

    # ----------------------------------------------------------------- shared
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def source(self) -> str:
        """Where the weights came from (a folder or Hub id), for exported editors' records."""
        return str(getattr(getattr(self.model, "config", None), "_name_or_path", ""))

    def settings(self) -> dict[str, Any]:
        """Everything besides the weights that changes what the model is given or answers; an
        enhancement in effect (lalms/enhancement.py) is named only when there is one, so the
        fingerprints of the plain model stay what they were."""
        out = {"family": type(self).__name__, "template": self.template, "system": self.system_prompt}
        if self.enhancement is not None:
            out["enhancement"] = self.enhancement.as_dict()
        return out

    def decoding(self) -> dict[str, Any]:
        """What decides an answer besides the weights, the prompt rendering (`settings()`) and
        the query: the generation config as `generate` merges it (the model's, then greedy
        decoding; the length limit is part of each query's key), how tokens become text, and
        the versions of the libraries that compute both."""
        generation = self.generation_config(1).to_dict()
        for volatile in ("max_new_tokens", "transformers_version"):
            generation.pop(volatile, None)
        tok = self.tokenizer
        return {
            "generation": generation,
            "detokenize": {
                "skip_special_tokens": True,
                "clean_up_tokenization_spaces": getattr(tok, "clean_up_tokenization_spaces", None),
                "bpe_clean_up": getattr(
                    tok, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", None
                ),
                "strip": True,
            },
            "versions": {"torch": str(torch.__version__), "transformers": str(transformers.__version__)},
        }

    def answers_fingerprint(self, fingerprint: str | None = None) -> str:
        """`fingerprint()` and `decoding()` in one digest: what the cache of the unedited model's
        answers (evaluation/responses.py) and a run's identity key on, so an answer generated
        under another generation config, detokenisation or library version is never reused.
        `fingerprint`: `fingerprint()` when the caller has it already (it hashes every weight)."""
        text = json.dumps([fingerprint or self.fingerprint(), self.decoding()], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def fingerprint(self) -> str:
        """A digest of every weight and buffer and of `settings()`: what an exported editor's
        model check compares (and, with `decoding()`, `answers_fingerprint`), so a model with
        one changed value is never taken for another. Hashed where the tensors live
        (benchmarks/fingerprint.py)."""
        h = hashlib.sha256(repr(sorted(self.settings().items())).encode())
        for name, p in self.model.state_dict().items():
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
            h.update(tensor_digest(p))
        return h.hexdigest()[:16]

    def audios(self, prompts: Sequence[Prompt]) -> list[np.ndarray]:
        """Every clip of a batch in order of appearance, checked and at `sampling_rate`."""
        audios = []
        for p, prompt in enumerate(prompts):
            for t, turn in enumerate(prompt.turns):
                if turn.audio is not None:
                    where = f"prompt {p}" + (f", turn {t}" if prompt.history else "") + " audio"
                    audios.append(check_audio(turn.audio, turn.sampling_rate, self.sampling_rate, where))
        return audios

    def answer_ids(self, answer: str) -> list[int]:
        """The labelled tokens of an answer: its tokens, then the turn-closing suffix."""
        return self.tokenizer(answer, add_special_tokens=False).input_ids + self.answer_suffix_ids

    def pad(
        self, rows: Sequence[list[int]], label_rows: Sequence[list[int]] | None
    ) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask (and labels) of token rows, padded on the left."""
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r) :] = torch.tensor(r)
            attention_mask[i, width - len(r) :] = 1
            if label_rows is not None:
                labels[i, width - len(r) :] = torch.tensor(label_rows[i])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if label_rows is not None:
            batch["labels"] = labels
        return batch

    def to_device(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = self.model.dtype
        return {
            k: v.to(self.device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()
        }

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
        """Greedy answers to a batch of prompts, as stripped strings.

        The output projection sees the last position only: decoding reads no other, and a
        prompt's full logits (batch x length x vocabulary: 7 GB in float32 for 64 prompts of
        180 tokens on Qwen2-Audio's 156k vocabulary) are never built. Families whose forward
        takes `logits_to_keep` already do this; the hook gives it to every family."""
        batch = self.to_device(self.encode(prompts))
        cfg = self.generation_config(max_new_tokens or self.max_new_tokens)
        from lalms.hooks import hooked  # lalms.hooks builds on this module

        head = self.model.get_submodule(self.edit_sites.lm_head) if self.edit_sites.lm_head else None
        with hooked(head, last_position_only, pre=True) if head is not None else nullcontext():
            out = self.model.generate(**batch, generation_config=cfg)
        new = out[:, batch["input_ids"].shape[1] :]
        return [s.strip() for s in self.tokenizer.batch_decode(new, skip_special_tokens=True)]  # decoding()


def last_position_only(module: nn.Module, args: tuple) -> tuple:
    """A pre-hook of the output projection: it sees the last position only (`generate`)."""
    return (args[0][:, -1:], *args[1:])


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
