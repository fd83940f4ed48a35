"""How far a candidate model's outputs are from a reference model's, per output."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphopt.errors import DataError, reason
from graphopt.verify.detections import DEFAULT_SCORE_THRESHOLD, compare_detections
from graphopt.verify.feeds import Feed
from graphopt.verify.kinds import AGREEMENT_KINDS, DETECTION_KINDS

# Relative error is measured against max(|reference|, this fraction of the output's scale),
# so that values near zero do not turn rounding noise into huge ratios.
_REL_FLOOR = 1e-3
# Top-1 agreement forgives a pick the reference scores within this fraction of the position's
# score range of its own best: a near-tie (see _agreement).
TIE_FRACTION = 0.01
# A sample whose reference holds one value on at least this share of its elements has a
# constant region (padding, silence, background): cosine is taken on the rest (signal_cosines).
CONSTANT_SHARE = 0.2
# ...and at least this many elements of it: in a short vector a repeated value is chance.
CONSTANT_MIN_ELEMENTS = 8


@dataclasses.dataclass
class OutputParity:
    name: str
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine_mean: float
    cosine_min: float
    top1: float | None  # agreement of argmax along the last axis; None where it means nothing
    new_nonfinite: int  # NaN/Inf in the candidate where the reference is finite
    shape_mismatch: str | None = None
    kind: str | None = None  # what the output holds (verify.kinds), when the caller knew it
    cosine_std: float = 0.0  # spread of the per-sample cosines: the noise of cosine_mean
    top1_positions: int = 0  # argmax positions (or integers) behind top1
    top1_ties: int = 0  # of those, near-ties of the reference counted as agreeing
    constant_share: float = 0.0  # mean share of the reference's elements in constant regions
    across_samples: bool = False  # one value per sample: the cosine is taken across the samples
    sequences_same: float | None = None  # greedy-decoded sequences identical (class score sequences)
    sequences: int = 0
    blank: int | None = None  # the class collapsed away as CTC's blank: the reference's most frequent pick
    detections_kept: float | None = None  # verify.detections: kept / (reference + appeared)
    detections_reference: int = 0
    detections_appeared: int = 0
    largest_score_change: float | None = None
    detection_layout: str | None = None

    @property
    def metric(self) -> str:
        """What the number behind this output's verdict is, in words."""
        if self.detections_kept is not None:
            return f"detections kept ({self.detection_layout}; {self.detections_reference} in the reference)"
        if self.sequences_same is not None:
            return f"decoded sequences identical (CTC collapse, blank {self.blank}) and top-1 agreement"
        if self.top1 is not None:
            return "top-1 agreement"
        if self.across_samples:
            return "cosine across samples (one value per sample)"
        if self.constant_share > 0:
            return f"cosine on the varying {1 - self.constant_share:.0%} (constant regions excluded, drift there counted)"
        return "cosine"


@dataclasses.dataclass
class ParityReport:
    outputs: list[OutputParity]
    samples: int

    @property
    def max_abs(self) -> float:
        return max(o.max_abs for o in self.outputs)

    @property
    def cosine_min(self) -> float:
        return min(o.cosine_min for o in self.outputs)

    @property
    def cosine_mean(self) -> float:
        return min(o.cosine_mean for o in self.outputs)

    @property
    def top1(self) -> float | None:
        values = [o.top1 for o in self.outputs if o.top1 is not None]
        return min(values) if values else None

    @property
    def new_nonfinite(self) -> int:
        return sum(o.new_nonfinite for o in self.outputs)

    @property
    def shape_mismatches(self) -> list[str]:
        return [f"{o.name}: {o.shape_mismatch}" for o in self.outputs if o.shape_mismatch]

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "max_abs": self.max_abs,
            "cosine_mean": self.cosine_mean,
            "cosine_min": self.cosine_min,
            "top1": self.top1,
            "new_nonfinite": self.new_nonfinite,
            "outputs": [{**dataclasses.asdict(o), "metric": o.metric} for o in self.outputs],
        }


def run_outputs(session: Any, feeds: Sequence[Feed]) -> list[dict[str, np.ndarray]]:
    names = [o.name for o in session.get_outputs()]
    results = []
    for feed in feeds:
        try:
            values = session.run(names, feed)
        except Exception as exc:  # onnxruntime's errors carry the offending input in their text
            raise DataError(f"onnxruntime could not run the model on the given data: {reason(exc)}") from None
        results.append(dict(zip(names, values)))
    return results


def compare_outputs(
    reference: Sequence[dict[str, np.ndarray]], candidate: Sequence[dict[str, np.ndarray]],
    kinds: Mapping[str, str] | None = None, *, score_threshold: float = DEFAULT_SCORE_THRESHOLD,
) -> ParityReport:
    """Per-output distances. ``kinds`` (output name → kind, see ``verify.kinds``) decides
    where top-1 agreement, decoded sequences and detections are measured; without it, top-1
    wherever a last axis could hold classes. ``score_threshold`` is the score a detection needs."""
    if not reference:
        raise DataError("no feeds to compare on")
    ref_names, cand_names = list(reference[0]), list(candidate[0])
    if set(ref_names) != set(cand_names):
        raise DataError(f"the models have different outputs: {ref_names} vs {cand_names}")
    kinds = kinds or {}
    outputs = [_compare_one(name, [r[name] for r in reference], [c[name] for c in candidate], kinds.get(name),
                            score_threshold, _paired_boxes(name, reference, candidate, kinds)) for name in ref_names]
    samples = sum(_rows(r[ref_names[0]]) for r in reference)
    return ParityReport(outputs, samples)


def _paired_boxes(name: str, reference: Sequence[dict[str, np.ndarray]], candidate: Sequence[dict[str, np.ndarray]],
                  kinds: Mapping[str, str]) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """A score map's box output (``verify.kinds.refine_kinds``): same [N, K], kind detection boxes."""
    if kinds.get(name) != "detection scores":
        return None
    shape = reference[0][name].shape[:2]
    for other, kind in kinds.items():
        if kind == "detection boxes" and other in reference[0] and reference[0][other].shape[:2] == shape:
            return [r[other] for r in reference], [c[other] for c in candidate]
    return None


def _rows(array: np.ndarray) -> int:
    return int(array.shape[0]) if array.ndim > 0 else 1


def _per_sample(array: np.ndarray) -> np.ndarray:
    return array.reshape(_rows(array), int(np.prod(array.shape[1:]))).astype(np.float64)


def _compare_one(name: str, refs: list[np.ndarray], cands: list[np.ndarray], kind: str | None,
                 score_threshold: float = DEFAULT_SCORE_THRESHOLD,
                 boxes: tuple[list[np.ndarray], list[np.ndarray]] | None = None) -> OutputParity:
    """One output over all feeds, feed by feed: outputs whose size varies between feeds (images
    of different sizes, sequences of different lengths) compare as well as fixed ones."""
    for r, c in zip(refs, cands):
        if r.shape != c.shape:
            return OutputParity(name, np.inf, np.inf, np.inf, -1.0, -1.0, 0.0, 0, f"shape {list(c.shape)} != {list(r.shape)}",
                                kind=kind)
    scale = max((float(np.max(np.abs(r[np.isfinite(r)]), initial=0.0)) for r in refs if r.size), default=0.0)
    floor = max(_REL_FLOOR * scale, np.finfo(np.float32).tiny)
    max_abs = max_rel = abs_sum = 0.0
    elements = new_nonfinite = 0
    # One value per sample: a cosine of one number is its sign; it is taken across the samples.
    across = all(r.size == _rows(r) for r in refs) and sum(_rows(r) for r in refs) > 1
    cosines, constant, scalars = [], [], []
    for r, c in zip(refs, cands):
        ref, cand = _per_sample(r), _per_sample(c)
        ref_finite = np.isfinite(ref)
        new_nonfinite += int(np.count_nonzero(ref_finite & ~np.isfinite(cand)))
        both = ref_finite & np.isfinite(cand)
        diff = np.where(both, np.abs(ref - cand), 0.0)
        max_abs = max(max_abs, float(diff.max(initial=0.0)))
        abs_sum += float(diff.sum())
        elements += diff.size
        max_rel = max(max_rel, float((diff / np.maximum(np.abs(np.where(ref_finite, ref, 0.0)), floor)).max(initial=0.0)))
        finite_ref, finite_cand = np.where(both, ref, 0.0), np.where(both, cand, 0.0)
        if across:
            scalars.append(np.stack([finite_ref.ravel(), finite_cand.ravel()]))
            continue
        cos, share = signal_cosines(finite_ref, finite_cand)
        cosines.append(cos)
        constant.append(share)
    if across:
        column = np.concatenate(scalars, axis=1)
        cosines = [signal_cosines(column[:1], column[1:])[0]]
    cosine = np.concatenate(cosines) if cosines else np.zeros(0)
    shares = np.concatenate(constant) if constant else np.zeros(0)
    extra: dict[str, Any] = {}
    changed = None
    if kind == "class score sequence":
        extra = _sequences(refs, cands)
        changed = extra.pop("changed")
    elif kind in DETECTION_KINDS:
        tally = compare_detections(refs, cands, kind, score_threshold, boxes)
        extra = {"detections_kept": tally.kept_share, "detections_reference": tally.reference,
                 "detections_appeared": tally.appeared, "largest_score_change": tally.largest_score_change,
                 "detection_layout": tally.layout}
    agreement, positions, ties = _agreement(refs, cands, kind, changed)
    return OutputParity(
        name=name,
        max_abs=max_abs if not new_nonfinite else float("inf"),
        mean_abs=abs_sum / elements if elements else 0.0,
        max_rel=max_rel,
        cosine_mean=float(cosine.mean()) if cosine.size else 1.0,  # nothing to disagree on
        cosine_min=float(cosine.min()) if cosine.size else 1.0,
        top1=agreement,
        new_nonfinite=new_nonfinite,
        kind=kind,
        cosine_std=float(cosine.std()) if cosine.size else 0.0,
        top1_positions=positions,
        top1_ties=ties,
        constant_share=float(shares.mean()) if shares.size else 0.0,
        across_samples=across,
        **extra,
    )


def signal_cosines(ref: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample cosine, and the share of each sample's reference held by one constant value.

    Where that share reaches ``CONSTANT_SHARE`` (a clip padded to 30 s, an empty background),
    a plain cosine is mostly the constant agreeing with itself. Such a sample is judged on
    what varies: both vectors centred on the mean of the reference's varying elements, the
    constant elements contributing nothing to the reference and only their drift (candidate
    minus reference) to the candidate — so the padding can neither inflate the cosine nor
    hide damage done to it."""
    cos = _cosines(ref, cand)
    shares = np.zeros(ref.shape[0])
    for row in range(ref.shape[0]):
        values, counts = np.unique(ref[row], return_counts=True)
        top = int(np.argmax(counts)) if counts.size else 0
        share = counts[top] / ref.shape[1] if counts.size else 0.0
        if share < CONSTANT_SHARE or share >= 1.0 or counts[top] < CONSTANT_MIN_ELEMENTS:
            continue
        flat = ref[row] == values[top]
        centre = ref[row][~flat].mean()
        r = np.where(flat, 0.0, ref[row] - centre)
        c = np.where(flat, cand[row] - ref[row], cand[row] - centre)
        cos[row] = _cosines(r[None], c[None])[0]
        shares[row] = share
    return cos, shares


def _cosines(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    dot = np.einsum("ij,ij->i", ref, cand)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    identical = np.all(ref == cand, axis=1)  # both zero vectors count as a perfect match
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.clip(np.where(identical, 1.0, cos), -1.0, 1.0)


def _agreement(refs: list[np.ndarray], cands: list[np.ndarray], kind: str | None,
               changed: list[np.ndarray] | None = None) -> tuple[float | None, int, int]:
    """(agreement, positions compared, near-ties forgiven): argmax agreement along the last
    axis for class scores, equality for integer outputs; (None, 0, 0) where agreement means
    nothing. Without a kind, any float output with a sample axis and a class axis of at least
    two counts as scores.

    A position where the candidate picks a class the reference itself scores within
    ``TIE_FRACTION`` of that position's score range of its best counts as agreeing: the
    reference cannot call such a near-tie either, and any rounding anywhere flips it — unless
    ``changed`` (per feed, per sample: its decoded sequence changed) says the flip changed
    what the user reads."""
    if kind is None:
        scores = refs[0].ndim >= 2 and refs[0].shape[-1] >= 2 and np.issubdtype(refs[0].dtype, np.floating)
        kind = "class scores" if scores else "other"
    if kind not in AGREEMENT_KINDS:
        return None, 0, 0
    agree = total = ties = 0
    for index, (r, c) in enumerate(zip(refs, cands)):
        while r.ndim > 2 and r.shape[-1] == 1:  # [N, C, 1, 1]: the classes are on axis 1
            r, c = r[..., 0], c[..., 0]
        if kind == "integers" or r.ndim == 0 or r.shape[-1] < 2:
            same = np.asarray(r == c)
        else:
            picked = np.argmax(c, axis=-1)
            same = np.argmax(r, axis=-1) == picked
            top = np.max(r, axis=-1)
            gap = top - np.take_along_axis(r, picked[..., None], axis=-1)[..., 0]
            tie = ~same & (gap <= TIE_FRACTION * (top - np.min(r, axis=-1)))
            if changed is not None:
                tie &= ~changed[index].reshape(changed[index].shape + (1,) * (tie.ndim - changed[index].ndim))
            ties += int(np.count_nonzero(tie))
            same = same | tie
        agree += int(np.count_nonzero(same))
        total += same.size
    return (agree / total if total else None), total, ties


def _sequences(refs: list[np.ndarray], cands: list[np.ndarray]) -> dict[str, Any]:
    """Greedy CTC decoding of [N, T, C] score sequences: the argmax path with repeats collapsed
    and the blank dropped. The blank is the class the reference picks most often (a CTC
    recogniser's output is mostly blank). Returns the share of identical sequences, their
    count, the blank, and per feed which samples changed."""
    refs, cands = [_batch_first(r) for r in refs], [_batch_first(c) for c in cands]
    picks = [np.argmax(r, axis=-1).reshape(-1, r.shape[-2]) for r in refs]
    blank = int(np.bincount(np.concatenate([p.ravel() for p in picks])).argmax())
    same = total = 0
    changed = []
    for pick, c in zip(picks, cands):
        cand_pick = np.argmax(c, axis=-1).reshape(pick.shape)
        differs = np.array([_collapse(a, blank) != _collapse(b, blank) for a, b in zip(pick, cand_pick)])
        changed.append(differs.reshape(c.shape[:-2]))
        same += int(np.count_nonzero(~differs))
        total += differs.size
    return {"sequences_same": same / total if total else 1.0, "sequences": total, "blank": blank, "changed": changed}


def _batch_first(scores: np.ndarray) -> np.ndarray:
    """[T, 1, C] (time-major, one sample, as CRNN exports write it) as [1, T, C]."""
    if scores.ndim == 3 and scores.shape[1] == 1 and scores.shape[0] > 1:
        return np.swapaxes(scores, 0, 1)
    return scores


def _collapse(path: np.ndarray, blank: int) -> tuple[int, ...]:
    keep = np.ones(path.shape, dtype=bool)
    keep[1:] = path[1:] != path[:-1]
    return tuple(int(v) for v in path[keep & (path != blank)])


def rewrite_mismatch(before: bytes, after: bytes, feeds: Sequence[Feed], *, tolerance: float,
                     threads: int | None = None) -> str | None:
    """Why a rewritten model is not the original (max abs above ``tolerance``, a changed shape,
    a new NaN, a model that does not run), or None. Both run with onnxruntime's graph
    optimizations off, so the runtime's own fusions cannot hide a broken rewrite."""
    from graphopt.errors import GraphoptError
    from graphopt.verify.runtime import make_session

    try:
        reference = run_outputs(make_session(before, optimize=False, threads=threads), feeds)
        candidate = run_outputs(make_session(after, optimize=False, threads=threads), feeds)
        parity = compare_outputs(reference, candidate)
    except GraphoptError as exc:
        return str(exc)
    if parity.shape_mismatches or parity.new_nonfinite or not parity.max_abs <= tolerance:
        return f"max abs {parity.max_abs:.3g}"
    return None
