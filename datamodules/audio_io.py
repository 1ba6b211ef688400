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


# Formats soundfile (libsndfile) decodes; a clip may have been downloaded under any of them.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif")


class AudioResolver:
    """Finds SAKE audio by bare file name: `<root>/<track>/<file>` (per-track folders such as
    Animal/ or DynamicSuperb/<Task>/) or `<root>/<file>` (one flat folder); failing those, a file
    of the same stem under another audio extension in either place (`cow_68.flac` for
    `cow_68.wav`). Folder listings are read once."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise AudioError(f"audio root {self.root} is not a directory")
        self._listing: dict[Path, dict[str, str]] = {}  # folder -> {stem: file name}

    def folders(self, track: str | None) -> list[Path]:
        return ([self.root / track] if track else []) + [self.root]

    def _stems(self, folder: Path) -> dict[str, str]:
        if folder not in self._listing:
            names = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
            stems: dict[str, str] = {}
            for name in names:  # the first extension in AUDIO_EXTENSIONS order wins
                stem, ext = Path(name).stem, Path(name).suffix.casefold()
                if ext in AUDIO_EXTENSIONS:
                    best = stems.get(stem)
                    rank = AUDIO_EXTENSIONS.index(ext)
                    if best is None or rank < AUDIO_EXTENSIONS.index(Path(best).suffix.casefold()):
                        stems[stem] = name
            self._listing[folder] = stems
        return self._listing[folder]

    def find(self, file: str, track: str | None = None) -> Path | None:
        """The clip's path, or None when no candidate exists."""
        folders = self.folders(track)
        for folder in folders:
            if (folder / file).is_file():
                return folder / file
        for folder in folders:
            other = self._stems(folder).get(Path(file).stem)
            if other is not None:
                return folder / other
        return None

    def path(self, file: str, track: str | None = None) -> Path:
        found = self.find(file, track)
        if found is None:
            tried = ", ".join(str(f / file) for f in self.folders(track))
            raise AudioError(
                f"audio {file!r} (track {track}) not found: looked at {tried} "
                f"(and the same name with {'/'.join(AUDIO_EXTENSIONS)})"
            )
        return found

    def load(self, file: str, track: str | None = None, rate: int = 16000) -> np.ndarray:
        return load_audio(self.path(file, track), rate)
