"""Judges: `rule` (offline, default) and `openai` (the paper's LLM judge)."""

from evaluation.judges.base import ConsistencyCase, CorrectnessCase, Judge, Judgment

__all__ = ["ConsistencyCase", "CorrectnessCase", "Judge", "Judgment"]
