"""Where a time span of a clip lies in the model: the audio encoder's frames and the LLM's audio
rows that overlap it. Used wherever a spoken word is located: the tracing's subject-span noise
and word groups (analysis/tracing.py), the locate-then-edit editors' keys over a word
(editors/locate.py: position `span`).

Encoder frame k covers [k, k+1) x the feature hop x the convolutional stem's stride (Whisper:
10 ms x 2 = 20 ms); the LLM's audio rows of one clip divide the clip's duration evenly (each
family's connector pools frames in equal groups)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from lalms.base import LALM
from lalms.edit_sites import audio_stem


def frame_seconds(lalm: LALM) -> float:
    """Seconds one audio-encoder frame (the stem's output, and every encoder layer's) covers."""
    _, stride = audio_stem(lalm.model, lalm.edit_sites)
    return stride * lalm.feature_hop_seconds


def span_frames(span: tuple[float, float], frames: int, seconds_per_frame: float) -> range:
    """The encoder frames (of `frames`) that overlap `span` (seconds): at least one."""
    first = min(frames - 1, int(span[0] / seconds_per_frame))
    return range(first, max(first + 1, min(frames, math.ceil(span[1] / seconds_per_frame))))


def span_rows(span: tuple[float, float], rows: Sequence[int], seconds: float) -> list[int]:
    """The LLM's audio rows (positions `rows` of one clip `seconds` long) that overlap `span`:
    at least one."""
    if not rows or seconds <= 0:
        raise ValueError("a time span in the LLM needs a prompt with one clip of known duration")
    per_row = seconds / len(rows)
    first = min(len(rows) - 1, int(span[0] / per_row))
    last = max(first + 1, min(len(rows), math.ceil(span[1] / per_row)))
    return list(rows[first:last])
