"""Evaluate a knowledge editor on SAKE-format data (reliability, generality, locality, portability),
or on spoken facts (ES, PS, NS and their harmonic mean: data=spoken_facts).

python evaluate.py ckpt=checkpoints/mend-tiny-sake_mini      # a trained, exported editor
python evaluate.py editor=<name> model=qwen                   # an editor that needs no training
python evaluate.py editor=none                                # the unedited model's accuracy
python evaluate.py data=spoken_facts editor=fact_rome_audio    # a spoken-facts strategy (Table 1)
python evaluate.py mode=rescore results=FILE judge=openai     # re-judge saved responses, no model
python evaluate.py mode=compare runs='outputs/evaluate/*'     # many runs side by side (Table 2)
python evaluate.py dry_run=true                               # print the plan and exit
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

import hydra
from hydra.utils import instantiate
from lightning.fabric import Fabric
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from cli.config import (  # noqa: E402
    build_editor,
    enhance,
    log_config,
    model_enhancement,
    quiet_library_notices,
    register_resolvers,
    require,
)
from datamodules.audio_io import AudioResolver  # noqa: E402
from datamodules.examples import PromptMaker  # noqa: E402
from datamodules.spoken_facts import SpokenFactsData  # noqa: E402
from editors.checkpoint import read_info  # noqa: E402
from evaluation import batching, compare, fact_sweep, report, rescore, unedited  # noqa: E402
from evaluation.identity import run_identity  # noqa: E402
from evaluation.responses import ResponseCache  # noqa: E402
from evaluation.run import SweepPlan, run_sweeps  # noqa: E402
from evaluation.sweep import Generation, Sweeper  # noqa: E402

log = logging.getLogger(__name__)


def batch_plan(cfg: DictConfig, editor, lalm, prompt: PromptMaker, instances) -> batching.BatchPlan:
    """How many edits go in one batch (evaluation/batching.py), from the longest prompt among
    the first instances' queries."""
    sample = [q for inst in instances[:8] for q in inst.queries()]
    tokens = int(lalm.encode([prompt(q) for q in sample])["input_ids"].shape[1]) if sample else 1
    queries = max((len(list(inst.queries())) for inst in instances), default=1)
    k = cfg.edits_per_batch
    return batching.plan(k, editor, lalm, queries, tokens, cfg.batch_size, cfg.max_new_tokens)


def plan(cfg: DictConfig) -> str:
    judge = cfg.judge._target_.rsplit(".", 1)[-1]
    if cfg.mode == "compare":
        return f"compare the runs {cfg.runs} side by side (Table 2 layout); under {cfg.paths.output_dir}"
    if cfg.mode == "rescore":
        return f"re-judge the responses in {cfg.results} with {judge}; reports under {cfg.paths.output_dir}"
    editor = cfg.ckpt or (cfg.editor.name if cfg.get("editor") else "<editor=... or ckpt=...>")
    enhanced = f", enhanced ({cfg.enhancement})" if cfg.get("enhancement") is not None else ""
    if cfg.data.get("_target_", "").endswith("SpokenFactsData"):
        mode = "accumulated" if cfg.accumulate else "reset after each"
        return (
            f"edit the spoken facts of {cfg.data.name} ({cfg.split}) with {editor} on {cfg.model.name}, "
            f"edits {mode}, keys at the {cfg.data.anchor} word; ES/PS/NS/Score against the unedited "
            f"baseline; facts.jsonl, metrics.json, report.md, table1.csv under {cfg.paths.output_dir}"
        )
    return (
        f"evaluate {editor} on {cfg.model.name} ({cfg.model.path}){enhanced} over {cfg.data.name}, "
        f"judged by {judge}: "
        f"sweeps {list(cfg.sweeps)} (single: edit, score, restore, next; sequential: 10 sequences of 10, "
        f"gaps 0-{cfg.sequential.max_gap}); results.jsonl, metrics.json, report.md, plots under "
        f"{cfg.paths.output_dir}"
    )


def spoken_facts(cfg: DictConfig, fabric: Fabric, lalm, data: SpokenFactsData, model: dict, out_dir: Path):
    """data=spoken_facts: the localisation-and-editing study's sweep (evaluation/fact_sweep.py)."""
    every = data.facts(cfg.split)
    facts = [f for f in every if f.editable]  # Known-1000-style facts (no target) are traced, not edited
    if not facts:
        raise ValueError(f"{data.root}/{cfg.split}.jsonl: no fact has a target: nothing to edit")
    if len(facts) < len(every):
        left = len(every) - len(facts)
        log.info("%d of %d facts have no target and are left out of the edits", left, len(every))
    base_only = bool(cfg.get("editor") and cfg.editor.get("base_only"))
    if base_only:
        editor, editor_identity, settings = None, {"name": "none"}, {}
    else:
        editor, editor_identity, settings = build_editor(cfg, lalm, data.train_pool(lalm.sampling_rate))
    accumulate = bool(cfg.accumulate) and editor is not None
    identity = fact_sweep.identity(
        editor=editor_identity, model=model, data=data, split=cfg.split, facts=facts,
        accumulate=accumulate, batch_size=cfg.batch_size,
    )  # fmt: skip
    sweep = fact_sweep.FactSweep(lalm, editor, data, accumulate=accumulate, batch_size=cfg.batch_size)
    metrics = fact_sweep.run(fabric, sweep, facts, out_dir, identity, settings)
    log.info("%s\nfull report: %s", fact_sweep.figures(metrics), out_dir / "report.md")
    return metrics


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    log.info("plan: %s", plan(cfg))
    log_config()
    if cfg.dry_run:
        return
    out_dir = Path(cfg.paths.output_dir)
    if cfg.mode == "compare":
        compare.run(require(cfg, "runs", "mode=compare tabulates run folders"), out_dir)
        return
    judge = instantiate(cfg.judge)
    if cfg.mode == "rescore":
        rescore.run(require(cfg, "results", "mode=rescore re-judges a results file"), judge, out_dir)
        return
    if cfg.ckpt:
        read_info(cfg.ckpt)  # fails early on a folder that is no export
    enhancement = model_enhancement(cfg)  # the unedited model's (lalms/enhancement.py), checked early
    fabric = Fabric(**cfg.fabric)
    fabric.launch()
    data = instantiate(cfg.data)
    with fabric.rank_zero_first():
        data.prepare_data()  # builds SAKE-mini on first use
    lalm = instantiate(cfg.model, device=str(fabric.device))
    enhancement = enhance(enhancement, lalm)  # a setting of the model: in both fingerprints
    fingerprint = lalm.fingerprint()
    answers = lalm.answers_fingerprint(fingerprint)
    model = {"name": lalm.name, "fingerprint": fingerprint, "answers": answers}
    if enhancement is not None:  # named only when set: the plain model's identity stays as it was
        model["enhancement"] = enhancement.as_dict()
    if isinstance(data, SpokenFactsData):  # scored by log-probabilities: no answers to cache
        return spoken_facts(cfg, fabric, lalm, data, model, out_dir)
    cache = ResponseCache(cfg.response_cache, answers)
    resolver = AudioResolver(data.audio_root)
    judged = {"model": model, "data": data, "judge": judge.identity(), "split": cfg.split}
    if cfg.get("editor") and cfg.editor.get("base_only"):
        generation = Generation(cfg.max_new_tokens, cfg.batch_size, edits_per_batch=1)
        identity = run_identity(
            editor={"name": "none"}, instances=data.eval_instances(cfg.split), sequences=[],
            sweeps={"sweeps": []}, generation=asdict(generation), **judged,
        )  # fmt: skip
        return unedited.run(fabric, lalm, data, out_dir, judge, cache, generation, cfg.split, identity)
    editor, editor_identity, settings = build_editor(cfg, lalm, data.train_pool(lalm.sampling_rate))
    instances = data.eval_instances(cfg.split)
    sweeps = list(cfg.sweeps)
    if cfg.split != "test" and "sequential" in sweeps:
        log.info("split=%s has no sequences: running the single sweep only", cfg.split)
        sweeps.remove("sequential")
    sequences = data.eval_sequences() if "sequential" in sweeps else []
    batching = batch_plan(cfg, editor, lalm, PromptMaker(resolver, lalm.sampling_rate), instances)
    log.info("edits per batch: %d (%s)", batching.edits_per_batch, batching.reason)
    generation = Generation(cfg.max_new_tokens, cfg.batch_size, batching.edits_per_batch)
    sweeper = Sweeper(lalm, editor, judge, resolver, cache, generation, fabric.global_rank, fabric.world_size)
    sweep_plan = SweepPlan(sweeps, instances, sequences, **cfg.sequential)
    identity = run_identity(
        editor=editor_identity, instances=instances, sequences=sequences,
        sweeps={"sweeps": sweeps, **cfg.sequential}, generation=asdict(generation), **judged,
    )  # fmt: skip
    report_data = {"settings": {**settings, "batching": batching.as_dict()}, "data_report": data.report()}
    metrics = run_sweeps(fabric, sweeper, out_dir, sweep_plan, identity, **report_data)
    if fabric.global_rank == 0:
        log.info("\n%s\nfull report: %s", report.summary(metrics), out_dir / "report.md")
    return metrics


if __name__ == "__main__":
    quiet_library_notices()
    register_resolvers()
    main()
