"""Checks on audio handed to an LALM adapter: mono, finite, float, at the processor's rate."""

from __future__ import annotations

import numpy as np
import soxr
import torch

MIN_SECONDS = 0.1  # shorter clips collapse to one or zero audio tokens in Whisper-style encoders


def check_audio(
    audio: object, sampling_rate: int | None, target_rate: int, where: str = "audio"
) -> np.ndarray:
    """Return `audio` as a 1-D float32 array at `target_rate`, or raise ValueError naming the problem.

    `sampling_rate=None` means the caller asserts the audio is already at `target_rate`.
    Audio at another rate is resampled with soxr. `where` names the input in error messages.
    """
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    if not isinstance(audio, np.ndarray):
        raise ValueError(f"{where}: expected a 1-D float numpy array or tensor, got {type(audio).__name__}")
    if audio.ndim != 1:
        raise ValueError(
            f"{where}: expected mono audio as a 1-D array, got shape {tuple(audio.shape)}; "
            "average the channels (audio.mean(axis=...)) first"
        )
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(
            f"{where}: expected float samples in [-1, 1], got dtype {audio.dtype}; "
            "convert integer PCM with audio / np.iinfo(dtype).max"
        )
    if not np.isfinite(audio).all():
        bad = int((~np.isfinite(audio)).sum())
        raise ValueError(f"{where}: contains {bad} non-finite samples (NaN or inf)")
    if sampling_rate is not None:
        if sampling_rate <= 0:
            raise ValueError(f"{where}: sampling rate must be positive, got {sampling_rate}")
        if sampling_rate != target_rate:
            audio = soxr.resample(audio.astype(np.float32), sampling_rate, target_rate)
    if audio.shape[0] < MIN_SECONDS * target_rate:
        raise ValueError(
            f"{where}: {audio.shape[0]} samples at {target_rate} Hz is shorter than {MIN_SECONDS} s"
        )
    return np.ascontiguousarray(audio, dtype=np.float32)
