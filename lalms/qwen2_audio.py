"""Qwen2-Audio (Qwen/Qwen2-Audio-7B-Instruct and its tiny offline sibling)."""

from __future__ import annotations

from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

from lalms.processor_based import ProcessorLALM
from lalms.tiny import TinySizes

# ChatML as Qwen2-Audio-Instruct was trained on it: each clip is announced as "Audio N:" and wrapped
# in audio_bos/eos; without a system turn the default system prompt is inserted.
QWEN2_AUDIO_TEMPLATE = (
    "{% set ns = namespace(clips=0) %}"
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'audio' %}"
    "{% set ns.clips = ns.clips + 1 %}"
    "Audio {{ ns.clips }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Qwen2Audio(ProcessorLALM):
    model_class = Qwen2AudioForConditionalGeneration
    processor_class = Qwen2AudioProcessor
    config_class = Qwen2AudioConfig
    audio_token = "<|AUDIO|>"
    special_tokens = ("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>")
    chat_template = QWEN2_AUDIO_TEMPLATE

    @classmethod
    def tiny_config(cls, tokenizer, sizes: TinySizes) -> Qwen2AudioConfig:
        return Qwen2AudioConfig(
            audio_config={
                "model_type": "qwen2_audio_encoder",
                "num_mel_bins": sizes.n_mels,
                "encoder_layers": sizes.audio_layers,
                "encoder_attention_heads": sizes.heads,
                "encoder_ffn_dim": sizes.audio_ffn,
                "d_model": sizes.d_model,
                "max_source_positions": sizes.max_source_positions,
            },
            text_config=sizes.text_config(tokenizer),
            audio_token_index=tokenizer.convert_tokens_to_ids(cls.audio_token),
        )
