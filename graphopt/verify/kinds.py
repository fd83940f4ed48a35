"""What each model output holds, read from its type, shape, name and the op that makes it.

The kind decides how a compressed model is judged (``verify.judge``): a classifier's or a
recogniser's user cares whether the argmax at each position stays the same (agreement), an
embedding's or a dense map's whether the vector keeps its direction (cosine).

| kind | recognised by | judged by |
|---|---|---|
| class scores | ``[N, C]`` out of Softmax/LogSoftmax/Sigmoid, or of a Gemm/MatMul/Add with C <= 4096; names like *logits*, *scores*, *prob* | agreement |
| class score sequence | ``[N, T, C]`` out of Softmax/LogSoftmax over the last axis, or named *logits* | agreement, and the greedy-decoded sequence (CTC collapse) identical |
| detections | ``[N, K, 4(+1)+C]`` or ``[N, 4+C, K]`` out of a Concat (YOLO heads), ``[N, K, 6]`` decoded lists | detections kept (``verify.detections``) |
| detection scores | ``[N, K, C]`` out of a Sigmoid (per-anchor score maps; their boxes are another output); rank >= 4 out of a Sigmoid (probability maps: text masks) | detections kept at the same anchor, with its box where one is paired; for a map, the mask's IoU |
| detection boxes | (from data, ``refine_kinds``) ``[N, K, 4n]`` beside a score map of the same ``[N, K]``: boxes or DFL bins | through the detections of its score map |
| integers | integer or boolean outputs (labels, indices, masks) | agreement (equality) |
| boxes | names like *box*, *bbox*; ``[N, K, 4]`` | cosine |
| embeddings | names like *embed*, *hidden*, *pool*, *feature*; other ``[N, D]`` and ``[N, T, D]`` | cosine |
| dense map | rank 4 and above (``[N, C, H, W]``: masks, heat maps, images) | cosine |
| other | scalars and vectors of one value per sample | cosine |

Cosine is taken on what varies: where a sample's reference holds one constant value over a
large share of its elements (padding, silence, empty background), those elements are left
out of the cosine and any drift of the candidate there counts as error (``verify.parity``).

Shape-preserving ops (Reshape, Transpose, Squeeze, Flatten, Identity, Cast…) between the
deciding op and the output are looked through.
"""

from __future__ import annotations

import re
from typing import Literal

import onnx_ir as ir

OutputKind = Literal["class scores", "class score sequence", "integers", "detections", "detection scores",
                     "detection boxes", "boxes", "embeddings", "dense map", "other"]

AGREEMENT_KINDS: frozenset[str] = frozenset({"class scores", "class score sequence", "integers"})
DETECTION_KINDS: frozenset[str] = frozenset({"detections", "detection scores"})
# Judged through another output's detections, never by a cosine of their own.
PAIRED_KINDS: frozenset[str] = frozenset({"detection boxes"})

# Wider than this, a linear layer's output is more likely a feature vector than classes.
MAX_CLASSES_FROM_LINEAR = 4096

_PASS_THROUGH = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast", "Dropout"}
_SCORE_OPS = {"Softmax", "LogSoftmax", "Sigmoid"}
_LINEAR_OPS = {"Gemm", "MatMul", "Add", "FusedMatMul"}
# A YOLO head has at least this many anchors per feature column (YOLOX at 320 px: 2100 x 85).
_MIN_ANCHORS_PER_FEATURE = 8
# Classes a detection head may score (4 box + 1 objectness + C).
_MAX_HEAD_FEATURES = 4 + 1 + 1000
# With a dynamic anchor count, wider rows are more likely a transformer's hidden states.
_MAX_DYNAMIC_HEAD_FEATURES = 4 + 1 + 256
_LIST_OPS = {"Concat", "Gather", "GatherND", "GatherElements", "TopK", "NonMaxSuppression", "Slice", "Unsqueeze"}
_SCORE_NAME = re.compile(r"logit|score|prob|class|cls|label|pred|softmax", re.IGNORECASE)
_BOX_NAME = re.compile(r"box|bbox|anchor", re.IGNORECASE)
_EMBEDDING_NAME = re.compile(r"embed|hidden|pool|feature|feat|sentence|vector|encod", re.IGNORECASE)


def output_kinds(model: ir.Model) -> dict[str, OutputKind]:
    """Every graph output's kind, by name."""
    return {value.name or "": classify(value) for value in model.graph.outputs}


def refine_kinds(kinds: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Kinds corrected by the shapes a model really produced (``shapes``: output name → shape of
    one reference output). Class scores that come with a time axis (a declared shape an exporter
    got wrong) are a class score sequence; an output of ``[N, K, 4n]`` beside a score map of the
    same ``[N, K]`` holds that map's boxes (``verify.detections.box_partner``)."""
    refined = dict(kinds)
    for name, shape in shapes.items():
        squeezed = _squeeze_trailing(shape)
        if refined.get(name) == "class scores" and len(squeezed) == 3 and squeezed[-1] >= 2:
            refined[name] = "class score sequence"
    for name, shape in shapes.items():
        if refined.get(name) in AGREEMENT_KINDS | DETECTION_KINDS or len(shape) != 3 or shape[-1] % 4:
            continue
        if any(refined.get(other) == "detection scores" and tuple(shapes[other][:2]) == tuple(shape[:2])
               for other in shapes if other != name):
            refined[name] = "detection boxes"
    return refined


def _squeeze_trailing(shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def classify(value: ir.Value) -> OutputKind:
    dtype = value.dtype
    if dtype is not None and not dtype.is_floating_point():
        return "integers"
    dims = tuple(value.shape.dims) if value.shape is not None else None
    if dims is not None and len(dims) > 2 and all(d == 1 for d in dims[2:]):
        dims = dims[:2]  # [N, C, 1, 1]: a classifier that kept its pooled spatial axes
    rank = len(dims) if dims is not None else None
    last = dims[-1] if dims else None
    name = value.name or ""
    source = _deciding_op(value)
    if rank is not None and rank >= 4:
        # A probability map (text or segmentation masks): its user thresholds it; judged like a score
        # map, pixel by pixel — kept pixels over the reference's mask plus the pixels that appeared.
        return "detection scores" if source == "Sigmoid" else "dense map"
    if _BOX_NAME.search(name):
        return "boxes"
    if rank == 3:
        if source not in ("Softmax", "LogSoftmax") and _detections(dims, source):
            return "detections"
        if source == "Sigmoid":
            return "detection scores"
        if source in ("Softmax", "LogSoftmax") or _SCORE_NAME.search(name):
            return "class score sequence"
        if last == 4:
            return "boxes"
        return "embeddings"
    if rank == 2:
        if source in _SCORE_OPS or (_SCORE_NAME.search(name) and not _EMBEDDING_NAME.search(name)):
            return "class scores"
        if _EMBEDDING_NAME.search(name):
            return "embeddings"
        linear = source in _LINEAR_OPS
        few = not isinstance(last, int) or 2 <= last <= MAX_CLASSES_FROM_LINEAR
        return "class scores" if linear and few and last != 1 else "embeddings"
    if rank is None:
        return "class scores" if source in _SCORE_OPS or _SCORE_NAME.search(name) else "other"
    return "other"


def _detections(dims: tuple, source: str | None) -> bool:
    """A YOLO head (many anchors by 4 (+1) + C columns, either way round, made by a Concat of its
    box and score parts) or a decoded list of [x1, y1, x2, y2, score, class] rows."""
    middle, last = dims[1], dims[2]
    if isinstance(last, int) and last in (6, 7) and source in _LIST_OPS:
        return True
    if source != "Concat":
        return False
    for features, anchors in ((last, middle), (middle, last)):
        if isinstance(features, int) and 5 <= features <= _MAX_HEAD_FEATURES:
            if anchors >= _MIN_ANCHORS_PER_FEATURE * features if isinstance(anchors, int) \
                    else features <= _MAX_DYNAMIC_HEAD_FEATURES:
                return True
    return False


def _deciding_op(value: ir.Value) -> str | None:
    """The op that made ``value``, looking through shape-preserving ops."""
    seen = 0
    producer = value.producer()
    while producer is not None and producer.op_type in _PASS_THROUGH and producer.inputs and seen < 16:
        source = producer.inputs[0]
        producer = source.producer() if source is not None else None
        seen += 1
    return producer.op_type if producer is not None else None


# How each kind is judged, in the words `inspect` shows (the numbers: verify.parity, verify.judge).
JUDGED_BY: dict[str, str] = {
    "class scores": "top-1 agreement",
    "class score sequence": "decoded sequences identical (greedy CTC) and top-1 agreement",
    "integers": "equality",
    "detections": "detections kept (score >= --det-threshold, same class, IoU >= 0.5)",
    "detection scores": "detections kept at the same anchor or pixel (score >= --det-threshold), IoU >= 0.5 with "
                        "the paired box output when there is one",
    "detection boxes": "the detections of the score map beside it",
    "boxes": "cosine",
    "embeddings": "cosine (on what varies where the reference has a constant region)",
    "dense map": "cosine (on what varies where the reference has a constant region)",
    "other": "cosine",
}
