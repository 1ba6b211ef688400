"""What every judge decides, and the interface the sweeps call.

A *correctness* case asks whether a free-text response commits to the ground-truth option of
a multiple-choice question (reliability, generality, portability). A *consistency* case asks
whether a post-edit response commits to the same answer as the pre-edit response (audio and
text locality). Judges take whole batches so that a remote judge can work concurrently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class CorrectnessCase:
    question: str  # the question as the model saw it (options included)
    options: tuple[str, ...]  # the options listed in the question, in order
    truth: str  # the ground-truth option
    response: str  # the model's free-text response


@dataclass(frozen=True)
class ConsistencyCase:
    question: str
    options: tuple[str, ...]
    before: str  # the unedited model's response
    after: str  # the edited model's response


@dataclass(frozen=True)
class Judgment:
    """One decision. `verdict` is None when the judge's reply could not be parsed (invalid):
    such a case counts as wrong in the metrics and is counted separately in the report."""

    verdict: bool | None
    reason: str  # how it was decided, e.g. "exact", "committed", "no-commitment", "empty", "llm"
    committed: str | None = None  # the option the (post-edit) response commits to, when known

    @property
    def valid(self) -> bool:
        return self.verdict is not None


@runtime_checkable
class Judge(Protocol):
    name: str

    def identity(self) -> dict[str, object]:
        """What decides this judge's verdicts (part of a run's identity and of verdict caches)."""

    def correctness(self, cases: Sequence[CorrectnessCase]) -> list[Judgment]:
        """One judgment per case, in order."""

    def consistency(self, cases: Sequence[ConsistencyCase]) -> list[Judgment]:
        """One judgment per case, in order."""
