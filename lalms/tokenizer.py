"""An offline byte-level BPE tokenizer for tiny models, trained on the project's own text."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from importlib import resources

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


def default_corpus() -> list[str]:
    """The shipped text the stand-in and tiny tokenizers are trained on (SAKE vocabulary, 8 languages)."""
    text = resources.files("lalms").joinpath("tokenizer_corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def train_tokenizer(
    texts: Iterable[str],
    special_tokens: Sequence[str] = (),
    vocab_size: int = 1024,
    eos_token: str = "<|im_end|>",
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with the chat and `special_tokens` tokens. Deterministic for fixed input.

    Byte-level means every string (any script) is encodable, so a small corpus is enough.
    """
    specials = list(dict.fromkeys([PAD_TOKEN, *CHAT_TOKENS, *special_tokens]))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD_TOKEN,
        eos_token=eos_token,
        extra_special_tokens=specials[1:],
        model_input_names=["input_ids", "attention_mask"],
        padding_side="left",
    )
    return tok
