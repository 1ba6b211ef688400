"""Reading (and writing for) DeSTA2.5's release layout: the release folder, the checkpoints its
config names, the connector's published weights, and the tokenizers as upstream uses them.

A release is a folder or a Hub repository holding `config.json` and `model.safetensors` (see
`lalms.desta.config`); the LLM and Whisper it sits on are a folder inside the release (as this
project's saves write them), a local path or a Hub id.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from tokenizers import processors
from transformers import AutoConfig

from lalms.desta.config import CONFIG, CONNECTOR, LLAMA31_TEMPLATE, WEIGHTS, DeSTAConfig
from lalms.desta.modules import DeSTA25Model
from lalms.loading import not_available, plain

log = logging.getLogger(__name__)

LLAMA_PAD = "<|finetune_right_pad_id|>"  # Llama-3.1's reserved padding token


def load_connector(model: DeSTA25Model, path: Path) -> None:
    """The release's weights into `model`, by their published names; refuses a file that lacks
    a connector weight, names one the model lacks, or has another shape."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the DeSTA2.5 release's connector weights are missing")
    weights = load_file(str(path))
    own = model.state_dict()
    unknown = sorted(k for k in weights if k not in own)
    if unknown:
        raise ValueError(f"{path}: weights the model does not have: {unknown[:5]}")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(
                f"{path}: weight {k!r} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}"
            )
    missing = sorted(k for k in own if k.startswith(CONNECTOR) and k not in weights)
    if missing:
        raise ValueError(f"{path}: connector weights missing: {missing[:5]}")
    model.load_state_dict(weights, strict=False)


def _release(path: str, required: bool) -> Path | None:
    """The release folder: `path` itself, or its snapshot in the Hub cache."""
    local = Path(path)
    if local.is_dir():
        if not (local / CONFIG).is_file():
            raise not_available("DeSTA2.5 release", path, FileNotFoundError(local / CONFIG))
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=path, allow_patterns=[CONFIG, WEIGHTS]))
    except Exception as err:  # the Hub's errors for an unreachable or uncached repo vary
        if required:
            raise not_available("DeSTA2.5 release", path, err) from err
        return None


def _part(release: Path | None, name: str) -> str:
    """A checkpoint the release config names: a folder inside the release, else the name itself."""
    if release is not None and (release / name).is_dir():
        return str(release / name)
    return name


def _config(source: str, arch: Mapping[str, Any] | None, key: str):
    try:
        return AutoConfig.from_pretrained(source)
    except OSError as err:
        if arch is None:
            raise not_available("config", source, err) from err
        log.info("config of %s not reachable; building from the published config in %s", source, key)
        arch = dict(plain(arch))
        return AutoConfig.for_model(arch.pop("model_type"), **arch)


def _tiny_tokenizer(tokenizer):
    """The project's BPE as a Llama-3.1-style tokenizer for stand-ins and tiny models: its chat
    template, and <|begin_of_text|> as BOS, which its special tokens prepend (as Llama's do)."""
    bos = "<|begin_of_text|>"
    tokenizer.bos_token = bos
    tokenizer.chat_template = LLAMA31_TEMPLATE
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))],
    )
    return tokenizer


def _decoding_as_configured(tokenizer):
    """Decode as the tokenizer's config says, as the transformers 4 that DeSTA2.5 ran on did:
    transformers 5 skips `clean_up_tokenization_spaces` for BPE tokenizers (Llama-3.1's and
    Whisper's ask for it), which changes spaces before punctuation in answers and transcripts."""
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    return tokenizer


def _prepared(tokenizer, config: DeSTAConfig):
    """The LLM's tokenizer as upstream uses it: padding on the left, the audio locator added as a
    token. Llama's tokenizer has no pad token: upstream pads with the end-of-sequence token, which
    also ends every turn; this pads with Llama-3.1's reserved padding token where the vocabulary
    has it, so that padding found by its id (WISE's masks) is padding only. Padded positions are
    masked either way."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = LLAMA_PAD if LLAMA_PAD in tokenizer.get_vocab() else tokenizer.eos_token
    tokenizer.padding_side = "left"
    _decoding_as_configured(tokenizer)
    if config.audio_locator not in tokenizer.get_vocab():
        tokenizer.add_tokens([config.audio_locator])
    return tokenizer


def _token_id(tokenizer, token: str, field: str) -> int:
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(
            f"DeSTA2.5 config field {field!r}: {token!r} is not one token of the LLM's tokenizer"
        )
    return ids[0]
