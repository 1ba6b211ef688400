"""Audio files: decode with soundfile, mix to mono, resample with soxr; resolve SAKE file names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr


class AudioError(ValueError):
    """Missing, unreadable, empty or non-finite audio; the message names the file."""


def load_audio(path: str | Path, rate: int = 16000) -> np.ndarray:
    """Mono float32 samples of `path` at `rate` Hz."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"{path}: unreadable audio ({err})") from err
    if data.size == 0:
        raise AudioError(f"{path}: empty audio")
    wave = data.mean(axis=1)
    if not np.isfinite(wave).all():
        raise AudioError(f"{path}: non-finite samples")
    if sr != rate:
        wave = soxr.resample(wave, sr, rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


class AudioResolver:
    """Finds SAKE audio by bare file name: `<root>/<track>/<file>` (per-track folders such as
    Animal/ or DynamicSuperb/<Task>/) or `<root>/<file>` (one flat folder)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise AudioError(f"audio root {self.root} is not a directory")

    def candidates(self, file: str, track: str | None) -> list[Path]:
        return ([self.root / track / file] if track else []) + [self.root / file]

    def path(self, file: str, track: str | None = None) -> Path:
        tried = self.candidates(file, track)
        for p in tried:
            if p.is_file():
                return p
        raise AudioError(f"audio {file!r} (track {track}) not found: looked at {', '.join(map(str, tried))}")

    def load(self, file: str, track: str | None = None, rate: int = 16000) -> np.ndarray:
        return load_audio(self.path(file, track), rate)
