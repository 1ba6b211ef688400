"""Audio Flamingo 3 (nvidia/audio-flamingo-3-hf, transformers >= 5.0) and its tiny offline sibling.

Its processor ships no default chat template and its published generation config may sample, so
the template below is passed explicitly and generation is always greedy (see `LALM.generate`).
"""

from __future__ import annotations

from transformers import AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration, AudioFlamingo3Processor

from lalms.processor_based import ProcessorLALM
from lalms.tiny import TinySizes

# ChatML with one <sound> placeholder leading the text of a user turn that carries audio.
AF3_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] if item['type'] == 'audio' %}<sound>{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class AudioFlamingo3(ProcessorLALM):
    model_class = AudioFlamingo3ForConditionalGeneration
    processor_class = AudioFlamingo3Processor
    config_class = AudioFlamingo3Config
    audio_token = "<sound>"
    special_tokens = ("<sound>",)
    chat_template = AF3_TEMPLATE

    @classmethod
    def tiny_config(cls, tokenizer, sizes: TinySizes) -> AudioFlamingo3Config:
        return AudioFlamingo3Config(
            audio_config={
                "model_type": "audioflamingo3_encoder",
                "num_mel_bins": sizes.n_mels,
                "num_hidden_layers": sizes.audio_layers,
                "num_attention_heads": sizes.heads,
                "intermediate_size": sizes.audio_ffn,
                "hidden_size": sizes.d_model,
                "max_source_positions": sizes.max_source_positions,
            },
            text_config=sizes.text_config(tokenizer),
            audio_token_id=tokenizer.convert_tokens_to_ids(cls.audio_token),
        )
