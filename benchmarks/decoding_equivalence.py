"""Do the decoding speed-ups change answers, in the dtype and on the device at hand?

`LALM.generate` gives the output projection the last position only, and the pre-edit pass
batches queries of a kind together (evaluation/responses.py). On the CPU in float32 both give
plain transformers generation's answers exactly (tests/test_generation_speed.py, on the shipped
model and a tiny model of every family). In bfloat16 on a GPU, a different matrix shape or
batch composition may round differently, and a greedy step whose two best logits are that
close may flip. This script counts, over SAKE-mini's queries:
- answers that differ between plain generation and `LALM.generate` (same batches);
- answers that differ between data-order batches and the pre-edit pass's batches of a kind;
and for each difference, whether the first diverging step was a near-tie of plain generation
(its two best logits within `+tie` of each other, relative to the best): counted, not hidden.

    python benchmarks/decoding_equivalence.py                                # tiny, float32, CPU
    python benchmarks/decoding_equivalence.py model.dtype=bfloat16           # tiny, bf16
    python benchmarks/decoding_equivalence.py model=qwen model.random_init=true model.dtype=bfloat16 \
        +queries=200   # the 7B architecture
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

from cli.config import register_resolvers  # noqa: E402
from datamodules.examples import PromptMaker  # noqa: E402
from evaluation.responses import ResponseCache, pre_edit_responses  # noqa: E402
from lalms.base import last_position_only  # noqa: E402
from lalms.hooks import hooked  # noqa: E402


def generated(lalm, prompts, max_new_tokens: int, fast: bool):
    """(new token ids per row, plain generation's per-step scores or None)."""
    batch = lalm.to_device(lalm.encode(prompts))
    cfg = lalm.generation_config(max_new_tokens)
    head = lalm.model.get_submodule(lalm.edit_sites.lm_head)
    with torch.no_grad():
        if fast:
            with hooked(head, last_position_only, pre=True):
                out = lalm.model.generate(**batch, generation_config=cfg)
            return out[:, batch["input_ids"].shape[1] :].tolist(), None
        out = lalm.model.generate(
            **batch, generation_config=cfg, output_scores=True, return_dict_in_generate=True
        )
    scores = torch.stack(out.scores, 1).float()  # rows x steps x vocabulary
    return out.sequences[:, batch["input_ids"].shape[1] :].tolist(), scores


def near_tie(scores: torch.Tensor, a: list[int], b: list[int], tie: float) -> bool:
    """Whether the first step where `a` and `b` diverge had plain generation's two best logits
    within `tie` (relative) of each other."""
    step = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    if step >= scores.shape[0]:
        return False
    top = scores[step].topk(2).values
    return bool((top[0] - top[1]).abs() <= tie * top[0].abs().clamp_min(1e-6))


@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    n, tie = int(cfg.get("queries", 96)), float(cfg.get("tie", 2**-7))
    lalm = instantiate(cfg.model)
    data = instantiate(cfg.data)
    data.prepare_data()
    by_key = {(q.question, q.file, q.track): q for i in data.eval_instances() for q in i.queries()}
    qs = list(by_key.values())[:n]
    make = PromptMaker(data.resolver(), lalm.sampling_rate)
    prompts = [make(q) for q in qs]
    bs, new = int(cfg.batch_size), int(cfg.max_new_tokens)
    plain, fast, ties = [], [], 0
    for s in range(0, len(prompts), bs):
        ids, scores = generated(lalm, prompts[s : s + bs], new, fast=False)
        quick, _ = generated(lalm, prompts[s : s + bs], new, fast=True)
        pad = lalm.pad_token_id
        for r, (a, b) in enumerate(zip(ids, quick, strict=True)):
            a, b = [t for t in a if t != pad], [t for t in b if t != pad]
            plain.append(a)
            fast.append(b)
            ties += a != b and near_tie(scores[r], a, b, tie)
    differ = sum(a != b for a, b in zip(plain, fast, strict=True))
    text = [s.strip() for s in lalm.tokenizer.batch_decode(fast, skip_special_tokens=True)]
    keys = {id(q): f"q{i}" for i, q in enumerate(qs)}
    kinds = pre_edit_responses(
        qs, ResponseCache(None, "bench"), lambda ps: lalm.generate(ps, new), make, lambda q: keys[id(q)], bs
    )
    regrouped = sum(kinds[f"q{i}"] != t for i, t in enumerate(text))
    dtype = next(lalm.model.parameters()).dtype
    print(f"{len(qs)} queries, {lalm.name} in {dtype} on {lalm.device}, batch {bs}, {new} new tokens")
    print(f"last-position projection vs plain generation: {differ} answers differ", end=" ")
    print(f"({ties} at a near-tie, tie={tie:g})")
    print(f"batches of a kind vs data order:              {regrouped} answers differ")


if __name__ == "__main__":
    register_resolvers()
    main()
