"""DeSTA2.5-Audio (DeSTA-ntu/DeSTA2.5-Audio-Llama-3.1-8B), assembled from transformers parts.

The model (kehanlu/DeSTA2.5-Audio, `desta/models/modeling_desta25.py`) is a Whisper model, a
Q-Former connector and a Llama-3.1 LLM:

- Whisper's encoder runs without its final layer norm; after each tapped layer (the last of
  each quarter: 7, 15, 23, 31 of large-v3's 32) the connector's BERT encoder (self-attention over
  `prompt_size` learned prompt vectors of that layer, cross-attention to the layer's states)
  reads it; a softmax over the tapped layers, per prompt vector, mixes the results, and
  LayerNorm + Linear take them to the LLM's width.
- Whisper's decoder transcribes the clip (greedy, at most 128 tokens) when a voice-activity
  detector hears speech in it; otherwise the transcript is " ".
- In the prompt, the audio locator `<|AUDIO|>` (wrapped as `<start_audio><|AUDIO|><end_audio>`)
  becomes `prompt_size` placeholder positions, which take the connector's vectors, followed by
  the transcript's tokens.

The release folder holds `config.json` (the fields of `DeSTAConfig`) and `model.safetensors`
(the connector's weights, `perception.connector.*`); the config names the LLM
(`llm_model_id`) and Whisper (`encoder_model_id`) checkpoints it sits on. State-dict names are
the release's: `perception.whisper.*`, `perception.connector.*`, `llm_model.*`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import processors
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)
from transformers.models.bert.modeling_bert import BertEncoder

from lalms.base import IGNORE_INDEX, LALM, hidden
from lalms.loading import not_available, plain, resolve_device, resolve_dtype, whisper_features
from lalms.prompt import Prompt
from lalms.tokenizer import default_corpus, train_tokenizer

log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CONNECTOR = "perception.connector."
NO_SPEECH = " "  # the transcript of a clip without speech, as upstream
# Upstream loads Whisper and builds the connector in float32 and only the LLM in bfloat16; the
# connector's vectors are cast to the LLM's dtype where they enter its input.
PERCEPTION_DTYPE = torch.float32
VADS = ("silero", "none")

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


class QformerConnector(nn.Module):
    """Learned prompt vectors per tapped layer, a BERT encoder that cross-attends from them to the
    layer's states, a per-vector softmax over layers, and LayerNorm + Linear into the LLM."""

    def __init__(self, config: DeSTAConfig, encoder: WhisperConfig, llm_hidden: int) -> None:
        super().__init__()
        d = encoder.d_model
        self.target_layer_ids = config.target_layer_ids or tapped_layers(encoder.encoder_layers)
        if max(self.target_layer_ids) >= encoder.encoder_layers:
            raise ValueError(
                f"target_layer_ids {list(self.target_layer_ids)} exceed the encoder's "
                f"{encoder.encoder_layers} layers"
            )
        n = len(self.target_layer_ids)
        self.layer_prompts = nn.ParameterList(
            [nn.Parameter(torch.randn(1, config.prompt_size, d)) for _ in range(n)]
        )
        self.layer_weights = nn.Parameter(torch.zeros(config.prompt_size, n))
        bert = BertConfig(
            num_hidden_layers=config.qformer_num_hidden_layers,
            num_attention_heads=encoder.encoder_attention_heads,
            hidden_size=d,
            intermediate_size=config.qformer_intermediate_size,
            add_cross_attention=True,
            is_decoder=True,
        )
        # Eager attention without a mask: the prompt vectors attend to each other both ways, as in
        # the release (SDPA would make the self-attention causal for a decoder config).
        bert._attn_implementation = "eager"
        self.qformer = BertEncoder(bert)
        self.proj = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, llm_hidden))

    def forward(self, taps: Sequence[torch.Tensor]) -> torch.Tensor:
        """(clips, prompt_size, llm_hidden) from the tapped layers' states (clips, frames, d)."""
        outs = [
            self.qformer(prompt.expand(h.shape[0], -1, -1), encoder_hidden_states=h).last_hidden_state
            for prompt, h in zip(self.layer_prompts, taps, strict=True)
        ]
        mix = self.layer_weights.softmax(dim=-1).unsqueeze(-1)  # (prompt_size, layers, 1)
        return self.proj((torch.stack(outs, dim=2) * mix).sum(dim=2))


class WhisperPerception(nn.Module):
    """Whisper (its encoder feeds the connector; its decoder transcribes) and the connector."""

    def __init__(self, whisper: WhisperForConditionalGeneration, connector: QformerConnector) -> None:
        super().__init__()
        self.whisper = whisper
        self.connector = connector

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        encoder = self.whisper.get_encoder()
        h = nn.functional.gelu(encoder.conv1(input_features))
        h = nn.functional.gelu(encoder.conv2(h)).permute(0, 2, 1)
        h = h + encoder.embed_positions.weight[: h.shape[1]]
        targets = self.connector.target_layer_ids
        taps = []
        for i, layer in enumerate(encoder.layers[: max(targets) + 1]):
            h = hidden(layer(h, None))  # the final layer norm is not applied, as upstream
            if i in targets:
                taps.append(h)
        return self.connector(taps)


class DeSTA25Model(nn.Module):
    """Perception and LLM: the placeholder positions of `input_ids` take the connector's vectors."""

    def __init__(self, perception: WhisperPerception, llm_model: nn.Module, placeholder_id: int) -> None:
        super().__init__()
        self.perception = perception
        self.llm_model = llm_model
        self.placeholder_id = placeholder_id

    @property
    def dtype(self) -> torch.dtype:
        return self.llm_model.dtype

    @property
    def generation_config(self) -> GenerationConfig:
        return self.llm_model.generation_config

    def get_input_embeddings(self) -> nn.Module:
        return self.llm_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.llm_model.get_output_embeddings()

    @property
    def perception_dtype(self) -> torch.dtype:
        return self.perception.connector.layer_weights.dtype

    def embed(self, input_ids: torch.Tensor, input_features: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.get_input_embeddings()(input_ids)
        if input_features is None:
            return embeds
        features = input_features.to(self.perception_dtype)
        audio = self.perception(features).to(embeds.dtype)  # (clips, prompt_size, hidden)
        where = input_ids == self.placeholder_id
        if int(where.sum()) != audio.shape[0] * audio.shape[1]:
            raise ValueError(
                f"{int(where.sum())} placeholder positions for {audio.shape[0]} clips of {audio.shape[1]}"
            )
        # Row-major order of the positions is the clips' order of appearance.
        return embeds.masked_scatter(where.unsqueeze(-1), audio)

    def forward(self, input_ids, attention_mask=None, input_features=None, **kwargs):
        embeds = self.embed(input_ids, input_features)
        return self.llm_model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    def generate(self, input_ids, attention_mask=None, input_features=None, **kwargs) -> torch.Tensor:
        """The prompt's tokens followed by the generated ones (like a transformers model's)."""
        embeds = self.embed(input_ids, input_features)
        return self.llm_model.generate(
            input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask, **kwargs
        )


def module_state(module: nn.Module) -> tuple:
    """Changes whenever a parameter of `module` is written in place (its version counter) or a
    hook is added to or removed from one of its submodules: what a cached output depends on."""
    versions = tuple(p._version for p in module.parameters())
    hooks = tuple(k for m in module.modules() for k in (*m._forward_pre_hooks, *m._forward_hooks))
    return versions, hooks


class Transcriber:
    """Whisper's transcripts of clips, batched and cached per clip (by its samples).

    The cache holds for Whisper's weights as they are: an edit that writes them (or hooks them)
    makes the next call transcribe again, as upstream transcribes on every call.
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
        self._cache: dict[str, str] = {}
        self._state: tuple | None = None

    def has_speech(self, clip: np.ndarray) -> bool:
        return self._speech is None or self._speech(clip, self.feature_extractor.sampling_rate)

    @torch.no_grad()
    def __call__(self, clips: Sequence[np.ndarray]) -> list[str]:
        if not clips:
            return []
        state = module_state(self.whisper)
        if state != self._state:
            self._cache, self._state = {}, state
        keys = [hashlib.sha256(c.tobytes()).hexdigest() for c in clips]
        todo = {k: c for k, c in zip(keys, clips, strict=True) if k not in self._cache}
        speech = []
        for key, clip in todo.items():
            if self.has_speech(clip):
                speech.append(key)
            else:
                self._cache[key] = NO_SPEECH
        param = next(self.whisper.parameters())
        for start in range(0, len(speech), self.batch_size):
            chunk = speech[start : start + self.batch_size]
            features = self.feature_extractor(
                [todo[k] for k in chunk],
                sampling_rate=self.feature_extractor.sampling_rate,
                return_tensors="pt",
            ).input_features.to(param.device, param.dtype)
            ids = self.whisper.generate(
                input_features=features,
                attention_mask=torch.ones(
                    features.shape[0], features.shape[-1], dtype=torch.long, device=param.device
                ),
                generation_config=self.generation_config,
            )
            texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
            self._cache.update({k: t.strip() for k, t in zip(chunk, texts, strict=True)})
        return [self._cache[k] for k in keys]


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


class DeSTA25(LALM):
    """DeSTA2.5-Audio behind the LALM interface (see the module docstring for the model)."""

    audio_token = "<|AUDIO|>"  # the release's audio_locator; a config may name another
    answer_suffix = "<|eot_id|>"
    chat_template = LLAMA31_TEMPLATE
    special_tokens = (
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|AUDIO|>",
        "<|reserved_special_token_87|>",
        "<|startoftranscript|>",
    )

    def __init__(
        self,
        model: DeSTA25Model,
        tokenizer,
        feature_extractor: WhisperFeatureExtractor,
        asr_tokenizer,
        config: DeSTAConfig,
        *,
        chat_template: str | None = None,
        vad: str = "silero",
        asr_max_new_tokens: int = 128,
        source: str = "",
        **settings: Any,
    ) -> None:
        self.config = config
        self.audio_token = config.audio_locator
        self.locator_id = _token_id(tokenizer, config.audio_locator, "audio_locator")
        super().__init__(
            model,
            tokenizer,
            template=chat_template or tokenizer.chat_template or self.chat_template,
            audio_token_id=_token_id(tokenizer, config.placeholder_token, "placeholder_token"),
            **settings,
        )
        self.feature_extractor = feature_extractor
        self.asr_tokenizer = asr_tokenizer
        self.transcriber = Transcriber(
            model.perception.whisper,
            feature_extractor,
            asr_tokenizer,
            vad=vad,
            max_new_tokens=asr_max_new_tokens,
        )
        self._source = source

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        path: str,
        *,
        dtype: str = "auto",
        device: str = "auto",
        random_init: bool = False,
        arch: Mapping[str, Any] | None = None,
        llm_path: str | None = None,
        encoder_path: str | None = None,
        **settings: Any,
    ) -> DeSTA25:
        """The release at `path` (a folder or Hub id) on the LLM and Whisper checkpoints its config
        names (a folder inside the release, a local path or a Hub id), or `llm_path`/`encoder_path`.

        With `random_init=True` the architecture is built without weights, from the configs when
        reachable, else from `arch` (`desta`, `llm` and `encoder` sections of the model's yaml).
        """
        torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
        arch = plain(arch) or {}
        release = _release(path, required=not random_init)
        if release is not None:
            config = DeSTAConfig.read(release / CONFIG)
        elif "desta" in arch:
            config = DeSTAConfig.from_dict(plain(arch["desta"]), "model.arch.desta")
        else:
            raise not_available("DeSTA2.5 release config", path, FileNotFoundError(CONFIG))
        llm_src = llm_path or _part(release, config.llm_model_id)
        enc_src = encoder_path or _part(release, config.encoder_model_id)
        if random_init:
            return cls._random(config, llm_src, enc_src, arch, torch_dtype, torch_device, str(path), settings)
        try:
            llm = AutoModelForCausalLM.from_pretrained(llm_src, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(llm_src)
        except OSError as err:
            raise not_available("LLM", llm_src, err, "model.llm_path") from err
        try:
            whisper = WhisperForConditionalGeneration.from_pretrained(enc_src, dtype=PERCEPTION_DTYPE)
            feature_extractor = WhisperFeatureExtractor.from_pretrained(enc_src)
            asr_tokenizer = _decoding_as_configured(AutoTokenizer.from_pretrained(enc_src))
        except OSError as err:
            raise not_available("Whisper model", enc_src, err, "model.encoder_path") from err
        model = cls.assemble(config, whisper, llm, _prepared(tokenizer, config))
        load_connector(model, release / WEIGHTS)
        return cls(
            model.to(torch_device),
            tokenizer,
            feature_extractor,
            asr_tokenizer,
            config,
            source=str(path),
            **settings,
        )

    @classmethod
    def _random(cls, config, llm_src, enc_src, arch, dtype, device, path, settings) -> DeSTA25:
        llm_config = _config(llm_src, arch.get("llm"), "model.arch.llm")
        enc_config = _config(enc_src, arch.get("encoder"), "model.arch.encoder")
        try:
            tokenizer = AutoTokenizer.from_pretrained(llm_src)
            asr_tokenizer = AutoTokenizer.from_pretrained(enc_src)
            feature_extractor = WhisperFeatureExtractor.from_pretrained(enc_src)
        except OSError:
            log.warning(
                "no tokenizer or feature extractor at %s / %s: using stand-ins (project tokenizer, Whisper "
                "features sized for the encoder); fine for speed measurements, meaningless for answers",
                llm_src,
                enc_src,
            )
            tokenizer = asr_tokenizer = _tiny_tokenizer(train_tokenizer(default_corpus(), cls.special_tokens))
            feature_extractor = whisper_features(enc_config.num_mel_bins, enc_config.max_source_positions)
        with device:
            llm = AutoModelForCausalLM.from_config(llm_config, dtype=dtype)
            whisper = WhisperForConditionalGeneration._from_config(enc_config, dtype=PERCEPTION_DTYPE)
            model = cls.assemble(config, whisper, llm, _prepared(tokenizer, config))
        return cls(model, tokenizer, feature_extractor, asr_tokenizer, config, source=path, **settings)

    @classmethod
    def assemble(cls, config: DeSTAConfig, whisper, llm, tokenizer) -> DeSTA25Model:
        """The model from its parts; the connector is randomly initialised (as upstream, before
        the release's weights are loaded into it) in Whisper's dtype."""
        connector = QformerConnector(config, whisper.config, llm.config.hidden_size)
        connector.to(next(whisper.parameters()).dtype)
        placeholder = _token_id(tokenizer, config.placeholder_token, "placeholder_token")
        return DeSTA25Model(WhisperPerception(whisper, connector), llm, placeholder)

    @classmethod
    def tiny(cls, tokenizer, sizes) -> DeSTA25:
        tokenizer = _tiny_tokenizer(tokenizer)
        sot = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
        pad = tokenizer.pad_token_id
        llm = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=sizes.d_model,
                intermediate_size=sizes.intermediate,
                num_hidden_layers=sizes.text_layers,
                num_attention_heads=sizes.heads,
                num_key_value_heads=sizes.kv_heads,
                max_position_embeddings=2048,
                tie_word_embeddings=False,
                pad_token_id=pad,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
        llm.generation_config = GenerationConfig(
            do_sample=False, eos_token_id=[tokenizer.eos_token_id, pad], pad_token_id=pad, max_new_tokens=32
        )
        whisper = WhisperForConditionalGeneration(
            WhisperConfig(
                vocab_size=len(tokenizer),
                num_mel_bins=sizes.n_mels,
                d_model=sizes.d_model,
                encoder_layers=sizes.audio_layers,
                encoder_attention_heads=sizes.heads,
                encoder_ffn_dim=sizes.audio_ffn,
                decoder_layers=sizes.asr_layers,
                decoder_attention_heads=sizes.heads,
                decoder_ffn_dim=sizes.audio_ffn,
                max_source_positions=sizes.max_source_positions,
                max_target_positions=200,
                decoder_start_token_id=sot,
                pad_token_id=pad,
                bos_token_id=pad,
                eos_token_id=pad,
                begin_suppress_tokens=None,
                suppress_tokens=None,
            )
        )
        whisper.generation_config = GenerationConfig(
            decoder_start_token_id=sot, eos_token_id=pad, pad_token_id=pad, max_new_tokens=128
        )
        config = DeSTAConfig(
            llm_model_id="llm",
            encoder_model_id="whisper",
            prompt_size=sizes.connector_prompts,
            target_layer_ids=tapped_layers(sizes.audio_layers),
            qformer_intermediate_size=sizes.audio_ffn,
        )
        feature_extractor = whisper_features(sizes.n_mels, sizes.max_source_positions)
        model = cls.assemble(config, whisper, llm, tokenizer)
        return cls(model, tokenizer, feature_extractor, tokenizer, config)

    def save(self, out_dir: str | Path) -> Path:
        """The release layout: config.json and the connector's model.safetensors, with the LLM and
        Whisper in the folders `llm/` and `whisper/` the config names."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        llm, whisper = self.model.llm_model, self.model.perception.whisper
        llm.save_pretrained(out / "llm")
        self.tokenizer.save_pretrained(out / "llm")
        whisper.save_pretrained(out / "whisper")
        self.feature_extractor.save_pretrained(out / "whisper")
        self.asr_tokenizer.save_pretrained(out / "whisper")
        config = {**self.config.to_dict(), "llm_model_id": "llm", "encoder_model_id": "whisper"}
        config["target_layer_ids"] = list(self.model.perception.connector.target_layer_ids)
        (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        connector = {
            CONNECTOR + k: v.detach().contiguous().cpu()
            for k, v in self.model.perception.connector.state_dict().items()
        }
        save_file(connector, str(out / WEIGHTS), metadata={"format": "pt"})
        return out

    # ----------------------------------------------------------------- properties
    @property
    def sampling_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    def to_device(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """As every family's, except that the audio features keep the perception's float32."""
        features = batch.get("input_features")
        out = super().to_device({k: v for k, v in batch.items() if k != "input_features"})
        if features is not None:
            out["input_features"] = features.to(self.device, self.model.perception_dtype)
        return out

    @property
    def source(self) -> str:
        return self._source

    def settings(self) -> dict[str, Any]:
        t = self.transcriber
        return {**super().settings(), "desta": self.config.to_dict(), "vad": t.vad, "asr": t.max_new_tokens}

    # ----------------------------------------------------------------- prompts
    def messages(self, prompt: Prompt) -> list[dict]:
        """The prompt as upstream's messages: string contents, `<|AUDIO|>\\n` before a clip's question."""
        system = prompt.system if prompt.system is not None else self.system_prompt
        msgs: list[dict] = [{"role": "system", "content": system}] if system is not None else []
        for i, turn in enumerate(prompt.turns):
            text = f"{self.audio_token}\n{turn.question}" if turn.audio is not None else turn.question
            msgs.append({"role": "user", "content": text})
            if i < len(prompt.history):
                if turn.answer is None:
                    raise ValueError(f"prior turn {i} ({turn.question[:40]!r}) has no answer")
                msgs.append({"role": "assistant", "content": turn.answer})
        return msgs

    def render(self, prompt: Prompt) -> str:
        return self.tokenizer.apply_chat_template(
            self.messages(prompt), chat_template=self.template, tokenize=False, add_generation_prompt=True
        )

    def transcripts(self, clips: Sequence[np.ndarray]) -> list[str]:
        """What the LLM reads after each clip's connector vectors."""
        return self.transcriber(clips)

    # ----------------------------------------------------------------- batching
    def encode(
        self, prompts: Sequence[Prompt], answers: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        if answers is not None and len(answers) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        if not prompts:
            raise ValueError("empty batch")
        audios = self.audios(prompts)
        transcript_ids = [
            self.tokenizer(t, add_special_tokens=False).input_ids for t in self.transcripts(audios)
        ]
        wrapped = f"<start_audio>{self.audio_token}<end_audio>"  # the release's training format
        rows, label_rows, clip = [], [], 0
        for i, prompt in enumerate(prompts):
            n_clips = sum(t.audio is not None for t in prompt.turns)
            # Upstream tokenises a prompt without audio with the tokenizer's special tokens (a
            # second <|begin_of_text|> before the template's) and one with audio without them.
            ids = self.tokenizer(
                self.render(prompt).replace(self.audio_token, wrapped), add_special_tokens=n_clips == 0
            ).input_ids
            if ids.count(self.locator_id) != n_clips or self.audio_token_id in ids:
                raise ValueError(
                    f"prompt {i}: {ids.count(self.locator_id)} audio placeholders {self.audio_token!r} "
                    f"for {n_clips} clips (does the question text contain the audio token?)"
                )
            expanded: list[int] = []
            for tok in ids:
                if tok == self.locator_id:
                    expanded += [self.audio_token_id] * self.config.prompt_size + transcript_ids[clip]
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
        batch = self.pad(rows, label_rows if answers is not None else None)
        if audios:
            batch["input_features"] = self.feature_extractor(
                audios, sampling_rate=self.sampling_rate, return_tensors="pt"
            ).input_features
        return batch


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


LLAMA_PAD = "<|finetune_right_pad_id|>"  # Llama-3.1's reserved padding token


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
