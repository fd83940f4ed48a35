"""Speech clips for the audio models: espeak-ng when it is installed, else a synthetic fallback.

espeak-ng (``apt-get install espeak-ng``) speaks real phrases from graphopt's frozen sentence
corpus in ten English voices. Without it, clips are *formant babble*: a glottal pulse train at a
wandering pitch through three vowel formants, in syllable-length bursts. That has speech's spectral
shape and rhythm, so the front ends see realistic energy, but it says no words: the wake-word model
then sees no true "hey jarvis", and its positives come only from whatever scores highest.
``SPEECH_SOURCE`` names which one this machine used; it is written into every audio model's meta.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave

import numpy as np

from graphopt import samples

SR = 16000
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us+f3", "en-us+m3", "en-gb+f2",
          "en-us+f4", "en-gb-x-gbcwmd"]
HAVE_ESPEAK = shutil.which("espeak-ng") is not None
SPEECH_SOURCE = "espeak-ng" if HAVE_ESPEAK else "formant babble (espeak-ng not installed)"


def _espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng speech resampled to 16 kHz, float32 in [-1, 1]."""
    from scipy.signal import resample_poly

    raw = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                         check=True, capture_output=True).stdout
    with wave.open(io.BytesIO(raw)) as clip:
        rate = clip.getframerate()
        pcm = np.frombuffer(clip.readframes(clip.getnframes()), np.int16).astype(np.float32) / 32768.0
    g = np.gcd(SR, rate)
    return resample_poly(pcm, SR // g, rate // g).astype(np.float32)


# (F1, F2, F3) in Hz of a few English vowels
_VOWELS = np.array([[730, 1090, 2440], [270, 2290, 3010], [530, 1840, 2480], [300, 870, 2240],
                    [640, 1190, 2390], [490, 1350, 1690]], np.float64)


def _babble(text: str, rng: np.random.Generator, speed: int, pitch: int) -> np.ndarray:
    """One burst per syllable-ish chunk of ``text`` (so longer phrases last longer, as spoken)."""
    from scipy.signal import lfilter

    syllables = max(2, len(text) // 3)
    seconds_per = 60.0 / (speed * 2.2)  # espeak's -s is words per minute, ~2.2 syllables a word
    out = []
    for _ in range(syllables):
        n = int(seconds_per * SR * rng.uniform(0.7, 1.3))
        f0 = (90 + pitch * 1.6) * np.exp(np.cumsum(rng.normal(0, 0.002, n)))
        pulses = (np.diff(np.floor(np.cumsum(f0 / SR)), prepend=0) > 0).astype(np.float64)
        voiced = pulses + 0.02 * rng.standard_normal(n)
        for formant, bandwidth in zip(_VOWELS[int(rng.integers(len(_VOWELS)))], (80, 100, 120)):
            r = np.exp(-np.pi * bandwidth / SR)
            voiced = lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * formant / SR), r * r], voiced)
        out += [voiced * np.hanning(n), np.zeros(int(rng.uniform(0.01, 0.08) * SR))]
    signal = np.concatenate(out)
    return (signal / (np.abs(signal).max() + 1e-9)).astype(np.float32)


def speak(text: str, rng: np.random.Generator) -> np.ndarray:
    voice = VOICES[int(rng.integers(len(VOICES)))]
    speed, pitch = int(rng.integers(130, 200)), int(rng.integers(30, 70))
    return _espeak(text, voice, speed, pitch) if HAVE_ESPEAK else _babble(text, rng, speed, pitch)


def room(rng: np.random.Generator, speech: np.ndarray, total: int, *, lead: float | None = None) -> np.ndarray:
    """``speech`` placed in ``total`` samples of lightly smoothed noise and mains hum."""
    out = np.zeros(total, np.float32)
    speech = speech[:total]
    start = min(int((lead if lead is not None else rng.uniform(0.05, 0.4)) * SR), max(0, total - len(speech)))
    gain = rng.uniform(0.3, 0.9) / max(1e-6, np.abs(speech).max())
    out[start:start + len(speech)] = speech * gain
    snr = rng.uniform(15, 35)
    noise = np.convolve(rng.standard_normal(total).astype(np.float32), np.ones(4) / 4, mode="same").astype(np.float32)
    noise *= np.sqrt((np.mean(out ** 2) + 1e-9) / 10 ** (snr / 10) / (np.mean(noise ** 2) + 1e-12))
    seconds = np.arange(total) / SR
    hum = rng.uniform(0, 0.01) * np.sin(2 * np.pi * rng.choice([50, 60]) * seconds)
    return np.clip(out + noise + hum, -1, 1).astype(np.float32)


def random_phrase(rng: np.random.Generator, shortest: int = 3, longest: int = 8) -> str:
    corpus = samples.all_sentences()
    words = corpus[int(rng.integers(len(corpus)))].split()
    n = int(rng.integers(shortest, longest + 1))
    start = int(rng.integers(0, max(1, len(words) - n)))
    return " ".join(words[start:start + n])


def speech_clip(rng: np.random.Generator, seconds: float, text: str | None = None,
                lead: float | None = None) -> np.ndarray:
    """A ``seconds``-long 16 kHz clip of one spoken phrase in a noisy room."""
    text = text or random_phrase(rng)
    return room(rng, speak(text, rng), int(seconds * SR), lead=lead)


def clips(n: int, seed: int, seconds: float) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [speech_clip(rng, seconds) for _ in range(n)]
