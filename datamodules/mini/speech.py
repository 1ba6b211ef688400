"""Speech from espeak-ng through ctypes (the library and voices ship in PyPI `espeakng-loader`)."""

from __future__ import annotations

import ctypes
import os
import re
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
_EVENT_END_OF_LIST, _EVENT_WORD, _EVENT_END = 0, 1, 5  # espeak_EVENT_TYPE


class _Event(ctypes.Structure):  # espeak_EVENT (speak_lib.h)
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based character offset (espeakCHARS_UTF8)
        ("length", ctypes.c_int),  # characters
        ("audio_position", ctypes.c_int),  # ms within the utterance
        ("sample", ctypes.c_int),  # samples within the utterance, at the engine's rate
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)

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
        self._events: list[tuple[int, int, int]] = []  # (type, text position, sample)
        self._callback = _CALLBACK(self._collect)  # kept alive as long as the engine
        self._lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != _EVENT_END_OF_LIST:
            e = events[i]
            if e.type in (_EVENT_WORD, _EVENT_END):
                self._events.append((e.type, e.text_position, e.sample))
            i += 1
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
        self._chunks, self._events = [], []
        raw = text.encode("utf-8")
        self._lib.espeak_Synth(raw, len(raw) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        self._lib.espeak_Synchronize()
        if not self._chunks:
            raise RuntimeError(f"espeak-ng produced no audio for {text!r} with {voice.name}")
        wave = np.concatenate(self._chunks).astype(np.float32) / 32768.0
        return soxr.resample(wave, self.rate, rate).astype(np.float32)

    def say_words(
        self, text: str, voice: Voice, rate: int = 16000
    ) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
        """`say`, and each whitespace-separated word of `text` with its (start, end) in seconds
        from espeak-ng's word events: a word starts at its first event and ends where the next
        word starts (the last one at the end of the utterance), so pauses go to the word before."""
        wave = self.say(text, voice, rate)
        tokens = [(m.start(), m.group()) for m in re.finditer(r"\S+", text)]
        starts: dict[int, int] = {}  # token index -> its first event's sample
        end = len(wave) * self.rate / rate
        for kind, position, sample in self._events:
            if kind == _EVENT_END:
                end = sample
                continue
            # character offsets count code points from 1
            at = max((k for k, (c, _) in enumerate(tokens) if c <= position - 1), default=0)
            starts.setdefault(at, sample)
        missing = [tokens[k][1] for k in range(len(tokens)) if k not in starts]
        if missing:
            raise RuntimeError(f"espeak-ng gave no word event for {missing} in {text!r}")
        bounds = [starts[k] for k in range(len(tokens))] + [max(end, starts[len(tokens) - 1])]
        words = [(w, bounds[k] / self.rate, bounds[k + 1] / self.rate) for k, (_, w) in enumerate(tokens)]
        return wave, words

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
