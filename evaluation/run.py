"""One evaluation run: the sweeps an `evaluate.py` config asks for, then metrics and reports.

The run directory holds `run.json` (what was evaluated: evaluation/identity.py),
`single/results.jsonl`, `sequential/results.jsonl`, `metrics.json`, `report.md`, `plots/*.png`
and TensorBoard events under `tb/`. Re-running the same command continues in the same
directory; a directory that holds a run of another identity is refused, naming what differs.
The metrics count exactly the instances the command selects, each once.

With several processes (Lightning Fabric, e.g. `fabric.devices=4 fabric.strategy=ddp`) each
rank sweeps its share into `results.rank<r>.jsonl`; rank 0 merges them into `results.jsonl`,
and the metrics are reduced across ranks by torchmetrics.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.fabric import Fabric

from common.files import write_atomic
from datamodules.schema import EditInstance
from evaluation import metrics as M
from evaluation import report
from evaluation.identity import differences
from evaluation.lock import RunLock, RunLocked
from evaluation.records import (
    QueryResult,
    ResultsLog,
    instance_id,
    judge_results,
    read_lines,
    to_json,
)

log = logging.getLogger(__name__)

SWEEPS = ("single", "sequential")


class RunMismatch(ValueError):
    """The run directory already holds results of a different evaluation."""


def check_run(out_dir: Path, identity: Mapping[str, Any]) -> None:
    """Record what this run evaluates; refuse to mix results with an earlier, different run."""
    path = out_dir / "run.json"
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8")).get("identity")
        diff = differences(before or {}, identity)
        if diff:
            raise RunMismatch(
                f"{out_dir} holds results of another evaluation; what differs:\n  "
                + "\n  ".join(diff)
                + "\nPick another run_name=..., or delete that folder to start over."
            )
    write_atomic(path, json.dumps({"identity": dict(identity)}, indent=1, default=str))


REFUSALS: dict[str, type[Exception]] = {"RunLocked": RunLocked, "RunMismatch": RunMismatch}


@contextmanager
def claimed(fabric: Fabric, out_dir: Path, identity: Mapping[str, Any]) -> Iterator[None]:
    """Hold the run folder for the block: rank 0 takes its lock and checks (or records) the
    run's identity; every rank then learns whether that worked. A refusal (the folder is in
    use, or holds another run) is raised on every rank with rank 0's message, so no rank is
    left waiting at a barrier for one that gave up; any other failure of rank 0 is re-raised
    there and reported on the others."""
    with ExitStack() as held:
        failure: tuple[str, str] | None = None
        error: BaseException | None = None
        if fabric.global_rank == 0:
            try:
                held.enter_context(RunLock(out_dir))
                check_run(out_dir, identity)
            except Exception as e:  # told to the other ranks first, then raised
                failure, error = (type(e).__name__, str(e)), e
        if fabric.world_size > 1:
            failure = fabric.broadcast(failure, src=0)
        if error is not None:
            raise error
        if failure is not None:
            kind, message = failure
            raise REFUSALS.get(kind, RuntimeError)(
                message if kind in REFUSALS else f"rank 0: {kind}: {message}"
            )
        yield


def describe(identity: Mapping[str, Any]) -> dict[str, Any]:
    """The one-line names of a run's parts for reports: editor, model, data, judge."""
    editor, model, data, judge = (
        v if isinstance(v := identity.get(k), Mapping) else {"name": v or "?"}
        for k in ("editor", "model", "data", "judge")
    )
    selection = data.get("selection") or {}
    return {
        "editor": editor.get("label") or editor.get("name", "?"),
        "model": f"{model.get('name', '?')} ({model.get('fingerprint', '?')})",
        "data": f"{data.get('name', '?')} {data.get('split', 'test')} ({selection.get('single', '?')} edits)",
        "judge": judge.get("name", "?"),
    }


def merge_key(mode: str) -> Callable[[Mapping[str, Any]], Any]:
    return (lambda r: r["id"]) if mode == "single" else (lambda r: (r["sequence"], r["step"]))


def selected(records: Sequence[Mapping[str, Any]], mode: str, order: Sequence[Any]) -> list[dict[str, Any]]:
    """The records of the instances (steps) in `order`, each once (the first), in that order."""
    key, rank = merge_key(mode), {k: i for i, k in enumerate(order)}
    found: dict[Any, dict[str, Any]] = {}
    for r in records:
        if key(r) in rank:
            found.setdefault(key(r), dict(r))
    return sorted(found.values(), key=lambda r: rank[key(r)])


def merge(folder: Path, mode: str, order: Sequence[Any]) -> list[dict[str, Any]]:
    """All finished records of a sweep (rank shards and earlier merges), deduplicated and in
    data order; written to results.jsonl atomically and the shards removed."""
    key = merge_key(mode)
    found: dict[Any, dict[str, Any]] = {}
    shards = sorted(folder.glob("results.rank*.jsonl"))
    for path in [folder / "results.jsonl", *shards]:
        for r in read_lines(path)[0]:
            found.setdefault(key(r), r)
    rank = {k: i for i, k in enumerate(order)}
    records = sorted(found.values(), key=lambda r: rank.get(key(r), len(rank)))
    if shards:
        write_atomic(folder / "results.jsonl", "".join(to_json(r) + "\n" for r in records))
        for path in shards:
            path.unlink()
    return records


def rejudge_invalid(path: Path, mode: str, judge: Any) -> int:
    """Ask the judge again for every query of `path` without a verdict (the judge failed on it
    before), rewriting the file atomically; returns how many were asked."""
    records = read_lines(path)[0]
    parts = [p for r in records for p in (r["evals"] if mode == "sequential" else [r])]
    queries = [(p, i, QueryResult.from_dict(q)) for p in parts for i, q in enumerate(p["queries"])]
    invalid = [(p, i, q) for p, i, q in queries if q.verdict is None]
    if not invalid:
        return 0
    log.info("%s: asking the judge again for %d queries without a verdict", path, len(invalid))
    judge_results([q for _, _, q in invalid], judge)
    for p, i, q in invalid:
        p["queries"][i] = q
    write_atomic(path, "".join(to_json(r) + "\n" for r in records))
    return len(invalid)


def tally(fabric: Fabric, records: Mapping[str, list[dict[str, Any]]], keys: list[str]) -> dict[str, Any]:
    """The metrics of all records; each rank counts a share, torchmetrics sums across ranks."""
    metric = M.Tally(keys).to(fabric.device)
    for mode, update in (("single", M.update_single), ("sequential", M.update_sequential)):
        for r in records.get(mode, [])[fabric.global_rank :: fabric.world_size]:
            update(metric, r)
    return M.summarise(metric.compute())


def sweep_order(
    mode: str, instances: Sequence[EditInstance], sequences: Sequence[Sequence[EditInstance]]
) -> list[Any]:
    if mode == "single":
        return [instance_id(i) for i in instances]
    return [(s, t) for s, seq in enumerate(sequences) for t in range(len(seq))]


@dataclass(frozen=True)
class SweepPlan:
    """What a run sweeps (evaluate.py's `sweeps` and `sequential` settings, over the data)."""

    sweeps: Sequence[str]
    """Which sweeps, of "single" and "sequential"."""
    instances: Sequence[EditInstance]
    """The single sweep's edits, in data order."""
    sequences: Sequence[Sequence[EditInstance]]
    """The sequential sweep's sequences of edits."""
    first: int
    """Sequential: the first `first` edits of a sequence are re-evaluated after later edits ..."""
    max_gap: int
    """... up to `max_gap` edits later."""

    def __post_init__(self) -> None:
        unknown = [s for s in self.sweeps if s not in SWEEPS]
        if unknown:
            raise ValueError(f"sweeps: unknown {unknown}; choose from {list(SWEEPS)}")


def run_sweeps(
    fabric: Fabric,
    sweeper: Any,
    out_dir: Path,
    plan: SweepPlan,
    identity: Mapping[str, Any],
    settings: Mapping[str, Any] | None = None,
    data_report: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the sweeps; returns metrics.json's content (all ranks get it). `settings`
    (the editor's config, and for a trained editor what training chose) and `data_report` (e.g.
    what was left out for missing audio) are reported with it."""
    with claimed(fabric, out_dir, identity):
        metrics = _run_sweeps(fabric, sweeper, out_dir, plan)
        metrics["run"] = {**describe(identity), **metrics["run"]}
        metrics["identity"] = dict(identity)
        if settings:
            metrics["editor"] = dict(settings)
        if data_report:
            metrics["data"] = dict(data_report)
        if fabric.global_rank == 0:
            write_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=1))
            report.write(out_dir, metrics)
        return metrics


def _run_sweeps(fabric: Fabric, sweeper: Any, out_dir: Path, plan: SweepPlan) -> dict[str, Any]:
    instances, sequences = plan.instances, plan.sequences
    started = time.perf_counter()
    shard = "results.jsonl" if fabric.world_size == 1 else f"results.rank{fabric.global_rank}.jsonl"
    records: dict[str, list[dict[str, Any]]] = {}
    for mode in plan.sweeps:
        folder = out_dir / mode
        order = sweep_order(mode, instances, sequences)
        if fabric.global_rank == 0:
            if fabric.world_size > 1:
                merge(folder, mode, order)  # shards an interrupted run left behind
            rejudge_invalid(folder / "results.jsonl", mode, sweeper.judge)  # the judge failed on them before
        fabric.barrier()
        merged = read_lines(folder / "results.jsonl")[0] if fabric.world_size > 1 else []
        results = ResultsLog(folder / shard, done=merged)
        if mode == "single":
            sweeper.single(instances, results)
        else:
            sweeper.sequential(sequences, results, plan.first, plan.max_gap)
        fabric.barrier()
        if fabric.global_rank == 0:
            merge(folder, mode, order)
        fabric.barrier()
        records[mode] = selected(read_lines(folder / "results.jsonl")[0], mode, order)
    categories = {q.category for i in instances for q in i.portability if q.category}
    keys = M.all_keys((i.attribute for i in instances), categories)
    metrics = tally(fabric, records, keys)
    wall = round(time.perf_counter() - started, 1)
    metrics["run"] = {"wall_seconds_this_session": wall}
    return metrics
