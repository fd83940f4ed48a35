"""Detections as a detector's user sees them: boxes above a score threshold, one per object.

A detector's raw head mixes box coordinates (hundreds of pixels) with scores (0 to 1); one
cosine over both columns sees only the boxes. Here each output holding detections is decoded
the way its users decode it, and a candidate is judged by the share of the reference's
detections it keeps: same class, IoU >= ``MATCH_IOU``, after per-class non-maximum suppression.
A detection the candidate adds that the reference does not have counts as one lost, so a
vanished and an appeared detection are both damage.

Layouts (``layout_of`` reads them off the reference's own values):

- **head**: YOLO-style rows ``[K, 4 + 1 + C]`` (box cx, cy, w, h; objectness; class scores —
  YOLOv5, YOLOX) or ``[K, 4 + C]`` without objectness (YOLOv8, which writes it transposed,
  ``[4 + C, K]``). Scores that are not in [0, 1] are logits: a sigmoid is applied.
- **raw head**: a head written before its decode (YOLOX without ``decode_in_inference``):
  centre offsets in grid cells and log sizes. Without the grid, detections are matched at
  their own anchor, IoU taken on the anchor-relative boxes (exact, as below), before NMS.
- **list**: already decoded ``[K, 6]`` rows (x1, y1, x2, y2, score, class, in any column order
  where the class column holds integers and the score column values in [0, 1]).
- **scores**: a score map ``[K, C]`` (one row per anchor, e.g. PicoDet's per-level outputs)
  whose boxes sit in another output: a detection is an (anchor, class) above the threshold,
  kept when the candidate scores the same anchor and class above it and, where a box output
  ``[K, 4n]`` is paired with the map, its box there overlaps the reference's at IoU >= 0.5.
  ``n == 1``: distances (left, top, right, bottom) from the anchor; ``n > 1``: distribution
  focal loss bins (softmax over ``n`` bins per side, their expectation the distance). Both
  boxes share the anchor's centre and stride, and IoU ignores a common shift and scale, so it
  is exact without knowing them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

# Score a detection needs to be shown, unless the user says otherwise (--det-threshold):
# the confidence YOLO's own predictors default to.
DEFAULT_SCORE_THRESHOLD = 0.25
# A candidate box is the same detection as a reference box from this overlap on.
MATCH_IOU = 0.5
# Per-class non-maximum suppression of raw heads, as YOLO's predictors do it.
NMS_IOU = 0.45
# A head's rows are suppressed among at most this many top-scoring candidates per image.
MAX_CANDIDATES = 3000

Layout = Literal["head", "head-objectness", "raw head", "raw head-objectness", "list", "scores"]


@dataclasses.dataclass(frozen=True)
class Detections:
    boxes: np.ndarray  # [M, 4] x1, y1, x2, y2 (score maps: relative to the anchor, or [M, 0] unpaired)
    scores: np.ndarray  # [M]
    classes: np.ndarray  # [M] int
    anchors: np.ndarray  # [M] int: the row each came from


@dataclasses.dataclass
class DetectionTally:
    """Matches summed over samples."""

    reference: int = 0
    kept: int = 0
    appeared: int = 0
    largest_score_change: float = 0.0
    layout: str = ""

    @property
    def kept_share(self) -> float:
        """Kept reference detections over all reference detections plus appeared ones (1.0 with
        none of either: nothing to lose)."""
        total = self.reference + self.appeared
        return self.kept / total if total else 1.0


def layout_of(rows: np.ndarray, kind: str, transposed: bool) -> Layout:
    """How ``rows`` ([K, F], a sample's output with features last) hold detections; ``kind`` is
    the static one ('detections' or 'detection scores'). A transposed head is YOLOv8's, which
    has no objectness column; an upright one with six or more columns is YOLOv5's or YOLOX's."""
    features = rows.shape[-1]
    if kind == "detection scores" or features < 5:
        return "scores"
    if features in (6, 7) and not transposed and _integer_column(rows) is not None:
        return "list"
    head = "head-objectness" if features >= 6 and not transposed else "head"
    # Undecoded (YOLOX without decode_in_inference): offsets in grid cells and log sizes, which
    # go negative; boxes mean something only against their own anchor's.
    return f"raw {head}" if np.any(rows[:, 2:4] < 0) else head


def _integer_column(rows: np.ndarray) -> int | None:
    """A column holding small non-negative integers that vary or sit on a non-zero class: a
    class id. The last column is asked first, then the others after the box, column 0 last
    (its box corner may be a whole pixel)."""
    if rows.shape[0] == 0:
        return None
    for column in [rows.shape[1] - 1, *range(4, rows.shape[1] - 1), 0]:
        values = rows[:, column]
        if np.all(np.isfinite(values)) and np.all(values >= 0) and np.all(values == np.round(values)) \
                and values.max() < 10000 and (np.ptp(values) > 0 or values.max() > 1):
            return column
    return None


def decode(rows: np.ndarray, layout: Layout, threshold: float, box_rows: np.ndarray | None = None) -> Detections:
    """The detections a user of ``layout`` gets from one sample's ``rows`` at ``threshold``
    (``box_rows``: a score map's paired box output, [K, 4n])."""
    rows = rows.astype(np.float64, copy=False)
    if layout == "scores":
        scores = _probabilities(rows)
        anchors, classes = np.nonzero(scores >= threshold)
        boxes = np.zeros((len(anchors), 0)) if box_rows is None else anchor_boxes(box_rows[anchors])
        return Detections(boxes, scores[anchors, classes], classes, anchors)
    if layout == "list":
        class_column = _integer_column(rows)
        assert class_column is not None
        rest = [c for c in range(rows.shape[1]) if c != class_column]
        box_columns = rest[:4] if class_column >= 4 else rest[1:5]
        score_column = next(c for c in rest if c not in box_columns)
        keep = np.nonzero(rows[:, score_column] >= threshold)[0]
        return Detections(rows[keep][:, box_columns], rows[keep, score_column],
                          rows[keep, class_column].astype(np.int64), keep)
    objectness = layout.endswith("head-objectness")
    class_scores = _probabilities(rows[:, 5:] if objectness else rows[:, 4:])
    classes = np.argmax(class_scores, axis=1)
    scores = class_scores[np.arange(len(rows)), classes]
    if objectness:
        scores = scores * _probabilities(rows[:, 4])
    keep = np.nonzero(scores >= threshold)[0]
    if layout.startswith("raw"):  # the anchor's own cell: centre offsets and exp(log size), no NMS across cells
        centre, size = rows[keep, 0:2], np.exp(np.clip(rows[keep, 2:4], -30, 30))
        return Detections(np.concatenate([centre - size / 2, centre + size / 2], axis=1), scores[keep],
                          classes[keep], keep)
    if len(keep) > MAX_CANDIDATES:
        keep = keep[np.argsort(-scores[keep], kind="stable")[:MAX_CANDIDATES]]
    centre, size = rows[keep, 0:2], rows[keep, 2:4]
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    kept = _nms(boxes, scores[keep], classes[keep])
    keep = keep[kept]
    return Detections(boxes[kept], scores[keep], classes[keep], keep)


def anchor_boxes(rows: np.ndarray) -> np.ndarray:
    """Boxes around their anchor (centre 0, stride 1) from [M, 4] distances or [M, 4n] bins."""
    rows = rows.astype(np.float64, copy=False)
    bins = rows.shape[1] // 4
    if bins > 1:
        logits = rows.reshape(len(rows), 4, bins)
        weights = np.exp(logits - logits.max(axis=2, keepdims=True))
        distances = (weights / weights.sum(axis=2, keepdims=True)) @ np.arange(bins, dtype=np.float64)
    else:
        distances = rows
    return np.concatenate([-distances[:, :2], distances[:, 2:]], axis=1)


def _probabilities(values: np.ndarray) -> np.ndarray:
    """Scores as they are when they lie in [0, 1]; logits through a sigmoid otherwise."""
    finite = values[np.isfinite(values)]
    if finite.size == 0 or (finite.min() >= -1e-6 and finite.max() <= 1 + 1e-6):
        return values
    return 1.0 / (1.0 + np.exp(-np.clip(values, -60, 60)))


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` [M, 4] with every box in ``b`` [N, 4] (x1, y1, x2, y2)."""
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Indices kept by per-class greedy non-maximum suppression at ``NMS_IOU``."""
    kept = []
    for cls in np.unique(classes):
        index = np.nonzero(classes == cls)[0]
        index = index[np.argsort(-scores[index], kind="stable")]
        while index.size:
            best, index = index[0], index[1:]
            kept.append(best)
            if index.size:
                index = index[_iou(boxes[best : best + 1], boxes[index])[0] <= NMS_IOU]
    return np.sort(np.asarray(kept, dtype=np.int64))


def match(reference: Detections, candidate: Detections, tally: DetectionTally, *, by_anchor: bool = False) -> None:
    """Add one sample's matches to ``tally``: each reference detection is kept by at most one
    candidate detection of its class (greedy by IoU, at least ``MATCH_IOU``; ``by_anchor``, for
    score maps: the same anchor, and IoU at least ``MATCH_IOU`` where boxes are paired)."""
    used = np.zeros(len(candidate.scores), dtype=bool)
    kept = 0
    if by_anchor:
        lookup = {(int(a), int(c)): i for i, (a, c) in enumerate(zip(candidate.anchors, candidate.classes))}
        for i, (anchor, cls, score) in enumerate(zip(reference.anchors, reference.classes, reference.scores)):
            index = lookup.get((int(anchor), int(cls)))
            if index is not None and (reference.boxes.shape[1] == 0 or _iou(
                    reference.boxes[i : i + 1], candidate.boxes[index : index + 1])[0, 0] >= MATCH_IOU):
                used[index] = True
                kept += 1
                tally.largest_score_change = max(tally.largest_score_change,
                                                 abs(float(score) - float(candidate.scores[index])))
    elif len(reference.scores) and len(candidate.scores):
        overlap = _iou(reference.boxes, candidate.boxes)
        overlap[reference.classes[:, None] != candidate.classes[None, :]] = 0.0
        for i in np.argsort(-reference.scores, kind="stable"):
            row = np.where(used, 0.0, overlap[i])
            j = int(np.argmax(row))
            if row[j] >= MATCH_IOU:
                used[j] = True
                kept += 1
                tally.largest_score_change = max(tally.largest_score_change,
                                                 abs(float(reference.scores[i]) - float(candidate.scores[j])))
    tally.reference += len(reference.scores)
    tally.kept += kept
    tally.appeared += int(np.count_nonzero(~used))


def is_transposed(shape: tuple[int, ...]) -> bool:
    """[N, F, K] rather than [N, K, F]: fewer features than anchors on the middle axis (YOLOv8)."""
    return len(shape) == 3 and shape[1] < shape[2] and shape[2] > 7


def rows_of(sample: np.ndarray, transposed: bool) -> np.ndarray:
    """One sample's output as rows [K, F]: a transposed head [F, K] turned, extra axes folded."""
    if transposed:
        sample = np.swapaxes(sample, -1, -2)
    return sample.reshape(-1, sample.shape[-1])


def compare_detections(refs: list[np.ndarray], cands: list[np.ndarray], kind: str, threshold: float,
                       boxes: tuple[list[np.ndarray], list[np.ndarray]] | None = None) -> DetectionTally:
    """Tally over all feeds and samples of one output (arrays with a leading sample axis);
    ``boxes``: the reference's and the candidate's paired box output, for a score map."""
    tally = DetectionTally()
    transposed = kind == "detections" and is_transposed(refs[0].shape)
    layout: Layout | None = None
    no_boxes = [None] * len(refs)
    ref_boxes, cand_boxes = boxes if boxes is not None else (no_boxes, no_boxes)
    for r, c, rb, cb in zip(refs, cands, ref_boxes, cand_boxes):
        for ref_rows, cand_rows, ref_box, cand_box in _samples(r, c, rb, cb, transposed):
            if layout is None:
                layout = layout_of(ref_rows, kind, transposed)
                tally.layout = layout + (" with paired boxes" if boxes is not None else "")
            match(decode(ref_rows, layout, threshold, ref_box), decode(cand_rows, layout, threshold, cand_box),
                  tally, by_anchor=layout == "scores" or layout.startswith("raw"))
    return tally


def _samples(r: np.ndarray, c: np.ndarray, rb: np.ndarray | None, cb: np.ndarray | None, transposed: bool):
    """Per sample: (reference rows, candidate rows, their paired box rows or None)."""
    if r.ndim < 3:
        yield rows_of(r, transposed), rows_of(c, transposed), _box_rows(rb), _box_rows(cb)
        return
    for index in range(r.shape[0]):
        yield (rows_of(r[index], transposed), rows_of(c[index], transposed),
               _box_rows(rb[index] if rb is not None else None), _box_rows(cb[index] if cb is not None else None))


def _box_rows(boxes: np.ndarray | None) -> np.ndarray | None:
    return None if boxes is None else boxes.reshape(-1, boxes.shape[-1])


__all__ = ["DEFAULT_SCORE_THRESHOLD", "DetectionTally", "compare_detections", "decode", "layout_of", "match"]
