"""The spoken-facts editing sweep (`python evaluate.py data=spoken_facts editor=<strategy>`): the
localisation-and-editing study's protocol (arXiv 2603.14343) on any LALM and editor.

For each editable fact of the split, in data order: the editor edits the fact (its spoken prompt
should now be completed with the counterfactual target; keys read at `data.anchor`, a subject
word), and the edited model scores target against true object on the edit prompt, its
paraphrases and its neighbours' prompts (evaluation/fact_eval.py). Single-layer strategies reset
the model after each edit (`accumulate: false`); the multi-layer ones keep every edit in place,
as the study does, so fact i is scored with edits 1..i applied (`accumulate: true`). The
unedited model's readings of the same prompts are the Baseline row.

The run folder holds `run.json` (identity, lock as for SAKE sweeps), `baseline.jsonl` and
`facts.jsonl` (one line per fact, appended and flushed: a killed run resumes; an accumulating
run re-applies the edits already scored before going on), `metrics.json` (ES, PS, NS, Score in
percent: evaluation/fact_metrics.py; per relation; the baseline), `report.md` and `table1.csv`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.fabric import Fabric

from common.files import write_atomic
from common.progress import progress_bar
from datamodules.spoken_facts import SpokenFact, SpokenFactsData
from evaluation.fact_eval import fact_readings, jobs
from evaluation.fact_metrics import METRICS, Reading, fact_metrics
from evaluation.identity import digest
from evaluation.records import ResultsLog
from evaluation.run import claimed, describe
from lalms.base import LALM

log = logging.getLogger(__name__)
COLUMNS = ("Score", "ES", "PS", "NS")


def identity(
    *,
    editor: Mapping[str, Any],
    model: Mapping[str, Any],
    data: SpokenFactsData,
    split: str,
    facts: Sequence[SpokenFact],
    accumulate: bool,
    batch_size: int,
) -> dict[str, Any]:
    """What a spoken-facts run measures: two runs of equal identity give equal figures."""
    return {
        "editor": dict(editor),
        "model": dict(model),
        "data": {
            "name": data.name,
            "split": split,
            "content": data.content_digest(list(facts)),
            "selection": {"facts": len(facts), "ids": digest([f.id for f in facts])},
            "anchor": data.anchor,
            "instruction": data.instruction,
        },
        "sweeps": {"facts": {"accumulate": accumulate}},
        "judge": {"name": "mean log-probability, target against true object"},
        "generation": {"batch_size": batch_size},
    }


def _as_readings(rows: Sequence[Mapping[str, Any]]) -> list[Reading]:
    return [Reading(r["edit"], r["kind"], r["target"], r["true"], r.get("known")) for r in rows]


def _record(fact: SpokenFact, readings: Sequence[Reading], **extra: Any) -> dict[str, Any]:
    return {
        "id": fact.id,
        "relation": fact.relation,
        "subject": fact.subject,
        "object": fact.object,
        "target": fact.target,
        "readings": [dataclasses.asdict(r) for r in readings],
        **extra,
    }


def per_relation(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    relations = sorted({r["relation"] for r in records})
    return {
        rel: fact_metrics(_as_readings([x for r in records if r["relation"] == rel for x in r["readings"]]))
        for rel in relations
    }


def known_by_guessing(records: Sequence[Mapping[str, Any]]) -> float | None:
    """The share of edit prompts (percent) a model would complete right that ignores the subject
    and answers each relation's commonest true object: the bar `known` has to clear to mean that
    the model knows facts rather than relations."""
    trues: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        for x in r["readings"]:
            if x["kind"] == "prompt" and x.get("known") is not None:
                trues[r["relation"]][r["object"]] += 1
    total = sum(sum(c.values()) for c in trues.values())
    return 100 * sum(max(c.values()) for c in trues.values()) / total if total else None


def baseline_metrics(base: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The unedited model's figures, overall and per relation, each with known_by_guessing."""
    overall = {**fact_metrics(_as_readings([x for r in base for x in r["readings"]])),
               "known_by_guessing": known_by_guessing(base)}  # fmt: skip
    by_rel = per_relation(base)
    for rel, figures in by_rel.items():
        figures["known_by_guessing"] = known_by_guessing([r for r in base if r["relation"] == rel])
    return {"baseline": overall, "baseline_per_relation": by_rel}


class FactSweep:
    """Edits and scores the facts of one run; `editor` None scores the unedited model only."""

    def __init__(
        self,
        lalm: LALM,
        editor: Any | None,
        data: SpokenFactsData,
        *,
        accumulate: bool,
        batch_size: int,
    ) -> None:
        self.lalm, self.editor, self.data = lalm, editor, data
        self.accumulate, self.batch_size = accumulate, batch_size

    def readings(self, fact: SpokenFact) -> list[Reading]:
        return fact_readings(self.lalm, self.data, [fact], self.batch_size)

    def baseline(self, facts: Sequence[SpokenFact], log_: ResultsLog) -> list[dict[str, Any]]:
        """The unedited model's readings of every fact (resumed from `log_`)."""
        done = {r["id"] for r in log_}
        todo = [f for f in facts if f.id not in done]
        if todo:
            scored = fact_readings(self.lalm, self.data, todo, self.batch_size)
            for fact in todo:
                log_.append(_record(fact, [r for r in scored if r.edit == fact.id]))
        return _in_order(log_, facts)

    def edits(self, facts: Sequence[SpokenFact], log_: ResultsLog) -> list[dict[str, Any]]:
        """Each fact edited and scored; accumulating runs keep the edits until the end."""
        done = {r["id"] for r in log_}
        kept = []
        rate = self.lalm.sampling_rate
        try:
            with progress_bar("editing spoken facts", len(facts), unit="edits") as advance:
                for fact in facts:
                    if fact.id in done and not self.accumulate:
                        advance(1)
                        continue
                    started = time.perf_counter()
                    handle = self.editor.apply(self.data.request(fact, rate))
                    edit_seconds = time.perf_counter() - started
                    try:
                        if fact.id not in done:  # an accumulating resume re-applies, not re-scores
                            readings = self.readings(fact)
                            log_.append(_record(fact, readings, edit_seconds=round(edit_seconds, 3)))
                    finally:
                        if self.accumulate:
                            kept.append(handle)
                        else:
                            handle.undo()
                    advance(1)
        finally:
            for handle in reversed(kept):  # the model as it was, whatever happened
                handle.undo()
        return _in_order(log_, facts)


def _in_order(log_: ResultsLog, facts: Sequence[SpokenFact]) -> list[dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for r in log_:
        found.setdefault(r["id"], r)
    return [found[f.id] for f in facts if f.id in found]


def run(
    fabric: Fabric,
    sweep: FactSweep,
    facts: Sequence[SpokenFact],
    out_dir: Path,
    run_identity: Mapping[str, Any],
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the sweep in `out_dir`; returns metrics.json's content."""
    if fabric.world_size > 1:
        raise ValueError("the spoken-facts sweep runs in one process (fabric.devices=1)")
    jobs(facts)  # every fact must be editable: refused before any work
    started = time.perf_counter()
    with claimed(fabric, out_dir, run_identity):
        base = sweep.baseline(facts, ResultsLog(out_dir / "baseline.jsonl"))
        metrics: dict[str, Any] = {
            "study": "spoken_facts",
            **baseline_metrics(base),
        }
        if sweep.editor is not None:
            edited = sweep.edits(facts, ResultsLog(out_dir / "facts.jsonl"))
            seconds = [r["edit_seconds"] for r in edited if "edit_seconds" in r]
            metrics["edited"] = fact_metrics(_as_readings([x for r in edited for x in r["readings"]]))
            metrics["per_relation"] = per_relation(edited)
            metrics["seconds_per_edit"] = round(sum(seconds) / len(seconds), 3) if seconds else None
        metrics["accumulate"] = sweep.accumulate
        wall = round(time.perf_counter() - started, 1)
        data = run_identity["data"]
        metrics["run"] = {
            **describe(run_identity),
            "data": f"{data['name']} {data['split']} ({data['selection']['facts']} facts)",
            "wall_seconds_this_session": wall,
        }
        metrics["identity"] = dict(run_identity)
        if settings:
            metrics["editor"] = dict(settings)
        write_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=1))
        write_atomic(out_dir / "table1.csv", table_csv([(row_name(metrics), metrics)]))
        write_atomic(out_dir / "report.md", report(metrics))
    return metrics


def row_name(metrics: Mapping[str, Any]) -> str:
    return metrics["run"]["editor"]


def rows_of(named: Sequence[tuple[str, Mapping[str, Any]]]) -> list[tuple[str, Mapping[str, Any]]]:
    """(name, figures) rows: the Baseline of the first run, then each run's edited figures."""
    if not named:
        return []
    out = [("Baseline (unedited)", named[0][1]["baseline"])]
    out += [(name, m["edited"]) for name, m in named if m.get("edited")]
    return out


def fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def table_csv(named: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["strategy", *COLUMNS, "edits"])
    for name, figures in rows_of(named):
        writer.writerow([name, *(fmt(figures[c]) for c in COLUMNS), figures["ES_edits"]])
    return buf.getvalue()


def table_md(named: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    lines = ["| strategy | Score | ES | PS | NS |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {name} | " + " | ".join(fmt(f[c]) for c in COLUMNS) + " |" for name, f in rows_of(named)]
    base = named[0][1]["baseline"] if named else {}
    if base.get("known") is not None:
        known, guess = f"{base['known']:.1f}%", base.get("known_by_guessing")
        bar = f" (answering each relation's commonest object would complete {guess:.1f}%)" if guess else ""
        lines += ["", f"The unedited model completes {known} of the edit prompts with the true object{bar}."]
    return "\n".join(lines)


def report(metrics: Mapping[str, Any]) -> str:
    run = metrics["run"]
    edited = metrics.get("edited")
    lines = [
        f"# Spoken facts: {run['editor']} on {run['model']}",
        "",
        f"Data: {run['data']}; keys at the {metrics['identity']['data']['anchor']} word; edits "
        + (
            "accumulate (each fact scored with the edits before it in place)"
            if metrics["accumulate"]
            else "reset after each fact"
        ),  # fmt: skip
        "",
        "ES: the target beats the true object on the edit prompt; PS: on its paraphrases; NS: the "
        "neighbours' true objects still beat the target; Score: their harmonic mean (percent).",
        "",
        table_md([(row_name(metrics), metrics)]),
    ]
    if edited:
        lines += ["", "Per relation (edited):", "", "| relation | Score | ES | PS | NS |"]
        lines += ["| --- | ---: | ---: | ---: | ---: |"]
        lines += [
            f"| {rel} | " + " | ".join(fmt(f[c]) for c in COLUMNS) + " |"
            for rel, f in metrics["per_relation"].items()
        ]
        lines += ["", f"Seconds per edit: {metrics['seconds_per_edit']}"]
    return "\n".join(lines) + "\n"


def figures(metrics: Mapping[str, Any]) -> str:
    """One line: the run's figures, for the log."""
    f = metrics.get("edited") or metrics["baseline"]
    return ", ".join(f"{m} {fmt(f[m])}" for m in ("Score", *METRICS.values()))
