"""Procedural sounds: a randomised family per animal, and general-audio tasks.

Every generator takes a numpy Generator and returns float32 samples at SR, so clips of one
label differ (call count, pitch, timing, timbre) while the families stay separable by ear:
barks are noisy harmonic bursts, meows harmonic glides, grunts low pulse trains, moos long low
harmonics, croaks click trains through a resonance, clucks short falling chirps, crowing a long
multi-segment call, bleats tremolo harmonics and caws harsh noisy calls.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SR = 16000
Rng = np.random.Generator


def _t(seconds: float) -> int:
    return max(1, int(seconds * SR))


def harmonic(f0: np.ndarray, rolloff: float, n_harm: int = 20) -> np.ndarray:
    """Sum of harmonics of an f0 contour (Hz per sample), amplitudes rolloff**k, none above Nyquist."""
    phase = 2 * np.pi * np.cumsum(f0) / SR
    out = np.zeros_like(f0)
    for k in range(1, n_harm + 1):
        audible = (k * f0) < SR / 2 - 200
        out += (rolloff ** (k - 1)) * np.sin(k * phase) * audible
    return out


def band_noise(n: int, lo: float, hi: float, rng: Rng) -> np.ndarray:
    """White noise band-limited to [lo, hi] Hz."""
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / SR)
    spec[(freqs < lo) | (freqs > hi)] = 0
    out = np.fft.irfft(spec, n)
    return out / (np.abs(out).max() + 1e-9)


def resonate(x: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Emphasise a formant: multiply the spectrum by a Gaussian bump plus a floor."""
    spec = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(len(x), 1 / SR)
    spec *= 0.15 + np.exp(-0.5 * ((freqs - centre) / width) ** 2)
    return np.fft.irfft(spec, len(x))


def envelope(n: int, attack: float, release: float) -> np.ndarray:
    a, r = min(_t(attack), n // 2), min(_t(release), n // 2)
    env = np.ones(n)
    env[:a] = np.linspace(0, 1, a)
    env[n - r :] = np.linspace(1, 0, r)
    return env


def glide(n: int, points: list[float]) -> np.ndarray:
    """A piecewise-linear contour through `points`, spread evenly over n samples."""
    return np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(points)), points)


def sequence(calls: list[np.ndarray], gaps: list[float]) -> np.ndarray:
    parts = []
    for call, gap in zip(calls, gaps, strict=True):
        parts += [call, np.zeros(_t(gap))]
    return np.concatenate(parts)


def _norm(x: np.ndarray) -> np.ndarray:
    return x / (np.abs(x).max() + 1e-9)


# ------------------------------------------------------------------------------- animals
def dog(rng: Rng) -> np.ndarray:
    def bark():
        n = _t(rng.uniform(0.12, 0.25))
        f0 = rng.uniform(350, 600)
        tone = harmonic(glide(n, [f0, f0 * rng.uniform(0.6, 0.8)]), 0.7, 12)
        noise = band_noise(n, 500, 2500, rng)
        mix = rng.uniform(0.4, 0.7)
        return _norm((1 - mix) * _norm(tone) + mix * noise) * np.exp(-np.linspace(0, rng.uniform(3, 6), n))

    k = int(rng.integers(1, 4))
    return sequence([bark() for _ in range(k)], list(rng.uniform(0.1, 0.3, k)))


def cat(rng: Rng) -> np.ndarray:
    n = _t(rng.uniform(0.5, 1.0))
    f0 = glide(n, [rng.uniform(450, 600), rng.uniform(700, 950), rng.uniform(400, 550)])
    tone = harmonic(f0, 0.6, 10)
    return resonate(tone, rng.uniform(900, 1400), 400) * envelope(n, 0.05, 0.15)


def pig(rng: Rng) -> np.ndarray:
    def grunt():
        n = _t(rng.uniform(0.15, 0.3))
        f0 = rng.uniform(90, 160)
        pulses = harmonic(glide(n, [f0, f0 * rng.uniform(0.8, 1.0)]), 0.92, 40)
        nasal = band_noise(n, 100, 1200, rng)
        return _norm(_norm(pulses) + 0.5 * nasal) * envelope(n, 0.02, 0.06)

    k = int(rng.integers(2, 5))
    return sequence([grunt() for _ in range(k)], list(rng.uniform(0.05, 0.2, k)))


def cow(rng: Rng) -> np.ndarray:
    n = _t(rng.uniform(0.9, 1.5))
    f0 = rng.uniform(110, 160)
    tone = harmonic(glide(n, [f0 * 0.9, f0 * 1.1, f0 * 0.85]), 0.75, 25)
    return resonate(tone, rng.uniform(350, 650), 250) * envelope(n, 0.2, 0.3)


def frog(rng: Rng) -> np.ndarray:
    def croak():
        n = _t(rng.uniform(0.2, 0.5))
        rate = rng.uniform(25, 60)
        clicks = (np.sin(2 * np.pi * rate * np.arange(n) / SR) > 0.85).astype(float)
        body = band_noise(n, 200, 3000, rng) * clicks
        return _norm(resonate(body, rng.uniform(600, 1400), 200)) * envelope(n, 0.02, 0.05)

    k = int(rng.integers(2, 6))
    return sequence([croak() for _ in range(k)], list(rng.uniform(0.1, 0.3, k)))


def hen(rng: Rng) -> np.ndarray:
    def cluck():
        n = _t(rng.uniform(0.05, 0.1))
        f0 = rng.uniform(350, 600)
        return harmonic(glide(n, [f0, f0 * 0.7]), 0.6, 10) * envelope(n, 0.005, 0.03)

    k = int(rng.integers(4, 9))
    return sequence([cluck() for _ in range(k)], list(rng.uniform(0.08, 0.25, k)))


def rooster(rng: Rng) -> np.ndarray:
    base = rng.uniform(0.8, 1.2)
    lengths = np.array([0.15, 0.12, 0.2, 0.45]) * rng.uniform(0.9, 1.4)
    levels = np.array([500, 650, 720, 600]) * base
    segs = []
    for i, (dur, f) in enumerate(zip(lengths, levels, strict=True)):
        n = _t(dur)
        end = f * (0.7 if i == 3 else 1.0)
        segs.append(harmonic(glide(n, [f, end]), 0.65, 12) * envelope(n, 0.01, 0.03))
    call = np.concatenate(segs)
    return call + 0.05 * band_noise(len(call), 1000, 4000, rng)


def sheep(rng: Rng) -> np.ndarray:
    n = _t(rng.uniform(0.6, 1.0))
    f0 = rng.uniform(250, 400)
    tone = harmonic(glide(n, [f0, f0 * 1.05, f0 * 0.95]), 0.7, 15)
    tremolo = 1 - rng.uniform(0.5, 0.8) * (
        0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(18, 30) * np.arange(n) / SR)
    )
    return resonate(tone * tremolo, rng.uniform(700, 1200), 300) * envelope(n, 0.04, 0.15)


def crow(rng: Rng) -> np.ndarray:
    def caw():
        n = _t(rng.uniform(0.25, 0.4))
        f0 = rng.uniform(500, 800)
        tone = harmonic(glide(n, [f0, f0 * 0.85]), 0.8, 10)
        mix = rng.uniform(0.6, 0.9)
        return _norm((1 - mix) * _norm(tone) + mix * band_noise(n, 1000, 3000, rng)) * envelope(n, 0.02, 0.08)

    k = int(rng.integers(2, 5))
    return sequence([caw() for _ in range(k)], list(rng.uniform(0.15, 0.3, k)))


ANIMALS: dict[str, Callable[[Rng], np.ndarray]] = {
    "dog": dog, "cat": cat, "pig": pig, "cow": cow, "frog": frog,
    "hen": hen, "rooster": rooster, "sheep": sheep, "crow": crow,
}  # fmt: skip


def animal(label: str, rng: Rng) -> np.ndarray:
    """A clip of `label` with leading silence, background noise and a random level."""
    call = _norm(ANIMALS[label](rng))
    lead = np.zeros(_t(rng.uniform(0.0, 0.2)))
    x = np.concatenate([lead, call, np.zeros(_t(0.1))])
    x = x + rng.uniform(0.002, 0.01) * rng.standard_normal(len(x))
    return (rng.uniform(0.5, 0.9) * _norm(x)).astype(np.float32)


# ------------------------------------------------------------------------ general audio
NUMBERS = ("one", "two", "three", "four")


def _tone(seconds: float, freq: float | np.ndarray) -> np.ndarray:
    n = _t(seconds)
    f = np.broadcast_to(np.asarray(freq, dtype=float), (n,))
    return np.sin(2 * np.pi * np.cumsum(f) / SR) * envelope(n, 0.01, 0.01)


def beeps(label: str, rng: Rng) -> np.ndarray:
    k = NUMBERS.index(label) + 1
    f = rng.uniform(800, 1500)
    calls = [_tone(rng.uniform(0.1, 0.2), f) for _ in range(k)]
    return np.concatenate([np.zeros(_t(0.1)), sequence(calls, list(rng.uniform(0.15, 0.35, k)))])


def pitch_direction(label: str, rng: Rng) -> np.ndarray:
    n_sec = rng.uniform(0.8, 1.5)
    lo = rng.uniform(200, 500)
    hi = lo * rng.uniform(1.5, 3.0)
    path = [lo, hi] if label == "rising" else [hi, lo]
    return _tone(n_sec, glide(_t(n_sec), path))


def loudness(label: str, rng: Rng) -> np.ndarray:
    seconds = rng.uniform(0.8, 1.2)
    x = (
        _tone(seconds, rng.uniform(300, 1200))
        if rng.random() < 0.5
        else band_noise(_t(seconds), 100, 6000, rng)
    )
    level = rng.uniform(0.7, 0.95) if label == "loud" else rng.uniform(0.01, 0.04)
    return level * _norm(x)


def noise_or_tone(label: str, rng: Rng) -> np.ndarray:
    seconds = rng.uniform(0.8, 1.2)
    x = band_noise(_t(seconds), 50, 7500, rng) if label == "noise" else _tone(seconds, rng.uniform(200, 2000))
    return rng.uniform(0.3, 0.7) * _norm(x)


GENERAL_TASKS: dict[str, Callable[[str, Rng], np.ndarray]] = {
    "BeepCounting": beeps,
    "PitchDirection": pitch_direction,
    "Loudness": loudness,
    "NoiseOrTone": noise_or_tone,
}


def general(task: str, label: str, rng: Rng) -> np.ndarray:
    return GENERAL_TASKS[task](label, rng).astype(np.float32)
