"""Tiny offline LALMs: ~1-2M parameter models of a real family, with an offline tokenizer.

    python -m lalms.tiny --family qwen2_audio --out checkpoints/my-tiny [--seed 0]
    python -m lalms.tiny --family desta --out checkpoints/my-tiny-desta

The result is a model folder in the family's published layout (a transformers model directory for
Qwen2-Audio and AF3; the release layout for DeSTA2.5) that the family's `load` reads like any
other. Its weights are random until trained.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lalms.tokenizer import default_corpus, train_tokenizer

if TYPE_CHECKING:
    from lalms.base import LALM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinySizes:
    """Sizes of a tiny model. 200 source positions = 400 mel frames = 4 s audio chunks."""

    n_mels: int = 80
    max_source_positions: int = 200
    d_model: int = 128
    audio_layers: int = 2
    audio_ffn: int = 512
    text_layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    connector_prompts: int = 16  # DeSTA2.5: Q-Former prompt vectors per clip (64 in the release)
    asr_layers: int = 1  # DeSTA2.5: Whisper decoder layers (its transcription step)

    def text_config(self, tokenizer) -> dict[str, Any]:
        """A Qwen2 decoder config (the LLM of both Qwen2-Audio and Audio Flamingo 3)."""
        return {
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": self.d_model,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.text_layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }


def build_tiny(
    family: type[LALM],
    out_dir: str | Path | None = None,
    *,
    sizes: TinySizes = TinySizes(),
    corpus: Iterable[str] | None = None,
    vocab_size: int = 1024,
    seed: int = 0,
) -> LALM:
    """Build a randomly initialised tiny model of `family`; save it to `out_dir` if given."""
    tokenizer = train_tokenizer(
        corpus if corpus is not None else default_corpus(),
        family.special_tokens,
        vocab_size,
        eos_token=family.answer_suffix,
    )
    torch.manual_seed(seed)
    lalm = family.tiny(tokenizer, sizes)
    if out_dir is not None:
        lalm.save(out_dir)
        n = sum(p.numel() for p in lalm.model.parameters())
        log.info("saved tiny %s (%.2fM parameters) to %s", family.__name__, n / 1e6, out_dir)
    return lalm


def text_of(path: str | Path) -> list[str]:
    """Lines of a text file, or every string in a YAML/JSON file (e.g. a SAKE-mini world)."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml", ".json"):
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    import yaml

    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, str):
            out.extend(line for line in node.splitlines() if line.strip())
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(k)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(yaml.safe_load(path.read_text(encoding="utf-8")))
    return out


def new_tiny(
    family: str = "qwen2_audio",
    corpus_files: list[str] | tuple[str, ...] = (),
    vocab_size: int = 1024,
    seed: int = 0,
    **sizes: int,
) -> LALM:
    """A fresh tiny model for pretraining; its tokenizer also learns the text of `corpus_files`."""
    from lalms import FAMILIES

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    corpus = default_corpus() + [line for f in corpus_files for line in text_of(f)]
    return build_tiny(
        FAMILIES[family], sizes=TinySizes(**sizes), corpus=corpus, vocab_size=vocab_size, seed=seed
    )


def main(argv: list[str] | None = None) -> None:
    from lalms import FAMILIES

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=sorted(FAMILIES), default="qwen2_audio")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_tiny(FAMILIES[args.family], args.out, seed=args.seed)


if __name__ == "__main__":
    main()
