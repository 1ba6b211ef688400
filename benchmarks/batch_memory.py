"""The memory model that chooses edits_per_batch (evaluation/batching.py), checked on the real
architecture and applied to it at full size.

On the machine at hand (a CPU is enough) the random-init Qwen2-Audio-7B architecture is built
with its full widths but `+depth` LLM and audio layers (2 by default: a full-depth 7B does not
fit in a small machine's memory, and every figure the model uses is a per-layer sum), MEND
edits its layers' MLPs (untrained: the factors' shapes are a trained network's), K edits of
SAKE-mini are applied at once and a few of their queries answered. Measured against predicted:
- the bytes the K edits' factors hold (RowEdits) against K x per_edit;
- the KV cache's bytes per token (a forward with the cache kept) against the model's shapes.
Then the same shapes at full depth (32 layers, SAKE's edit layers 29-31) give the K that
`edits_per_batch=auto` picks for MEND, ROME-sized and FT(LLM)-sized edits on an 80 GB GPU with
the 7B in bf16, 256 new tokens and SAKE-length prompts:

    python benchmarks/batch_memory.py model=qwen editor=mend              # depth 2, K=4
    python benchmarks/batch_memory.py model=qwen editor=mend +depth=3 +k=8
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))

from cli.config import editor_hparams, register_resolvers  # noqa: E402
from datamodules.audio_io import AudioResolver  # noqa: E402
from datamodules.examples import PromptMaker  # noqa: E402
from editors.hypernet import HypernetEditor  # noqa: E402
from editors.registry import build  # noqa: E402
from evaluation import batching  # noqa: E402
from evaluation.sweep import request  # noqa: E402
from lalms.rows import RowsMemory, low_rank_memory  # noqa: E402

GB = 1e9


@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    depth, k = int(cfg.get("depth", 2)), int(cfg.get("k", 4))
    cfg.model.arch.text_config.num_hidden_layers = depth
    cfg.model.arch.audio_config.encoder_layers = depth
    cfg.model.random_init, cfg.editor.hparams.layers = True, list(range(depth))
    lalm = instantiate(cfg.model)
    data = instantiate(cfg.data)
    data.prepare_data()
    hp = editor_hparams(cfg)
    editor = HypernetEditor(build(cfg.editor.method, hp, lalm, data.train_pool(lalm.sampling_rate), "mend"))
    prompt = PromptMaker(AudioResolver(data.audio_root), lalm.sampling_rate)
    items = data.eval_instances()[:k]
    reqs = [request(inst, prompt(inst.reliability)) for inst in items]
    tokens = int(lalm.encode([r.prompt for r in reqs], [r.target for r in reqs])["input_ids"].shape[1])

    edit = editor.apply_rows(reqs)
    try:
        held = sum(
            t.numel() * t.element_size()
            for state in edit.edits._low_rank.values()
            for group in state.groups
            for pair in group
            for t in pair
        )
        queries = [prompt(q) for inst in items for q in list(inst.queries())[:2]]
        groups = [g for g in range(len(items)) for _ in range(2)]
        with edit.rows(queries, groups) as asked:
            answers = lalm.generate(asked, 2)
        enc = lalm.to_device(lalm.encode(queries))
        with edit.rows(queries, groups), torch.no_grad():
            out = lalm.model(**enc, use_cache=True)
    finally:
        edit.undo()
    cache = out.past_key_values
    kv_measured = sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
    ) / (enc["input_ids"].numel())
    kv_predicted = batching.kv_bytes_per_token(lalm)
    predicted = editor.rows_memory(tokens).per_edit * k
    print(
        f"Qwen2-Audio-7B architecture at depth {depth} ({lalm.model.dtype}, {lalm.device}), MEND on layers "
        f"{list(range(depth))}, {k} edits of prompts up to {tokens} tokens, {len(answers)} rows answered:"
    )
    bound = predicted / 1e6
    print(f"  factors held {held / 1e6:.1f} MB; predicted (K x per_edit, an upper bound) {bound:.1f} MB")
    print(f"  KV cache per token {kv_measured / 1e3:.1f} kB measured, {kv_predicted / 1e3:.1f} kB predicted")

    # Full size: SAKE's MEND on layers 29-31 (gate, up, down), 32 layers, bf16, on an 80 GB GPU.
    text = cfg.model.arch.text_config
    d, ff, layers, vocab = text.hidden_size, text.intermediate_size, 32, text.vocab_size
    kv_full = kv_predicted / depth * layers / lalm.model.dtype.itemsize * 2  # bf16
    sake_tokens, new, queries_per_edit, batch_size = 200, 256, 10, int(cfg.batch_size)
    weights = 8.4e9 * 2
    free = 80e9 - weights
    generation_row = int((sake_tokens + new) * kv_full + 4 * sake_tokens * ff * 2 + 2 * vocab * 4)
    mlp = [(ff, d), (ff, d), (d, ff)] * 3
    editors = {
        "MEND (3 layers x 3 MLP projections, rank <= 200 tokens)": low_rank_memory(
            mlp, sake_tokens, torch.bfloat16
        ),
        "ROME (one down-projection, rank 1)": low_rank_memory([(d, ff)], 1, torch.bfloat16),
        "FT(LLM) (a copy of one decoder layer)": RowsMemory(per_edit=(4 * d * d + 3 * d * ff + 2 * d) * 2),
    }
    print(
        f"At full size (32 layers, bf16 weights {weights / GB:.1f} GB, 80 GB GPU: {free / GB:.1f} GB free), "
        f"{sake_tokens}-token prompts, {new} new tokens, {queries_per_edit} queries per edit, "
        f"batch_size {batch_size} (KV {kv_full / 1e3:.0f} kB/token, {generation_row / GB:.2f} GB per row):"
    )
    for name, rows in editors.items():
        plan = batching.choose("auto", rows, generation_row, queries_per_edit, batch_size, int(free))
        print(
            f"  {name}: {rows.per_edit / GB:.3f} GB per edit, {rows.per_row / 1e6:.1f} MB per row -> "
            f"K={plan.edits_per_batch} ({plan.memory_bytes / GB:.1f} GB)"
        )


if __name__ == "__main__":
    register_resolvers()
    main()
