"""The user-level judge: what a user of each model would notice if the written model replaced it.

The reference runs with graph optimizations off, the candidate as deployed; both see the judging
data one sample at a time. Nothing here imports graphopt's verification: the metrics are the
packages' own readings of the outputs (``decode.py``), so a blind spot of graphopt's judge shows
up as a disagreement instead of being shared.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.real_models import audio, decode, fetch
from benchmarks.real_models.registry import CtcDecode, ModelSpec, PicodetDecode, Threshold
from benchmarks.real_models.runtime import session

# The bar a written model must meet at user level. The first four are the benchmark's brief; the
# last three (decisions, plain signals) are set by analogy: a decision is a top-1, a signal is cosine.
ACCEPTANCE = {"classifier": 0.99, "ctc": 0.98, "detector": 0.97, "padded_signal": 0.99,
              "score": 0.99, "vad": 0.99, "signal": 0.99}

Outputs = list[np.ndarray]


@dataclasses.dataclass(frozen=True)
class UserResult:
    metric: str
    value: float
    summary: str  # one table cell
    details: dict[str, Any]

    def passes(self, kind: str) -> bool:
        return bool(self.value >= ACCEPTANCE[kind])


def _samples(path: Path) -> list[dict[str, np.ndarray]]:
    """Batch-1 feeds: one per row of an .npz, or one per file of a folder of .npz."""
    if path.is_dir():
        feeds = []
        for file in sorted(path.glob("*.npz")):
            with np.load(file) as z:
                feeds.append({k: z[k] for k in z.files})
        return feeds
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    return [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(len(next(iter(arrays.values()))))]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def classifier(spec: ModelSpec, ref: list[Outputs], cand: list[Outputs], meta: dict) -> UserResult:
    r = np.concatenate([o[0].reshape(len(o[0]), -1) for o in ref])
    c = np.concatenate([o[0].reshape(len(o[0]), -1) for o in cand])
    same = r.argmax(1) == c.argmax(1)
    moved = np.abs(r[np.arange(len(r)), r.argmax(1)] - c[np.arange(len(r)), r.argmax(1)])
    return UserResult("top-1", float(same.mean()),
                      f"top-1 {same.mean():.3f} ({len(r)}), max Δp {moved.max():.3f}",
                      {"samples": len(r), "disagreements": int((~same).sum()), "max_top1_prob_change": float(moved.max())})


def _text(indices: list[int], charset: list[str]) -> str:
    return "".join(charset[k] if k < len(charset) else f"<{k}>" for k in indices)


def ctc(spec: ModelSpec, ref: list[Outputs], cand: list[Outputs], meta: dict, charset: list[str]) -> UserResult:
    assert isinstance(spec.decode, CtcDecode)
    same, changed = 0, []
    for i, (r, c) in enumerate(zip(ref, cand)):
        rs, cs = decode.ctc_greedy(r[0], spec.decode), decode.ctc_greedy(c[0], spec.decode)
        same += rs == cs
        if rs != cs and len(changed) < 5:
            changed.append({"sample": i, "reference": _text(rs, charset), "candidate": _text(cs, charset)})
    share = same / len(ref)
    return UserResult("strings identical", share, f"strings identical {share:.3f} ({len(ref)})",
                      {"samples": len(ref), "changed": changed})


def _match(rb, rs, rc, cb, cc) -> int:
    """Reference detections kept: a candidate box of the same class with IoU >= 0.5, each used once."""
    used, kept = np.zeros(len(cb), bool), 0
    for i in np.argsort(-rs):
        pool = np.where((cc == rc[i]) & ~used)[0]
        if len(pool):
            overlaps = decode.iou(rb[i], cb[pool])
            j = int(overlaps.argmax())
            if overlaps[j] >= 0.5:
                used[pool[j]] = True
                kept += 1
    return kept


def detector(spec: ModelSpec, ref: list[Outputs], cand: list[Outputs], meta: dict) -> UserResult:
    read = decode.picodet if isinstance(spec.decode, PicodetDecode) else decode.yolox
    total = kept = cand_total = 0
    for r, c in zip(ref, cand):
        (rb, rs, rc), (cb, _, cc) = read(r, spec.decode), read(c, spec.decode)
        kept += _match(rb, rs, rc, cb, cc)
        total, cand_total = total + len(rb), cand_total + len(cb)
    share = kept / total if total else float("nan")
    threshold = spec.decode.score_threshold
    return UserResult("detections kept", share,
                      f"kept {kept}/{total} = {share:.3f} (candidate {cand_total}, threshold {threshold})",
                      {"reference_detections": total, "kept": kept, "candidate_detections": cand_total,
                       "score_threshold": threshold})


def score(spec: ModelSpec, ref: list[Outputs], cand: list[Outputs], meta: dict) -> UserResult:
    assert isinstance(spec.decode, Threshold)
    r, c = np.array([o[0].item() for o in ref]), np.array([o[0].item() for o in cand])
    t = spec.decode.threshold
    agree = ((r >= t) == (c >= t)).mean()
    return UserResult(f"decisions @{t}", float(agree),
                      f"decisions same {agree:.3f} ({int((r >= t).sum())} of {len(r)} fire), "
                      f"max Δscore {np.abs(r - c).max():.3f}",
                      {"samples": len(r), "reference_positive": int((r >= t).sum()),
                       "max_abs_score_change": float(np.abs(r - c).max())})


def signal(spec: ModelSpec, ref: list[Outputs], cand: list[Outputs], meta: dict) -> UserResult:
    values = [cosine(r[0], c[0]) for r, c in zip(ref, cand)]
    return UserResult("cosine min", min(values), f"cosine min {min(values):.6f} mean {np.mean(values):.6f}",
                      {"samples": len(values), "cosine_mean": float(np.mean(values))})


def padded_signal(spec: ModelSpec, ref: list[Outputs], cand: list[Outputs], meta: dict) -> UserResult:
    """Only the frames that carry audio: a front end padded to 30 s is mostly a constant, and a
    cosine over all frames would be dominated by it."""
    axis = spec.decode.time_axis
    real, padding = [], []
    for r, c, frames in zip(ref, cand, meta["real_frames"]):
        head = np.arange(frames)
        real.append(cosine(np.take(r[0], head, axis=axis), np.take(c[0], head, axis=axis)))
        tail = np.arange(frames, r[0].shape[axis])
        padding.append(cosine(np.take(r[0], tail, axis=axis), np.take(c[0], tail, axis=axis)))
    return UserResult("cosine on real frames (min)", min(real),
                      f"real frames {min(meta['real_frames'])}-{max(meta['real_frames'])} of "
                      f"{ref[0][0].shape[axis]}: cosine min {min(real):.6f} mean {np.mean(real):.6f} "
                      f"(padding frames min {min(padding):.6f})",
                      {"samples": len(real), "cosine_mean_real": float(np.mean(real)),
                       "cosine_min_padding": float(min(padding))})


def vad(spec: ModelSpec, reference: Path, candidate: Path, root: Path) -> UserResult:
    """Whole clips streamed through each model with its own state, as silero's users run it."""
    clips = np.load(root / "data" / "silero_vad.clips.npz")["audio"]
    ref_model, cand_model = session(reference, optimized=False), session(candidate, optimized=True)
    r = np.concatenate([audio.vad_stream(ref_model, clip)[1] for clip in clips])
    c = np.concatenate([audio.vad_stream(cand_model, clip)[1] for clip in clips])
    t = spec.decode.threshold
    agree = ((r >= t) == (c >= t)).mean()
    return UserResult(f"chunk decisions @{t}", float(agree),
                      f"chunk decisions same {agree:.3f} ({len(r)} chunks), max Δp {np.abs(r - c).max():.3f}",
                      {"chunks": len(r), "reference_speech_chunks": int((r >= t).sum()),
                       "max_abs_prob_change": float(np.abs(r - c).max())})


def evaluate(spec: ModelSpec, reference: Path, candidate: Path, root: Path) -> UserResult:
    if spec.kind == "vad":
        return vad(spec, reference, candidate, root)
    meta = json.loads(spec.meta_path(root).read_text())
    feeds = _samples(spec.data_path(root, "data"))
    ref_model, cand_model = session(reference, optimized=False), session(candidate, optimized=True)
    ref = [ref_model.run(None, feed) for feed in feeds]
    cand = [cand_model.run(None, feed) for feed in feeds]
    if spec.kind == "ctc":
        return ctc(spec, ref, cand, meta, fetch.load_charset(root, spec.decode))
    judge = {"classifier": classifier, "detector": detector, "score": score, "signal": signal,
             "padded_signal": padded_signal}[spec.kind]
    return judge(spec, ref, cand, meta)
