"""Re-judge saved responses without a model: `python evaluate.py mode=rescore results=FILE judge=...`.

Reads this project's results.jsonl (single or sequential lines) or the output of the SAKE
authors' EasyEdit fork: a JSON list of records with the keys

    reliability, generality_type_0..2, locality_audio_type_0..3, locality_text, portability_audio

each {audio_path, question, answer, transcription}, plus `pre_edit` and `post_edit` mapping
those keys to response strings. Types there count from 0; for gender (three audio-locality
entries) `locality_audio_type_0..2` are the paper's types 1, 3 and 4.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.files import write_atomic
from datamodules.options import parse_options
from datamodules.schema import ATTRIBUTES, SAKE_LABELS, SchemaError, norm_label
from evaluation import metrics as M
from evaluation import report
from evaluation.judges import Judge
from evaluation.lock import RunLock
from evaluation.records import QueryResult, judge_results, read_lines, to_json
from evaluation.run import check_run

log = logging.getLogger(__name__)

EASYEDIT_KEYS = {  # key -> (kind, type); gender's audio-locality types are remapped below
    "reliability": ("reliability", None),
    **{f"generality_type_{i}": ("generality", i + 1) for i in range(3)},
    **{f"locality_audio_type_{i}": ("audio_locality", i + 1) for i in range(4)},
    "locality_text": ("text_locality", None),
    "portability_audio": ("portability", None),
}
GENDER_AUDIO_TYPES = (1, 3, 4)


def _attribute(record: Mapping[str, Any], source: str, index: int) -> str:
    """From the reliability clip's folder (Animal/, Gender/, ...) or else its answer's label set."""
    rel = record["reliability"]
    parts = {p.casefold() for p in Path(str(rel.get("audio_path", ""))).parts}
    for attr in ATTRIBUTES:
        if attr in parts:
            return attr
    for attr, labels in SAKE_LABELS.items():
        if norm_label(str(rel.get("answer", ""))) in labels:
            return attr
    raise SchemaError(
        source, index, "reliability.audio_path", "names no attribute folder and its answer no label"
    )


def from_easyedit(path: Path) -> list[dict[str, Any]]:
    """Single-editing records (this project's layout, unjudged) from an EasyEdit output file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SchemaError(str(path), None, "<file>", f"not valid JSON ({err})") from err
    if not isinstance(raw, list):
        raise SchemaError(str(path), None, "<file>", "expected a JSON list of records")
    out = []
    for i, rec in enumerate(raw):
        for key in ("reliability", "pre_edit", "post_edit"):
            if not isinstance(rec, Mapping) or not isinstance(rec.get(key), Mapping):
                raise SchemaError(str(path), i, key, "missing or not an object")
        attribute = _attribute(rec, str(path), i)
        audio_keys = sorted(k for k in rec if k.startswith("locality_audio_type_"))
        queries = []
        for key, (kind, type_) in EASYEDIT_KEYS.items():
            if key not in rec:
                continue
            if kind == "audio_locality" and attribute == "gender":
                type_ = GENDER_AUDIO_TYPES[audio_keys.index(key)]
            q = rec[key]
            for field in ("question", "answer"):
                if not isinstance(q.get(field), str):
                    raise SchemaError(str(path), i, f"{key}.{field}", "missing or not a string")
            for side in ("pre_edit", "post_edit"):
                if not isinstance(rec[side].get(key), str):
                    raise SchemaError(str(path), i, f"{side}.{key}", "missing response (expected a string)")
            queries.append(
                QueryResult(
                    kind,
                    type_,
                    q["question"],
                    list(parse_options(q["question"])),
                    q["answer"],
                    rec["pre_edit"][key],
                    rec["post_edit"][key],
                    file=q.get("audio_path"),
                )  # fmt: skip
            )
        rel = rec["reliability"]
        out.append(
            {
                "id": f"{path.stem}:{i}",
                "attribute": attribute,
                "original": rel.get("original_answer", ""),
                "target": rel["answer"],
                "seconds": 0.0,
                "queries": queries,
            }
        )
    return out


def inputs(path: Path) -> list[Path]:
    """The files a `results=` path names: itself, or the EasyEdit files (*.json) of a folder."""
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"results={path}: a folder without EasyEdit output files (*.json)")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"results={path}: no such file or folder")
    return [path]


def load(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """("single" | "sequential", records with QueryResult objects) from either format; a folder
    holds EasyEdit files (e.g. the SAKE authors' Animal.json, Emotion.json, ...), read in turn."""
    if path.is_dir():
        return "single", [r for f in inputs(path) for r in from_easyedit(f)]
    if path.suffix == ".json":
        return "single", from_easyedit(path)
    records = read_lines(path)[0]
    if not records:
        raise SchemaError(str(path), None, "<file>", "no results in it")
    mode = "sequential" if "evals" in records[0] else "single"
    for r in records:
        for part in r["evals"] if mode == "sequential" else [r]:
            part["queries"] = [QueryResult.from_dict(d) for d in part["queries"]]
    return mode, records


def run(results: str, judge: Judge, out_dir: Path) -> dict[str, Any]:
    """Re-judge every query of `results`; writes <mode>/results.jsonl, metrics.json, report.md.

    The folder's identity is the input's content and the judge's settings: another one is
    refused before any verdict is asked for. Re-running into the same folder keeps its verdicts
    and asks again only for the invalid ones (a judge that failed on them)."""
    path = Path(results)
    inputs(path)  # a clear error for a missing input, before the folder is locked
    with RunLock(out_dir):
        return _rescore(path, judge, out_dir)


def _rescore(path: Path, judge: Judge, out_dir: Path) -> dict[str, Any]:
    mode, records = load(path)
    content = hashlib.sha256(b"".join(hashlib.sha256(f.read_bytes()).digest() for f in inputs(path)))
    identity = {"input": {"file": path.name, "content": content.hexdigest()[:16]}, "judge": judge.identity()}
    check_run(out_dir, identity)
    parts = [p for r in records for p in (r["evals"] if mode == "sequential" else [r])]
    queries = [q for p in parts for q in p["queries"]]
    done = [QueryResult.from_dict(q) for r in read_lines(out_dir / mode / "results.jsonl")[0]
            for p in (r["evals"] if mode == "sequential" else [r]) for q in p["queries"]]  # fmt: skip
    if len(done) == len(queries):  # a finished earlier run of this identity: keep its valid verdicts
        for q, d in zip(queries, done, strict=True):
            q.verdict, q.reason, q.committed, q.degenerate = d.verdict, d.reason, d.committed, d.degenerate
    todo = [q for q in queries if q.verdict is None]
    if len(todo) < len(queries):
        kept = len(queries) - len(todo)
        log.info("rescore: %d verdicts kept from the earlier run, %d asked again", kept, len(todo))
    judge_results(todo, judge)
    write_atomic(out_dir / mode / "results.jsonl", "".join(to_json(r) + "\n" for r in records))
    categories = {q.category for q in queries if q.category and q.kind == "portability"}
    attributes = {p["attribute"] for p in parts}
    tally = M.Tally(M.all_keys(attributes, categories))
    update = M.update_single if mode == "single" else M.update_sequential
    for r in read_lines(out_dir / mode / "results.jsonl")[0]:
        update(tally, r)
    metrics = M.summarise(tally.compute())
    metrics["run"] = {"editor": f"rescored {path}", "model": "-", "data": path.name, "judge": judge.name}
    metrics["identity"] = identity
    write_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=1))
    text = report.write(out_dir, metrics)
    log.info("\n%s", text)
    return metrics
