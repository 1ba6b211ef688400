"""Detect degenerate (looping) generations.

A generation is degenerate when it is mostly one unit repeated back to back:

* a word n-gram (n = 1..4) repeated consecutively, e.g. "catholic catholic catholic catholic" or
  "the dog the dog the dog the dog" (words compare casefolded, with surrounding punctuation
  stripped, so "dog, dog, dog, dog" loops too);
* a character unit (1..8 characters) repeated inside a stretch without whitespace, e.g.
  "dogdogdogdogdog", "!!!!!!!!!!!!" or "ababababababab".

A loop counts when it covers at least half of the text, or when it is so long that it is a
loop wherever it sits (a model that answers and then repeats itself until the token limit).
Short natural repetitions ("no no", "1111", "hahaha", "very very good") stay below the bars.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

# Word loops: at least WORD_MIN_REPEATS consecutive copies of an n-gram (n <= WORD_MAX_N)
# covering at least WORD_MIN_COVERAGE of the words, or WORD_LONG_LOOP copies anywhere.
WORD_MAX_N = 4
WORD_MIN_REPEATS = 4
WORD_MIN_COVERAGE = 0.5
WORD_LONG_LOOP = 8

# Character loops inside a whitespace-free stretch: a unit of at most CHAR_MAX_UNIT characters
# repeated at least CHAR_MIN_REPEATS times in a run of at least CHAR_MIN_RUN characters that
# covers at least CHAR_MIN_COVERAGE of the non-space characters, or any run of CHAR_LONG_LOOP.
CHAR_MAX_UNIT = 8
CHAR_MIN_REPEATS = 5
CHAR_MIN_RUN = 12
CHAR_MIN_COVERAGE = 0.5
CHAR_LONG_LOOP = 40

_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~“”‘’«»…"


def _periodic_runs(seq: Sequence[str], max_period: int) -> Iterator[tuple[int, int]]:
    """(period, length) of every maximal stretch of `seq` that repeats itself with that period."""
    for period in range(1, max_period + 1):
        streak = 0
        for k in range(len(seq) - period):
            if seq[k] == seq[k + period]:
                streak += 1
                continue
            if streak:
                yield period, streak + period
            streak = 0
        if streak:
            yield period, streak + period


def _word_loop(text: str) -> bool:
    words = [w.strip(_PUNCT).casefold() for w in text.split()]
    words = [w for w in words if w]
    for period, length in _periodic_runs(words, WORD_MAX_N):
        copies = length // period
        if copies >= WORD_LONG_LOOP:
            return True
        if copies >= WORD_MIN_REPEATS and length >= WORD_MIN_COVERAGE * len(words):
            return True
    return False


def _char_loop(text: str) -> bool:
    chunks = text.split()
    total = sum(len(c) for c in chunks)
    for chunk in chunks:
        for period, length in _periodic_runs(chunk, CHAR_MAX_UNIT):
            if length // period < CHAR_MIN_REPEATS or length < CHAR_MIN_RUN:
                continue
            if length >= CHAR_LONG_LOOP or length >= CHAR_MIN_COVERAGE * total:
                return True
    return False


def is_degenerate(text: str) -> bool:
    """True when `text` is a repetition loop (see the module docstring); False for empty text."""
    return bool(text.strip()) and (_word_loop(text) or _char_loop(text))
