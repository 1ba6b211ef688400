"""Single and sequential editing sweeps.

Single editing, per test instance: apply the edit (in the weights, through hooks, or as prompt
context that every query is then asked in), answer all of the instance's queries in one
batched generation, undo the edit exactly, judge, append the instance's line, next.
Sequential editing, per sequence: apply the edits cumulatively; after applying edit t, answer
the queries of every edit i <= t among the first `first` of the sequence with gap t - i <=
`max_gap`, judge them (locality against the *unedited* model's answers), append the step's
line; undo everything in reverse at the end of the sequence.

With `edits_per_batch` K > 1 (an editor with `apply_rows`, editors/base.py), K single edits are
evaluated together: their queries go through one batched generation in which each row sees the
model as edited by its own edit only (lalms/rows.py); in the sequential sweep K sequences run
side by side, each a row group with its own accumulated edits.

Both resume from their results file: finished instances are skipped; a sequence that stopped
part-way re-applies its finished steps' edits (without re-evaluating them) and continues. The
batches are fixed by the data and the rank, and a batch a kill cut short is evaluated whole
again (only its missing lines are written): a resumed run answers from the same rows as an
uninterrupted one.
Instances (and sequences) are dealt to ranks round-robin when several processes share a sweep.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from common import EditRequest
from common.progress import progress_bar
from common.prompt import Prompt
from datamodules.audio_io import AudioResolver
from datamodules.examples import PromptMaker
from datamodules.schema import EditInstance, Query
from editors.base import BatchEdit, EditHandle, Editor, in_context
from evaluation.judges import Judge
from evaluation.records import QueryResult, ResultsLog, instance_id, judge_results
from evaluation.responses import QueryKeys, ResponseCache, pre_edit_responses
from lalms.base import LALM

log = logging.getLogger(__name__)


def request(inst: EditInstance, prompt: Prompt) -> EditRequest:
    """What an editor sees of a test instance: the edit prompt, target and original label only."""
    return EditRequest(prompt=prompt, target=inst.target, original=inst.original, attribute=inst.attribute)


@dataclass(frozen=True)
class Generation:
    """How a sweep generates answers (evaluate.py's settings; all of it is in the run's identity)."""

    max_new_tokens: int
    """Tokens an answer may have at most (greedy decoding)."""
    batch_size: int
    """Queries (rows) in one batched generation."""
    edits_per_batch: int
    """K edits evaluated in one batched generation, each row seeing only its own edit
    (`Editor.apply_rows`); 1 applies one edit at a time."""

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size", "edits_per_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")


@dataclass
class Sweeper:
    """Runs an editor's sweeps on one LALM; shared by the single and sequential sweeps."""

    lalm: LALM
    editor: Editor
    judge: Judge
    resolver: AudioResolver
    responses: ResponseCache
    generation: Generation
    rank: int = 0
    world_size: int = 1
    audio_cache_size: int = 512

    def __post_init__(self) -> None:
        if self.generation.edits_per_batch > 1 and not hasattr(self.editor, "apply_rows"):
            raise ValueError(
                f"{type(self.editor).__name__} cannot evaluate several edits in one batch (no apply_rows): "
                "use edits_per_batch=1 (or auto)"
            )
        self.prompt = PromptMaker(self.resolver, self.lalm.sampling_rate, self.audio_cache_size)
        self.key = QueryKeys(self.prompt, self.lalm.render, self.generation.max_new_tokens)
        self._pre: dict[str, str] = {}

    # ------------------------------------------------------------------ model calls

    def generate(self, prompts: Sequence[Prompt]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(prompts), self.generation.batch_size):
            out += self.lalm.generate(
                prompts[start : start + self.generation.batch_size], self.generation.max_new_tokens
            )
        return out

    def prepare(self, instances: Sequence[EditInstance]) -> None:
        """Make sure the unedited model's answers to every query of `instances` are at hand."""
        queries = [q for inst in instances for q in inst.queries()]
        if all(self.key(q) in self._pre for q in queries):
            return
        self._pre.update(
            pre_edit_responses(
                queries,
                self.responses,
                lambda prompts: self.lalm.generate(prompts, self.generation.max_new_tokens),
                self.prompt,
                self.key,
                self.generation.batch_size,
            )
        )

    def pre(self, q: Query) -> str:
        return self._pre[self.key(q)]

    def request(self, inst: EditInstance) -> EditRequest:
        return request(inst, self.prompt(inst.reliability))

    def apply(self, inst: EditInstance) -> EditHandle:
        return self.editor.apply(self.request(inst))

    # ------------------------------------------------------------------ judging
    def judged(self, queries: Sequence[Query], posts: Sequence[str]) -> list[QueryResult]:
        """Results of `queries` answered with `posts`: correctness against the ground truth for
        reliability, generality and portability; consistency with the pre-edit answer for locality."""
        results = [QueryResult.of(q, self.pre(q), p) for q, p in zip(queries, posts, strict=True)]
        judge_results(results, self.judge)
        return results

    # ------------------------------------------------------------------ sweeps
    def mine(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.world_size))

    def single(self, instances: Sequence[EditInstance], results: ResultsLog) -> None:
        done = {r["id"] for r in results}
        batches = self.batches([instances[i] for i in self.mine(len(instances))])
        todo = [b for b in batches if any(instance_id(inst) not in done for inst in b)]
        if not todo:
            return
        left = sum(instance_id(inst) not in done for b in todo for inst in b)
        log.info("single editing: %d instances to do, %d already done, %d edits per batch",
                 left, len(done), self.generation.edits_per_batch)  # fmt: skip
        self.prepare([inst for b in todo for inst in b])
        with progress_bar("single editing", left) as advance:
            for batch in todo:
                queries = [list(inst.queries()) for inst in batch]
                posts, seconds = self.answers(batch, queries)
                for inst, qs, ps in zip(batch, queries, posts, strict=True):
                    if instance_id(inst) in done:  # resuming a batch a kill cut short: same rows, kept
                        continue
                    results.append(
                        {
                            "id": instance_id(inst),
                            "attribute": inst.attribute,
                            "original": inst.original,
                            "target": inst.target,
                            "seconds": round(seconds, 6),
                            "queries": self.judged(qs, ps),
                        }
                    )
                    advance(1)

    def batches(self, items: Sequence) -> list[list]:
        """`items` in consecutive batches of `edits_per_batch`: fixed by the data and the rank, so
        a resumed run evaluates every edit in the batch it had (the same rows, the same answers)."""
        k = self.generation.edits_per_batch
        return [list(items[i : i + k]) for i in range(0, len(items), k)]

    def answers(
        self, batch: Sequence[EditInstance], queries: Sequence[Sequence[Query]]
    ) -> tuple[list[list[str]], float]:
        """Each instance's answers to its `queries` with its own edit applied (one edit at a time
        with `apply`, or the batch's edits at once with `apply_rows`), and the seconds per edit."""
        start = time.perf_counter()
        if self.generation.edits_per_batch == 1:
            (inst,), (qs,) = batch, queries
            handle = self.apply(inst)
            try:
                posts = [self.generate([in_context([handle], self.prompt(q)) for q in qs])]
            finally:
                handle.undo()
            return posts, time.perf_counter() - start
        edit = self.editor.apply_rows([self.request(inst) for inst in batch])
        try:
            flat = self.generate_rows(edit, [(g, q) for g, qs in enumerate(queries) for q in qs])
        finally:
            edit.undo()
        answers = iter(flat)
        return [[next(answers) for _ in qs] for qs in queries], (time.perf_counter() - start) / len(batch)

    def generate_rows(self, edit: BatchEdit, rows: Sequence[tuple[int, Query]]) -> list[str]:
        """Answers to queries, each asked the model as edited by its group of `edit`, in batches
        of `batch_size` rows."""
        out: list[str] = []
        for start in range(0, len(rows), self.generation.batch_size):
            chunk = rows[start : start + self.generation.batch_size]
            with edit.rows([self.prompt(q) for _, q in chunk], [g for g, _ in chunk]) as asked:
                out += self.lalm.generate(asked, self.generation.max_new_tokens)
        return out

    def sequential(
        self,
        sequences: Sequence[Sequence[EditInstance]],
        results: ResultsLog,
        first: int = 5,
        max_gap: int = 5,
    ) -> None:
        done: dict[int, set[int]] = {}
        for r in results:
            done.setdefault(r["sequence"], set()).add(r["step"])
        sets = self.batches(self.mine(len(sequences)))
        todo = [ss for ss in sets if any(len(done.get(s, ())) < len(sequences[s]) for s in ss)]
        if not todo:
            return
        self.prepare([inst for ss in todo for s in ss for inst in sequences[s][:first]])
        steps = sum(len(sequences[s]) - len(done.get(s, ())) for ss in todo for s in ss)
        with progress_bar("sequential editing", steps) as advance:
            for ss in todo:
                if self.generation.edits_per_batch == 1:
                    (s,) = ss
                    self._sequence(s, sequences[s], done.get(s, set()), results, first, max_gap, advance)
                else:
                    self._side_by_side(ss, sequences, done, results, first, max_gap, advance)

    def _sequence(
        self,
        s: int,
        seq: Sequence[EditInstance],
        done: set[int],
        results: ResultsLog,
        first: int,
        max_gap: int,
        advance: Callable[[int], None],
    ) -> None:
        handles: list[EditHandle] = []
        try:
            for t, inst in enumerate(seq):
                start = time.perf_counter()
                handles.append(self.apply(inst))
                if t in done:  # resuming: this step's edit is re-applied, its evaluation kept
                    continue
                queries = evaluated_queries(seq, t, first, max_gap)
                posts = iter(
                    self.generate([in_context(handles, self.prompt(q)) for _, qs in queries for q in qs])
                )
                seconds = time.perf_counter() - start
                results.append(step_record(s, t, seq, queries, posts, seconds, self.judged))
                advance(1)
        finally:
            for handle in reversed(handles):
                handle.undo()

    def _side_by_side(
        self,
        ss: Sequence[int],
        sequences: Sequence[Sequence[EditInstance]],
        done: Mapping[int, set[int]],
        results: ResultsLog,
        first: int,
        max_gap: int,
        advance: Callable[[int], None],
    ) -> None:
        """Sequences `ss` side by side, each a group of one batched edit with its own
        accumulated edits: step t adds every sequence's edit t, then answers every sequence's
        evaluated queries in one batched generation (all of them, also of sequences whose step t
        a killed run already recorded: the same rows as uninterrupted; only the missing are kept)."""
        seqs = [sequences[s] for s in ss]
        edit: BatchEdit | None = None
        try:
            for t in range(max(len(seq) for seq in seqs)):
                start = time.perf_counter()
                requests = [self.request(seq[t]) if t < len(seq) else None for seq in seqs]
                if edit is None:
                    edit = self.editor.apply_rows(requests)
                else:
                    edit.add(requests)
                active = [j for j, seq in enumerate(seqs) if t < len(seq)]
                pending = [j for j in active if t not in done.get(ss[j], ())]
                if not pending:  # resuming: the step's edits re-applied, their evaluations kept
                    continue
                queries = {j: evaluated_queries(seqs[j], t, first, max_gap) for j in active}
                rows = [(j, q) for j in active for _, qs in queries[j] for q in qs]
                posts = iter(self.generate_rows(edit, rows))
                answers = {j: [next(posts) for _, qs in queries[j] for _ in qs] for j in active}
                seconds = (time.perf_counter() - start) / len(active)
                for j in pending:
                    results.append(
                        step_record(ss[j], t, seqs[j], queries[j], iter(answers[j]), seconds, self.judged)
                    )
                advance(len(pending))
        finally:
            if edit is not None:
                edit.undo()


def evaluated_queries(
    seq: Sequence[EditInstance], t: int, first: int, max_gap: int
) -> list[tuple[int, list[Query]]]:
    """After edit t of a sequence: (i, the queries of edit i) for every edit i among the first
    `first` with gap t - i <= `max_gap`."""
    return [(i, list(seq[i].queries())) for i in range(min(first, t + 1)) if t - i <= max_gap]


def step_record(
    s: int,
    t: int,
    seq: Sequence[EditInstance],
    queries: Sequence[tuple[int, list[Query]]],
    posts: Iterator[str],
    seconds: float,
    judged: Callable[[Sequence[Query], Sequence[str]], list[QueryResult]],
) -> dict:
    """The results line of step t of sequence s: every evaluated edit's queries, judged."""
    evals = [
        {
            "id": instance_id(seq[i]),
            "attribute": seq[i].attribute,
            "edit_step": i,
            "gap": t - i,
            "queries": judged(qs, [next(posts) for _ in qs]),
        }
        for i, qs in queries
    ]
    return {"sequence": s, "step": t, "id": instance_id(seq[t]), "seconds": round(seconds, 6), "evals": evals}
