"""Single-editing sweep speed: the batched evaluation against a naive one-query-at-a-time loop.

Batched (what evaluate.py does): the unedited model's answers to all queries generated in large
batches once, then per instance one edit, one batched generation of all its queries, one undo.
Naive: per instance, each query's pre-edit answer generated alone, the edit, each query's
post-edit answer generated alone, the undo. Both use the same editor, model and instances:

    python benchmarks/evaluate_sweep.py editor=mend                       # untrained MEND, tiny model
    python benchmarks/evaluate_sweep.py ckpt=checkpoints/mend-tiny-sake_mini +instances=40

Judging is left out of both (it is the same work). Prints one summary line, with the batched
figure both with its pre-edit answers generated in the run (the first editor on a model) and
without them (every later editor: they come from the shared on-disk cache).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))

from cli.config import editor_hparams, register_resolvers, require  # noqa: E402
from datamodules.audio_io import AudioResolver  # noqa: E402
from editors.checkpoint import load_editor  # noqa: E402
from editors.hypernet import HypernetEditor, HyperNetwork  # noqa: E402
from editors.registry import build  # noqa: E402
from evaluation.judges.rule import RuleJudge  # noqa: E402
from evaluation.responses import ResponseCache  # noqa: E402
from evaluation.sweep import Sweeper  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    n = int(cfg.get("instances", 100))
    lalm = instantiate(cfg.model)
    data = instantiate(cfg.data)
    data.prepare_data()
    pool = data.train_pool(lalm.sampling_rate)
    if cfg.ckpt:
        editor = load_editor(cfg.ckpt, lalm, pool)
    else:  # an editor as its config builds it; an untrained network's edits cost a trained one's
        name = require(cfg, "editor", "the benchmark times an editor: editor=<name> or ckpt=<export>").name
        editor = build(cfg.editor.method, editor_hparams(cfg), lalm, pool, f"configs/editor/{name}.yaml")
        editor = HypernetEditor(editor) if isinstance(editor, HyperNetwork) else editor
    items = data.eval_instances()[:n]
    resolver = AudioResolver(data.audio_root)

    def sweeper(batch_size: int) -> Sweeper:
        cache = ResponseCache(None, lalm.fingerprint())  # in memory: nothing carried over between runs
        return Sweeper(lalm, editor, RuleJudge(), resolver, cache, cfg.max_new_tokens, batch_size)

    for inst in items[:2]:  # warm up (first-call allocations, audio decoding paths)
        sweeper(64).prompt(inst.reliability)

    batched = sweeper(cfg.batch_size)
    start = time.perf_counter()
    batched.prepare(items)
    t_pre = time.perf_counter() - start
    for inst in items:
        queries = list(inst.queries())
        handle = batched.apply(inst)
        batched.generate([batched.prompt(q) for q in queries])
        handle.undo()
    t_batched = time.perf_counter() - start

    naive = sweeper(1)
    start = time.perf_counter()
    for inst in items:
        queries = list(inst.queries())
        [naive.generate([naive.prompt(q)]) for q in queries]
        handle = naive.apply(inst)
        [naive.generate([naive.prompt(q)]) for q in queries]
        handle.undo()
    t_naive = time.perf_counter() - start

    queries = sum(len(list(i.queries())) for i in items)
    distinct = len({batched.key(q) for i in items for q in i.queries()})
    t_warm = t_batched - t_pre  # every editor after the first finds the pre-edit answers cached
    print(
        f"{len(items)} instances ({queries} queries, {lalm.name} on {lalm.device}): "
        f"naive {t_naive / len(items):.3f} s/instance; batched {t_batched / len(items):.3f} s/instance "
        f"(speed-up {t_naive / t_batched:.1f}x), of which pre-edit answers {t_pre / len(items):.3f} "
        f"({distinct / t_pre:.0f} queries/s); batched with the pre-edit answers cached "
        f"{t_warm / len(items):.3f} s/instance (speed-up {t_naive / t_warm:.1f}x; edit, answers and "
        f"undo at {queries / t_warm:.0f} queries/s)"
    )


if __name__ == "__main__":
    register_resolvers()
    main()
