"""The LALM families a transformers processor feeds (Qwen2-Audio, Audio Flamingo 3).

A family file subclasses `ProcessorLALM` and names its model, processor and config classes, its
chat template and its tiny configuration; rendering with the chat template, batching with one
audio-token run per clip and loading are implemented here once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel, ProcessorMixin

from common.prompt import Prompt
from lalms.base import IGNORE_INDEX, LALM
from lalms.loading import build_processor, load_pretrained, resolve_device, resolve_dtype


class ProcessorLALM(LALM):
    """A transformers model and its processor: the processor expands each clip's audio token into
    the run of positions the model fills with the clip's encoded frames."""

    model_class: ClassVar[type[PreTrainedModel]]
    processor_class: ClassVar[type[ProcessorMixin]]
    config_class: ClassVar[type[PretrainedConfig]]
    chat_template: ClassVar[str]
    answer_suffix: ClassVar[str] = "<|im_end|>"  # closes the assistant turn in the ChatML templates

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        *,
        chat_template: str | None = None,
        **settings: Any,
    ) -> None:
        tokenizer = processor.tokenizer
        audio_token_id = tokenizer.convert_tokens_to_ids(self.audio_token)
        if audio_token_id is None or audio_token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no audio token {self.audio_token!r}")
        super().__init__(
            model,
            tokenizer,
            template=chat_template or type(self).chat_template,
            audio_token_id=audio_token_id,
            **settings,
        )
        self.processor = processor

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        path: str,
        *,
        dtype: str,
        device: str,
        random_init: bool,
        arch: Mapping[str, Any] | None,
        processor_path: str | None,
        **settings: Any,
    ) -> ProcessorLALM:
        """Load weights and processor from a local directory or Hub id. Every argument is the
        model config's (configs/model/*.yaml), which gives each: no default here.

        With `random_init=True` the architecture is built without weights, from the config at
        `path` when reachable, else from `arch` (the published config kept in the model's yaml).
        `processor_path` None: the processor at `path`.
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
        return cls(model, processor, **settings)

    @classmethod
    def tiny(cls, tokenizer, sizes) -> ProcessorLALM:
        processor = build_processor(
            cls, tokenizer, n_mels=sizes.n_mels, max_source_positions=sizes.max_source_positions
        )
        model = cls.model_class(cls.tiny_config(tokenizer, sizes))
        model.generation_config = GenerationConfig(
            do_sample=False,
            eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
            pad_token_id=tokenizer.pad_token_id,
            max_new_tokens=32,
        )
        return cls(model, processor)

    @classmethod
    def tiny_config(cls, tokenizer, sizes) -> PretrainedConfig:
        raise NotImplementedError(f"{cls.__name__} has no tiny configuration")

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        self.model.save_pretrained(out)
        self.processor.save_pretrained(out)
        return out

    @property
    def feature_extractor(self):
        return self.processor.feature_extractor

    @property
    def sampling_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

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
        return self.tokenizer.apply_chat_template(
            self.messages(prompt), chat_template=self.template, tokenize=False, add_generation_prompt=True
        )

    # ----------------------------------------------------------------- batching
    def encode(
        self, prompts: Sequence[Prompt], answers: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        if answers is not None and len(answers) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        if not prompts:
            raise ValueError("empty batch")
        audios = self.audios(prompts)
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
                answer_ids = self.answer_ids(answers[i])
                expanded += answer_ids
                labels += answer_ids
            rows.append(expanded)
            label_rows.append(labels)
        return {**self.pad(rows, label_rows if answers is not None else None), **features}
