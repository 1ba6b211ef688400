"""Single and sequential editing sweeps.

Single editing, per test instance: apply the edit (in the weights, through hooks, or as prompt
context that every query is then asked in), answer all of the instance's queries in one
batched generation, undo the edit exactly, judge, append the instance's line, next.
Sequential editing, per sequence: apply the edits cumulatively; after applying edit t, answer
the queries of every edit i <= t among the first `first` of the sequence with gap t - i <=
`max_gap`, judge them (locality against the *unedited* model's answers), append the step's
line; undo everything in reverse at the end of the sequence.

Both resume from their results file: finished instances are skipped; a sequence that stopped
part-way re-applies its finished steps' edits (without re-evaluating them) and continues.
Instances (and sequences) are dealt to ranks round-robin when several processes share a sweep.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from common import EditRequest
from common.progress import progress_bar
from datamodules.audio_io import AudioResolver
from datamodules.examples import PromptMaker
from datamodules.schema import EditInstance, Query
from editors.base import EditHandle, Editor, in_context
from evaluation.judges import Judge
from evaluation.records import QueryResult, ResultsLog, instance_id, judge_results
from evaluation.responses import QueryKeys, ResponseCache, pre_edit_responses
from lalms.base import LALM
from lalms.prompt import Prompt

log = logging.getLogger(__name__)


def request(inst: EditInstance, prompt: Prompt) -> EditRequest:
    """What an editor sees of a test instance: the edit prompt, target and original label only."""
    return EditRequest(prompt=prompt, target=inst.target, original=inst.original, attribute=inst.attribute)


@dataclass
class Sweeper:
    """Runs an editor's sweeps on one LALM; shared by the single and sequential sweeps."""

    lalm: LALM
    editor: Editor
    judge: Judge
    resolver: AudioResolver
    responses: ResponseCache
    max_new_tokens: int = 32
    batch_size: int = 64
    rank: int = 0
    world_size: int = 1
    audio_cache_size: int = 512

    def __post_init__(self) -> None:
        self.prompt = PromptMaker(self.resolver, self.lalm.sampling_rate, self.audio_cache_size)
        self.key = QueryKeys(self.prompt, self.lalm.render, self.max_new_tokens)
        self._pre: dict[str, str] = {}

    # ------------------------------------------------------------------ model calls

    def generate(self, prompts: Sequence[Prompt]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            out += self.lalm.generate(prompts[start : start + self.batch_size], self.max_new_tokens)
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
                lambda prompts: self.lalm.generate(prompts, self.max_new_tokens),
                self.prompt,
                self.key,
                self.batch_size,
            )
        )

    def pre(self, q: Query) -> str:
        return self._pre[self.key(q)]

    def apply(self, inst: EditInstance) -> EditHandle:
        return self.editor.apply(request(inst, self.prompt(inst.reliability)))

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
        todo = [instances[i] for i in self.mine(len(instances)) if instance_id(instances[i]) not in done]
        if not todo:
            return
        log.info("single editing: %d instances to do, %d already done", len(todo), len(done))
        self.prepare(todo)
        with progress_bar("single editing", len(todo)) as advance:
            for inst in todo:
                queries = list(inst.queries())
                start = time.perf_counter()
                handle = self.apply(inst)
                try:
                    posts = self.generate([in_context([handle], self.prompt(q)) for q in queries])
                finally:
                    handle.undo()
                seconds = time.perf_counter() - start
                results.append(
                    {
                        "id": instance_id(inst),
                        "attribute": inst.attribute,
                        "original": inst.original,
                        "target": inst.target,
                        "seconds": round(seconds, 6),
                        "queries": self.judged(queries, posts),
                    }
                )
                advance(1)

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
        todo = [s for s in self.mine(len(sequences)) if len(done.get(s, ())) < len(sequences[s])]
        if not todo:
            return
        self.prepare([inst for s in todo for inst in sequences[s][:first]])
        steps = sum(len(sequences[s]) - len(done.get(s, ())) for s in todo)
        with progress_bar("sequential editing", steps) as advance:
            for s in todo:
                self._sequence(s, sequences[s], done.get(s, set()), results, first, max_gap, advance)

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
                evaluated = [i for i in range(min(first, t + 1)) if t - i <= max_gap]
                queries = [list(seq[i].queries()) for i in evaluated]
                posts = iter(
                    self.generate([in_context(handles, self.prompt(q)) for qs in queries for q in qs])
                )
                seconds = time.perf_counter() - start
                evals = [
                    {
                        "id": instance_id(seq[i]),
                        "attribute": seq[i].attribute,
                        "edit_step": i,
                        "gap": t - i,
                        "queries": self.judged(qs, [next(posts) for _ in qs]),
                    }
                    for i, qs in zip(evaluated, queries, strict=True)
                ]
                results.append(
                    {
                        "sequence": s,
                        "step": t,
                        "id": instance_id(inst),
                        "seconds": round(seconds, 6),
                        "evals": evals,
                    }
                )
                advance(1)
        finally:
            for handle in reversed(handles):
                handle.undo()
