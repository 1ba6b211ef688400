"""How long the model fingerprint takes (every weight and buffer hashed where it lives):

    python benchmarks/fingerprint.py                                  # the shipped tiny model, CPU
    python benchmarks/fingerprint.py model=qwen model.random_init=true model.dtype=bfloat16 \\
        model.device=cuda                                             # the 8.4B architecture on a GPU

`+repeats=N` times it N times (default 3). Prints one line: parameters, bytes, seconds, GB/s.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))

from cli.config import register_resolvers  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    lalm = instantiate(cfg.model)
    state = lalm.model.state_dict()
    n_bytes = sum(t.numel() * t.element_size() for t in state.values())
    n_params = sum(p.numel() for p in lalm.model.parameters())
    times = []
    for _ in range(int(cfg.get("repeats", 3))):
        if lalm.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        digest = lalm.fingerprint()
        times.append(time.perf_counter() - start)
    best, dtype = min(times), next(iter(state.values())).dtype
    print(
        f"fingerprint {digest}: {n_params / 1e6:.1f}M parameters, {n_bytes / 2**30:.2f} GiB on {lalm.device} "
        f"({dtype}); {best:.3f} s (best of {len(times)}), {n_bytes / best / 1e9:.2f} GB/s"
    )


if __name__ == "__main__":
    register_resolvers()
    main()
