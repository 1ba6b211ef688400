"""Exact option match: a response is correct when it is the ground-truth option's text."""

from __future__ import annotations

from datamodules.options import normalize

__all__ = ["exact_match", "normalize"]


def exact_match(response: str, answer: str) -> bool:
    return bool(response.strip()) and normalize(response) == normalize(answer)
