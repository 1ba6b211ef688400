"""Loading LALMs from local directories or the Hub, or building them without weights."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from transformers import WhisperFeatureExtractor

from lalms.tokenizer import default_corpus, train_tokenizer

if TYPE_CHECKING:
    from lalms.processor_based import ProcessorLALM

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HOP_LENGTH = 160  # Whisper features: 10 ms hop at 16 kHz, conv2 halves the frames
SAMPLING_RATE = 16000


class ModelNotAvailableError(OSError):
    """Weights or processor could not be found locally and the Hub could not supply them."""


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return (
            torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        )
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)} or 'auto', got {name!r}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def not_available(
    what: str, path: str, err: Exception, setting: str = "model.path"
) -> ModelNotAvailableError:
    """The error for a part of a model that is neither a local folder nor in the Hub cache;
    `setting` is the config key that points at it."""
    local = Path(path)
    if local.is_dir():
        where = f"the local directory {local.resolve()} holds no usable {what}"
    else:
        where = (
            f"there is no local directory {local.resolve()}, and the Hugging Face Hub has no cached "
            "copy (the Hub is unreachable or HF_HUB_OFFLINE=1)"
        )
    return ModelNotAvailableError(
        f"could not load the {what} from {setting}={path!r}: {where}. On a machine with network run "
        f"`hf download {path} --local-dir DIR`, copy DIR here and set {setting}=DIR "
        f"(or model.random_init=true for an architecture-only model). Cause: {type(err).__name__}: {err}"
    )


def whisper_features(n_mels: int, max_source_positions: int) -> WhisperFeatureExtractor:
    """A Whisper feature extractor sized for an encoder.

    Whisper-style encoders need exactly 2 * max_source_positions mel frames per window, so the
    chunk length follows from the encoder's positions.
    """
    chunk_seconds = 2 * max_source_positions * HOP_LENGTH / SAMPLING_RATE
    if chunk_seconds != int(chunk_seconds):
        raise ValueError(
            f"max_source_positions={max_source_positions} gives a fractional chunk of {chunk_seconds} s"
        )
    return WhisperFeatureExtractor(
        feature_size=n_mels,
        sampling_rate=SAMPLING_RATE,
        hop_length=HOP_LENGTH,
        chunk_length=int(chunk_seconds),
        n_fft=400,
        return_attention_mask=True,
    )


def build_processor(cls: type[ProcessorLALM], tokenizer, *, n_mels: int, max_source_positions: int):
    """A processor for `cls` with a Whisper feature extractor sized for the encoder."""
    fe = whisper_features(n_mels, max_source_positions)
    return cls.processor_class(feature_extractor=fe, tokenizer=tokenizer, chat_template=cls.chat_template)


def _architecture(cls: type[ProcessorLALM], path: str, arch: Mapping[str, Any] | None):
    try:
        return cls.config_class.from_pretrained(path)
    except OSError as err:
        if arch is None:
            raise not_available("config", path, err) from err
        log.info("config of %s not reachable; building from the published config in model.arch", path)
        return cls.config_class(**plain(arch))


def plain(obj: Any) -> Any:
    """OmegaConf containers to plain dicts/lists (transformers configs expect builtins)."""
    if isinstance(obj, DictConfig | ListConfig):
        return OmegaConf.to_container(obj, resolve=True)
    return dict(obj) if isinstance(obj, Mapping) else obj


def load_pretrained(
    cls: type[ProcessorLALM],
    path: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    random_init: bool,
    arch: Mapping[str, Any] | None,
    processor_path: str | None,
):
    """(model, processor) for `cls` at `path`; see `ProcessorLALM.load`."""
    processor_path = processor_path or path
    if random_init:
        config = _architecture(cls, path, arch)
        try:
            processor = cls.processor_class.from_pretrained(processor_path)
        except OSError:
            log.warning(
                "no processor at %s: using a stand-in (project tokenizer, Whisper features sized for the "
                "encoder); fine for speed measurements, meaningless for answers",
                processor_path,
            )
            tokenizer = train_tokenizer(default_corpus(), cls.special_tokens)
            audio = config.audio_config
            processor = build_processor(
                cls, tokenizer, n_mels=audio.num_mel_bins, max_source_positions=audio.max_source_positions
            )
            config.audio_token_id = tokenizer.convert_tokens_to_ids(cls.audio_token)
        with device:
            model = cls.model_class._from_config(config, dtype=dtype)
        return model, processor

    if not Path(path).is_dir():
        log.info("model.path=%s is not a local directory: trying the Hugging Face Hub cache", path)
    try:
        model = cls.model_class.from_pretrained(path, dtype=dtype)
    except OSError as err:
        raise not_available("weights", path, err) from err
    try:
        processor = cls.processor_class.from_pretrained(processor_path)
    except OSError as err:
        raise not_available("processor", processor_path, err) from err
    return model.to(device), processor
