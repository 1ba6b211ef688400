"""DeSTA2.5's release config and the constants of its release layout.

The release folder holds `config.json` (the fields of `DeSTAConfig`) and `model.safetensors`
(the connector's weights, `perception.connector.*`); the config names the LLM
(`llm_model_id`) and Whisper (`encoder_model_id`) checkpoints it sits on. The connector reads
the last encoder layer of each quarter of Whisper's encoder (`tapped_layers`) unless the config
names the layers (`target_layer_ids`, written by this project's saves).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CONNECTOR = "perception.connector."
# Upstream loads Whisper and builds the connector in float32 and only the LLM in bfloat16; the
# connector's vectors are cast to the LLM's dtype where they enter its input.
PERCEPTION_DTYPE = torch.float32

# The Llama-3.1 chat format, used when the LLM's tokenizer ships no template (the tiny model's
# does): a system block with the knowledge-cutoff lines always, then one block per message.
LLAMA31_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class DeSTAConfig:
    """The release's config.json (the DeSTA25Config fields this model uses)."""

    llm_model_id: str = "DeSTA-ntu/Llama-3.1-8B-Instruct"
    encoder_model_id: str = "openai/whisper-large-v3"
    connector_mode: str = "qformer_1"
    qformer_num_hidden_layers: int = 2
    prompt_size: int = 64
    audio_locator: str = "<|AUDIO|>"
    placeholder_token: str = "<|reserved_special_token_87|>"
    # Not in the release's config (upstream derives them); written by this project's saves.
    target_layer_ids: tuple[int, ...] | None = None  # None: the last layer of each quarter
    qformer_intermediate_size: int = 3072  # BertConfig's default, which the release keeps

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str) -> DeSTAConfig:
        if raw.get("use_lora"):
            raise ValueError(
                f"{source}: field 'use_lora' is true: LoRA-adapted DeSTA2.5 releases are not supported "
                "(the released DeSTA2.5-Audio-Llama-3.1-8B has none)"
            )
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in raw or raw[f.name] is None:
                continue
            value = raw[f.name]
            if f.name == "target_layer_ids":
                if not isinstance(value, list | tuple) or not all(isinstance(i, int) for i in value):
                    raise ValueError(f"{source}: field 'target_layer_ids' must be a list of layer indices")
                value = tuple(value)
            elif not isinstance(value, type(f.default)):
                raise ValueError(
                    f"{source}: field {f.name!r} must be a {type(f.default).__name__}, got {value!r}"
                )
            values[f.name] = value
        config = cls(**values)
        if config.connector_mode != "qformer_1":
            raise ValueError(
                f"{source}: field 'connector_mode' is {config.connector_mode!r}; DeSTA2.5 has only "
                "'qformer_1'"
            )
        return config

    @classmethod
    def read(cls, path: Path) -> DeSTAConfig:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, str(path))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["target_layer_ids"] = list(self.target_layer_ids) if self.target_layer_ids else None
        return {"model_type": "desta25", **out, "use_lora": False}


def tapped_layers(n_layers: int) -> tuple[int, ...]:
    """The encoder layers the connector reads: the last of each quarter of the encoder (upstream's
    table: 7/15/23/31 for large-v3, 5/11/17/23 medium, 2/5/8/11 small, 0-3 tiny); every layer of
    an encoder with fewer than four."""
    if n_layers < 4:
        return tuple(range(n_layers))
    return tuple((q + 1) * n_layers // 4 - 1 for q in range(4))
