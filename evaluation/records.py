"""What a sweep writes: one JSON line per edit instance (single) or per step (sequential).

A line is appended, flushed and fsynced as soon as its instance or step is done, so a killed
sweep loses at most the line it was writing. Reading drops a torn last line (and `ResultsLog`
cuts it off the file before appending), so resuming never corrupts what is already there.

Single-editing line::

    {"id", "attribute", "original", "target", "seconds", "queries": [QueryResult, ...]}

Sequential-editing line (after applying edit `step` of sequence `sequence`)::

    {"sequence", "step", "id", "seconds", "evals": [{"id", "attribute", "edit_step", "gap",
                                                     "queries": [QueryResult, ...]}, ...]}
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.files import fsync_dir
from datamodules.schema import CORRECTNESS_KINDS, EditInstance, Query
from evaluation.degeneration import is_degenerate
from evaluation.judges import ConsistencyCase, CorrectnessCase, Judge

log = logging.getLogger(__name__)

METRICS = ("reliability", "generality", "audio_locality", "text_locality", "portability")


def instance_id(inst: EditInstance) -> str:
    """Stable across runs: the record's file and position."""
    return f"{Path(inst.source).stem}:{inst.index}"


@dataclass
class QueryResult:
    """One query of an edit instance with both responses and the judgment."""

    kind: str  # reliability, generality, audio_locality, text_locality, portability
    type: int | None
    question: str
    options: list[str]
    truth: str  # the expected post-edit answer (locality: the data's own answer, for reference)
    pre: str  # the unedited model's response
    post: str  # the edited model's response
    verdict: bool | None = None  # correct (reliability, generality, portability) or consistent
    reason: str = ""
    committed: str | None = None
    degenerate: bool = False
    file: str | None = None
    track: str | None = None
    category: str | None = None

    @property
    def name(self) -> str:
        return self.kind + (f"_type{self.type}" if self.type else "")

    @classmethod
    def of(cls, q: Query, pre: str, post: str) -> QueryResult:
        return cls(
            q.kind, q.type, q.question, list(q.options), q.answer, pre, post,
            file=q.file, track=q.track, category=q.category,
        )  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | QueryResult) -> QueryResult:
        if isinstance(d, QueryResult):
            return d
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__ if k in d})


def judge_results(results: Sequence[QueryResult], judge: Judge) -> None:
    """Fill in verdicts: correctness against the ground truth for reliability, generality and
    portability; consistency with the pre-edit answer for locality. Flags degenerate outputs."""
    right = [r for r in results if r.kind in CORRECTNESS_KINDS]
    same = [r for r in results if r.kind not in CORRECTNESS_KINDS]
    verdicts = judge.correctness(
        [CorrectnessCase(r.question, tuple(r.options), r.truth, r.post) for r in right]
    )
    verdicts += judge.consistency(
        [ConsistencyCase(r.question, tuple(r.options), r.pre, r.post) for r in same]
    )
    for r, j in zip(right + same, verdicts, strict=True):
        r.verdict, r.reason, r.committed, r.degenerate = (
            j.verdict,
            j.reason,
            j.committed,
            is_degenerate(r.post),
        )


def to_json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, default=lambda o: asdict(o))


def read_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete JSON lines of `path` and the byte length they occupy (a torn tail is dropped)."""
    if not path.is_file():
        return [], 0
    records, good = [], 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("no line end")
                records.append(json.loads(raw))
            except ValueError as err:
                rest = f.read()
                if rest.strip():  # damage in the middle: not a torn write, refuse to guess
                    raise ValueError(f"{path}: line {n} is not valid JSON ({err}); fix or remove it") from err
                log.warning("%s: dropping a torn last line %d (%d bytes)", path, n, len(raw))
                break
            good += len(raw)
    return records, good


class ResultsLog:
    """An append-only JSON-lines file that survives being killed mid-write.

    Iterating gives `done` (records finished elsewhere, e.g. by other ranks) and then the file's."""

    def __init__(self, path: str | Path, done: list[dict[str, Any]] | None = None) -> None:
        self.path = Path(path)
        self.done = list(done or [])
        self.records, good = read_lines(self.path)
        if self.path.is_file() and self.path.stat().st_size != good:
            with self.path.open("r+b") as f:
                f.truncate(good)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.done + self.records)

    def append(self, record: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        line = to_json(record) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if new:  # the file's folder entry too
            fsync_dir(self.path.parent)
        self.records.append(json.loads(line))
