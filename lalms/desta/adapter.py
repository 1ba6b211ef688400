"""`DeSTA25`: DeSTA2.5-Audio behind the LALM interface (loading, saving, prompts, batches).

In the prompt, the audio locator `<|AUDIO|>` (wrapped as `<start_audio><|AUDIO|><end_audio>`, the
release's training format) becomes `prompt_size` placeholder positions, which take the
connector's vectors (`lalms.desta.modules`), followed by the clip's transcript's tokens
(`lalms.desta.transcriber`). A prompt without audio is tokenised with the tokenizer's own BOS,
one with audio without it, as upstream does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from common.prompt import Prompt
from lalms.base import IGNORE_INDEX, LALM
from lalms.desta.config import (
    CONFIG,
    CONNECTOR,
    LLAMA31_TEMPLATE,
    PERCEPTION_DTYPE,
    WEIGHTS,
    DeSTAConfig,
    tapped_layers,
)
from lalms.desta.modules import DeSTA25Model, QformerConnector, WhisperPerception
from lalms.desta.release import (
    _config,
    _decoding_as_configured,
    _part,
    _prepared,
    _release,
    _tiny_tokenizer,
    _token_id,
    load_connector,
)
from lalms.desta.transcriber import Transcriber
from lalms.loading import not_available, plain, resolve_device, resolve_dtype, whisper_features
from lalms.tokenizer import default_corpus, train_tokenizer

log = logging.getLogger(__name__)


class DeSTA25(LALM):
    """DeSTA2.5-Audio behind the LALM interface (see the `lalms.desta` package docstring for the model)."""

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
