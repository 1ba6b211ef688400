"""Meta-training throughput of a hypernetwork editor: instances/s, s/step and peak memory.

Runs the real meta step (capture, edit, edited forward, backward, optimiser step) on SAKE batches
through the same configs as train.py (the editor's training batch size included: SAKE's 2 edits
a step, the tiny model's 8), without Lightning's loop around it:

    python benchmarks/meta_train.py editor=mend                      # tiny model, SAKE-mini, CPU
    python benchmarks/meta_train.py editor=ke data.batch_size=4
    python benchmarks/meta_train.py editor=mend model=qwen model.random_init=true model.device=cuda \\
        model.dtype=bfloat16 data.batch_size=8                      # real-size model, random weights

`+steps=N` and `+warmup=N` set how many steps are timed and skipped (default 5 and 1).
Prints one summary line.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))

from cli.config import apply_training_changes, require  # noqa: E402
from lit_modules.base import build_module  # noqa: E402
from lit_modules.hypernet import MetaBatch  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    steps, warmup = int(cfg.get("steps", 5)), int(cfg.get("warmup", 1))
    editor = require(cfg, "editor", "the benchmark meta-trains an editor")
    apply_training_changes(cfg, HydraConfig.get().overrides.task)
    torch.manual_seed(cfg.seed)
    lalm = instantiate(cfg.model)
    data = instantiate(cfg.data)
    data.num_workers = 0
    data.prepare_data()
    pool = data.train_pool(lalm.sampling_rate)
    module = build_module(editor.module, f"configs/editor/{editor.name}.yaml", lalm=lalm, pool=pool)
    module = module.to(lalm.device)
    optimizer = module.configure_optimizers()
    stream = iter(data.dataset("train"))
    batches = [[next(stream) for _ in range(data.batch_size)] for _ in range(warmup + steps)]
    cuda = lalm.device.type == "cuda"
    times, rows = [], 0
    for i, examples in enumerate(batches):
        if i == warmup and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        batch = MetaBatch.build(examples, module.hp.objective.locality_per_edit, module.hp.objective.seed)
        out = module.meta_step(batch)
        loss = module.objective(out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            rows += len(batch.prompts)
    per_step = sum(times) / len(times)
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else "n/a (CPU)"
    params = sum(p.numel() for p in lalm.model.parameters()) / 1e6
    print(
        f"{editor.name} on {lalm.name} ({params:.1f}M params, {lalm.model.dtype}, {lalm.device}): "
        f"batch {data.batch_size} edits ({rows // len(times)} rows/step), {per_step:.2f} s/step, "
        f"{data.batch_size / per_step:.2f} instances/s, peak GPU memory {peak}, "
        f"{torch.get_num_threads()} CPU threads"
    )


if __name__ == "__main__":
    main()
