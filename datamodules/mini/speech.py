"""Speech from espeak-ng through ctypes (the library and voices ship in PyPI `espeakng-loader`)."""

from __future__ import annotations

import ctypes
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import espeakng_loader
import numpy as np
import soxr

_SYNCHRONOUS = 2  # AUDIO_OUTPUT_SYNCHRONOUS: synthesis returns when the callback has all samples
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4  # espeak_PARAMETER
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

MALE_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7")
FEMALE_VARIANTS = ("f1", "f2", "f3", "f4", "f5")


@dataclass(frozen=True)
class Voice:
    """An espeak voice (`en`, `de`, `cmn`, ...) with a gendered variant and prosody."""

    language: str
    variant: str
    rate: int = 170  # words per minute
    pitch: int = 50  # 0-100
    range: int = 50  # 0-100
    volume: int = 100  # 0-200

    @property
    def name(self) -> str:
        return f"{self.language}+{self.variant}"


class Espeak:
    """One espeak-ng engine. The C library keeps global state, so create one per process.

    espeak-ng draws from libc's rand() and from a generator of its own (seeded from the clock
    at initialisation), and keeps static synthesis state (e.g. its flutter phase) that
    re-initialising does not reset, so consecutive utterances are not reproducible. For
    deterministic output use `isolated`: it forks a child from this freshly initialised engine
    for each utterance, seeds both generators there, and never synthesises in the parent.
    """

    def __init__(self) -> None:
        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        data = espeakng_loader.get_data_path().encode()
        self.rate = self._lib.espeak_Initialize(_SYNCHRONOUS, 0, data, 0)
        if self.rate <= 0:
            raise RuntimeError(f"espeak-ng failed to initialise with data at {data.decode()}")
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # kept alive as long as the engine
        self._lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, _events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def say(self, text: str, voice: Voice, rate: int = 16000) -> np.ndarray:
        """Float32 samples in [-1, 1] of `text` spoken by `voice`, at `rate` Hz."""
        if self._lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice.name!r}")
        for param, value in (
            (_RATE, voice.rate),
            (_VOLUME, voice.volume),
            (_PITCH, voice.pitch),
            (_RANGE, voice.range),
        ):
            self._lib.espeak_SetParameter(param, int(value), 0)
        self._chunks = []
        raw = text.encode("utf-8")
        self._lib.espeak_Synth(raw, len(raw) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        self._lib.espeak_Synchronize()
        if not self._chunks:
            raise RuntimeError(f"espeak-ng produced no audio for {text!r} with {voice.name}")
        wave = np.concatenate(self._chunks).astype(np.float32) / 32768.0
        return soxr.resample(wave, self.rate, rate).astype(np.float32)

    def isolated(self, seed: int, work: Callable[[Espeak], None], what: str) -> None:
        """Run `work(self)` in a forked child with rand() seeded; raise if the child fails."""
        libc = ctypes.CDLL(None)
        pid = os.fork()
        if pid == 0:  # child: same engine state as after initialisation, every time
            code = 0
            try:
                libc.srand(seed % 2**31)
                self._lib.espeak_ng_SetRandSeed(ctypes.c_long(seed % 2**31))
                work(self)
            except BaseException:  # noqa: BLE001 - reported through the exit code
                traceback.print_exc()
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"espeak-ng synthesis failed for {what} (see the traceback above)")
