"""Exact option match: a response is correct when it is the ground-truth option's text."""

from __future__ import annotations

import string

_EDGE = string.whitespace + string.punctuation.replace("'", "")


def normalize(text: str) -> str:
    """Casefold, collapse whitespace, strip surrounding punctuation and quotes."""
    return " ".join(text.casefold().split()).strip(_EDGE + "'")


def exact_match(response: str, answer: str) -> bool:
    return bool(response.strip()) and normalize(response) == normalize(answer)
