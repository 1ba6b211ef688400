"""Single-editing sweep speed, one edit at a time against K edits in one batch, side by side.

For each editor: the unedited model's answers are generated once (not timed: every editor after
the first finds them cached), then the same instances are edited, answered and undone at
edits_per_batch=1 (one edit, one batched generation of its queries, one undo) and at K (K edits,
one batched generation of all their queries with each row seeing only its own edit, one undo:
evaluation/sweep.py). Judging is left out (it is the same work). Prints seconds per edit at 1
and at K, the speed-up, and whether the answers agree.

    python benchmarks/evaluate_sweep.py                                  # mend and rome, 32 instances, K=16
    python benchmarks/evaluate_sweep.py +editors=[mend,rome,ft_llm] +instances=64 +k=16
    python benchmarks/evaluate_sweep.py ckpt=checkpoints/mend-tiny-sake_mini +editors=[]

MEND and KE without ckpt= are untrained networks (an untrained network's edits cost a trained
one's); `ckpt=` adds the export to the editors timed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))

from cli.config import editor_hparams, register_resolvers  # noqa: E402
from datamodules.audio_io import AudioResolver  # noqa: E402
from editors.checkpoint import load_editor  # noqa: E402
from editors.hypernet import HypernetEditor, HyperNetwork  # noqa: E402
from editors.registry import build  # noqa: E402
from evaluation.judges.rule import RuleJudge  # noqa: E402
from evaluation.responses import ResponseCache  # noqa: E402
from evaluation.sweep import Generation, Sweeper  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    n, k = int(cfg.get("instances", 32)), int(cfg.get("k", 16))
    names = list(cfg.get("editors", ["mend", "rome"]))
    lalm = instantiate(cfg.model)
    data = instantiate(cfg.data)
    data.prepare_data()
    pool = data.train_pool(lalm.sampling_rate)
    items = data.eval_instances()[:n]
    resolver = AudioResolver(data.audio_root)
    cache = ResponseCache(None, lalm.answers_fingerprint())  # in memory, shared by the editors timed

    model = HydraConfig.get().runtime.choices["model"]
    editors = {name: editor_named(name, model, lalm, pool) for name in names}
    if cfg.ckpt:
        editors[Path(cfg.ckpt).name] = load_editor(cfg.ckpt, lalm, pool)
    rows = []
    for name, editor in editors.items():
        times, answers = {}, {}
        for edits in (1, k):
            generation = Generation(cfg.max_new_tokens, cfg.batch_size, edits)
            sweeper = Sweeper(lalm, editor, RuleJudge(), resolver, cache, generation)
            sweeper.prepare(items)  # the unedited answers: generated for the first editor, then cached
            batches = sweeper.batches(items)
            sweeper.answers(batches[0], [list(inst.queries()) for inst in batches[0]])  # warm-up
            start = time.perf_counter()
            got = []
            for batch in batches:
                posts, _ = sweeper.answers(batch, [list(inst.queries()) for inst in batch])
                got += [p for ps in posts for p in ps]
            times[edits], answers[edits] = (time.perf_counter() - start) / len(items), got
        same = sum(a == b for a, b in zip(answers[1], answers[k], strict=True))
        rows.append((name, times[1], times[k], same, len(answers[1])))
    threads = torch.get_num_threads()
    print(
        f"{len(items)} instances, {lalm.name} on {lalm.device} ({threads} threads), {cfg.max_new_tokens} "
        f"new tokens, batch_size {cfg.batch_size}; seconds per edit (edit, answer all queries, undo):"
    )
    print(f"{'editor':<24} {'K=1':>8} {f'K={k}':>8} {'speed-up':>9}  answers equal")
    for name, one, many, same, total in rows:
        print(f"{name:<24} {one:8.3f} {many:8.3f} {one / many:8.2f}x  {same}/{total}")


def editor_named(name: str, model: str, lalm, pool):
    """Editor `name` as evaluate.py builds it for `model=` (its config and the tuning file)."""
    cfg = compose(config_name="evaluate", overrides=[f"editor={name}", f"model={model}"])
    editor = build(cfg.editor.method, editor_hparams(cfg), lalm, pool, f"configs/editor/{name}.yaml")
    return HypernetEditor(editor) if isinstance(editor, HyperNetwork) else editor


if __name__ == "__main__":
    register_resolvers()
    main()
