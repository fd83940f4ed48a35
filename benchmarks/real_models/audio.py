"""Calibration and judging data of the audio models, made from ``speech.py`` clips.

The openwakeword models are a chain (melspectrogram -> embedding -> wake word): the later models'
inputs are computed by the reference (unoptimized) earlier models, exactly as openwakeword runs them.
Each builder returns (calib arrays, judging arrays, meta); silero's writes per-feed folders itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from benchmarks.real_models import speech
from benchmarks.real_models.registry import MODELS
from benchmarks.real_models.runtime import session

Arrays = dict[str, np.ndarray]


def melspec(root: Path, n_calib: int, n_data: int, seeds: tuple[int, int]) -> tuple[Arrays, Arrays, dict]:
    # openwakeword feeds int16 PCM values as float32 (+-32767)
    calib, data = (np.stack(speech.clips(n, seed, 2.0)) * 32767 for n, seed in zip((n_calib, n_data), seeds))
    return {"input": calib.astype(np.float32)}, {"input": data.astype(np.float32)}, {}


def _log_mel(root: Path, clip: np.ndarray) -> np.ndarray:
    """openwakeword's features: the melspectrogram model's output / 10 + 2, (frames, 32)."""
    model = session(MODELS["oww_melspec"].model_path(root), optimized=False)
    return np.squeeze(model.run(None, {"input": (clip * 32767)[None].astype(np.float32)})[0]) / 10 + 2


def embedding(root: Path, n_calib: int, n_data: int, seeds: tuple[int, int]) -> tuple[Arrays, Arrays, dict]:
    def windows(n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = []
        for clip in speech.clips(n // 2, seed, 2.0):
            mel = _log_mel(root, clip)
            for start in rng.choice(list(range(0, mel.shape[0] - 76 + 1, 8)), 2, replace=False):
                out.append(mel[start:start + 76, :, None])
        return np.stack(out).astype(np.float32)

    return {"input_1": windows(n_calib, seeds[0])}, {"input_1": windows(n_data, seeds[1])}, {}


def _embeddings(root: Path, clip: np.ndarray) -> np.ndarray:
    """One 96-d embedding per 80 ms (76-frame window, hop 8), as openwakeword streams them."""
    mel = _log_mel(root, clip)
    model = session(MODELS["oww_embedding"].model_path(root), optimized=False)
    windows = np.stack([mel[i:i + 76] for i in range(0, mel.shape[0] - 76 + 1, 8)])[..., None]
    return model.run(None, {"input_1": windows.astype(np.float32)})[0].reshape(len(windows), 96)


def hey_jarvis(root: Path, n_calib: int, n_data: int, seeds: tuple[int, int]) -> tuple[Arrays, Arrays, dict]:
    """Half the clips say the wake phrase (the window where the reference fires most is kept),
    half say something else (a random window): both sides of the decision are judged."""
    wake = session(MODELS["oww_hey_jarvis"].model_path(root), optimized=False)

    def make(n: int, seed: int) -> tuple[np.ndarray, list[str], list[float]]:
        rng = np.random.default_rng(seed)
        inputs, kinds, scores = [], [], []
        for i in range(n):
            positive = i % 2 == 0
            text = str(rng.choice(["hey jarvis", "hey, jarvis", "hey jarvis!", "hey jarvis, lights on"])) \
                if positive else None
            clip = speech.speech_clip(rng, 3.0, text=text, lead=float(rng.uniform(0.3, 1.0)))
            emb = _embeddings(root, clip)
            windows = np.stack([emb[j:j + 16] for j in range(0, len(emb) - 16 + 1)]).astype(np.float32)
            window_scores = np.array([wake.run(None, {"x.1": w[None]})[0].item() for w in windows])
            pick = int(window_scores.argmax()) if positive else int(rng.integers(len(windows)))
            inputs.append(windows[pick])
            kinds.append("positive" if positive else "negative")
            scores.append(float(window_scores[pick]))
        return np.stack(inputs), kinds, scores

    calib, _, _ = make(n_calib, seeds[0])
    data, kinds, scores = make(n_data, seeds[1])
    return {"x.1": calib}, {"x.1": data}, {"clip_kind": kinds, "reference_scores": scores}


def whisper(root: Path, n_calib: int, n_data: int, seeds: tuple[int, int]) -> tuple[Arrays, Arrays, dict]:
    """Short clips in a 3 s buffer; the front end pads every clip to 30 s (3000 frames), so only the
    first length // 160 frames carry audio: the user-level metric looks at those."""
    def make(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        waves, lengths = np.zeros((n, 48000), np.float32), np.empty(n, np.int64)
        for i in range(n):
            clip = speech.speech_clip(rng, float(rng.uniform(1.0, 2.5)))
            waves[i, : len(clip)] = clip
            lengths[i] = len(clip)
        return waves, lengths

    (cw, cl), (dw, dl) = make(n_calib, seeds[0]), make(n_data, seeds[1])
    hop = MODELS["whisper80_frontend"].decode.hop
    return ({"waveforms": cw, "waveforms_lens": cl}, {"waveforms": dw, "waveforms_lens": dl},
            {"real_frames": (dl // hop).tolist(), "hop": hop})


# ---- silero VAD: a streaming model with a scalar input

VAD_CHUNK, VAD_CONTEXT, VAD_SECONDS = 512, 64, 4


def vad_stream(model, clip: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """Stream ``clip`` as silero's users do: 512 new samples plus 64 of context per call, the state
    carried over. Returns every call's feed and the speech probabilities."""
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros(VAD_CONTEXT, np.float32)
    feeds, probabilities = [], []
    for k in range(0, len(clip) - VAD_CHUNK + 1, VAD_CHUNK):
        feed = {"input": np.concatenate([context, clip[k:k + VAD_CHUNK]])[None].astype(np.float32),
                "state": state, "sr": np.array(speech.SR, np.int64)}
        feeds.append(feed)
        probability, state = model.run(None, feed)
        probabilities.append(float(probability.item()))
        context = clip[k + VAD_CHUNK - VAD_CONTEXT:k + VAD_CHUNK]
    return feeds, np.array(probabilities)


def _vad_clips(seed: int, count: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    total = VAD_SECONDS * speech.SR
    out = []
    for clip in speech.clips(count, seed, 3.0):
        clip = np.concatenate([np.zeros(int(rng.uniform(0.2, 0.8) * speech.SR), np.float32), clip])[:total]
        out.append(np.pad(clip, (0, total - len(clip))) + rng.normal(0, 0.003, total).astype(np.float32))
    return np.stack(out).astype(np.float32)


def _write_feeds(model, audio: np.ndarray, count: int, rng: np.random.Generator, folder: Path) -> None:
    feeds = [feed for clip in audio for feed in vad_stream(model, clip)[0]]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, index in enumerate(sorted(rng.choice(len(feeds), count, replace=False))):
        np.savez(folder / f"feed_{i:03d}.npz", **feeds[index])


def silero(root: Path, n_calib: int, n_data: int, seeds: tuple[int, int]) -> dict:
    """Per-feed folders for graphopt (sr is a scalar), and the judging clips for the streaming metric."""
    spec = MODELS["silero_vad"]
    model = session(spec.model_path(root), optimized=False)
    for split, count, seed in (("calib", n_calib, seeds[0]), ("data", n_data, seeds[1])):
        audio = _vad_clips(seed, 8)
        # the colleague's harness seeded the pick with the clip generator; a separate one is clearer
        _write_feeds(model, audio, count, np.random.default_rng(seed + 1), spec.data_path(root, split))
        if split == "data":
            np.savez(root / "data" / "silero_vad.clips.npz", audio=audio)
    return {"clips": "silero_vad.clips.npz", "chunk": VAD_CHUNK, "context": VAD_CONTEXT}
