"""Outputs judged where their users look: detections, padded signals, decoded sequences, and the
runtime's own noise. Each blind-spot test first shows that the old measure (one cosine over the
output, argmax agreement with near-ties forgiven, a bare max-abs limit) would pass the damage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from graphopt.recipe import load_recipe
from graphopt.verify.detections import DetectionTally, decode, layout_of, match
from graphopt.verify.judge import Budget
from graphopt.verify.kinds import output_kinds
from graphopt.verify.parity import compare_outputs

from ..conftest import make_model, tensor

INT8 = load_recipe("int8")


def _kinds(proto) -> dict[str, str]:
    return output_kinds(ir.serde.deserialize_model(proto))


def _head_model(anchors: int, features: int, *, transposed: bool) -> dict[str, str]:
    """A YOLO head as exporters write it: box, objectness and class parts joined by a Concat."""
    axis = 1 if transposed else 2
    shape = (lambda f: [1, f, anchors]) if transposed else (lambda f: [1, anchors, f])
    parts = [("box", 4), ("scores", features - 4)]
    proto = make_model([helper.make_node("Concat", [n for n, _ in parts], ["output"], axis=axis)],
                       [tensor(n, shape(f)) for n, f in parts], [tensor("output", shape(features))])
    return _kinds(proto)


def _yolox_head(rng: np.random.Generator, objects: int, anchors: int = 2000, classes: int = 3) -> np.ndarray:
    """[1, anchors, 4 + 1 + classes]: ``objects`` well separated boxes of hundreds of pixels
    with objectness 0.9 and one confident class; every other anchor background."""
    head = np.zeros((1, anchors, 5 + classes), np.float32)
    head[0, :, 0:2] = rng.uniform(0, 640, (anchors, 2))
    head[0, :, 2:4] = rng.uniform(20, 60, (anchors, 2))
    head[0, :, 4] = rng.uniform(0.0, 0.05, anchors)
    head[0, :, 5:] = rng.uniform(0.0, 0.3, (anchors, classes))
    for i in range(objects):  # a grid of boxes that do not overlap
        row = i * 37
        head[0, row, 0:4] = [40 + 80 * (i % 8), 40 + 80 * (i // 8), 50, 50]
        head[0, row, 4] = 0.9
        head[0, row, 5 + i % classes] = 0.95
    return head


def test_yolo_heads_either_way_round_are_detections_not_embeddings() -> None:
    assert _head_model(2100, 85, transposed=False) == {"output": "detections"}
    assert _head_model(8400, 84, transposed=True) == {"output": "detections"}
    # A transformer's hidden states from a Concat are not a head: too few rows per column.
    assert _head_model(197, 768, transposed=False) == {"output": "embeddings"}


def test_a_vanished_and_an_appeared_detection_fail_although_the_head_cosine_passes(rng) -> None:
    ref = _yolox_head(rng, objects=50)
    cand = ref.copy()
    cand[0, 37 * 3, 4] = 0.1  # one object's objectness falls below the threshold: it vanishes
    cand[0, 1, 4], cand[0, 1, 5] = 0.9, 0.95  # a background anchor becomes a detection
    kinds = {"output": "detections"}

    old = Budget.resolve(None, {"output": "embeddings"}, INT8)  # how the head used to be judged
    assert old.error(compare_outputs([{"output": ref}], [{"output": cand}]))[0] <= 1.0

    budget = Budget.resolve(None, kinds, INT8)
    parity = compare_outputs([{"output": ref}], [{"output": cand}], kinds)
    (out,) = parity.outputs
    assert out.detection_layout == "head-objectness"
    assert out.detections_reference == 50 and out.detections_appeared == 1
    assert out.detections_kept == pytest.approx(49 / 51)
    error, bound = budget.error(parity)
    assert bound.metric == "detections" and error > 1.0


def test_a_score_that_moves_but_stays_above_the_threshold_is_kept_and_reported(rng) -> None:
    ref = _yolox_head(rng, objects=20)
    cand = ref.copy()
    cand[0, 0, 4] = 0.35  # 0.9 * 0.95 -> 0.35 * 0.95: still shown at 0.25
    out = compare_outputs([{"output": ref}], [{"output": cand}], {"output": "detections"}).outputs[0]
    assert out.detections_kept == 1.0
    assert out.largest_score_change == pytest.approx((0.9 - 0.35) * 0.95, rel=1e-5)


def test_a_transposed_head_without_objectness_and_logit_scores(rng) -> None:
    anchors = 400
    head = np.zeros((1, 6, anchors), np.float32)  # YOLOv8: [4 + 2 classes, anchors], class logits
    head[0, 0:2] = rng.uniform(0, 320, (2, anchors))
    head[0, 2:4] = 30
    head[0, 4:] = -6.0
    head[0, 0:2, 10], head[0, 4, 10] = (100, 100), 4.0
    head[0, 0:2, 20], head[0, 5, 20] = (200, 200), 4.0
    cand = head.copy()
    cand[0, 5, 20] = -4.0  # class 1's detection vanishes
    out = compare_outputs([{"o": head}], [{"o": cand}], {"o": "detections"}).outputs[0]
    assert out.detection_layout == "head" and out.detections_reference == 2 and out.detections_kept == 0.5


def test_score_maps_and_decoded_lists() -> None:
    proto = make_model([helper.make_node("Sigmoid", ["x"], ["scores"])], [tensor("x", [1, 100, 5])],
                       [tensor("scores", [1, 100, 5])])
    assert _kinds(proto) == {"scores": "detection scores"}
    scores = np.full((100, 5), 0.01)
    scores[3, 2] = scores[40, 0] = 0.8
    assert layout_of(scores, "detection scores", False) == "scores"
    moved = scores.copy()
    moved[3, 2], moved[3, 1] = 0.1, 0.8  # anchor 3 changes its class
    tally = DetectionTally()
    match(decode(scores, "scores", 0.25), decode(moved, "scores", 0.25), tally)
    assert (tally.reference, tally.kept, tally.appeared) == (2, 1, 1)

    listed = np.array([[10, 10, 50, 50, 0.9, 2], [100, 100, 150, 160, 0.8, 0], [0, 0, 5, 5, 0.1, 1]])
    assert layout_of(listed, "detections", False) == "list"
    shifted = listed.copy()
    shifted[1, :4] += 30  # IoU with the reference box below 0.5
    tally = DetectionTally()
    match(decode(listed, "list", 0.25), decode(shifted, "list", 0.25), tally)
    assert (tally.reference, tally.kept, tally.appeared) == (2, 1, 1)


def test_padding_cannot_inflate_the_cosine(rng) -> None:
    # A log-mel front end pads a 2 s clip to 30 s: 93% of the frames hold one constant.
    frames, real = 3000, 200
    ref = np.full((1, 80, frames), -1.5, np.float32)
    ref[0, :, :real] = rng.normal(0.0, 0.6, (80, real))
    cand = ref.copy()
    cand[0, :, :real] += rng.normal(0.0, 0.25, (80, real))  # visible damage on the real frames
    on_real = np.corrcoef(ref[0, :, :real].ravel(), cand[0, :, :real].ravel())[0, 1]
    assert on_real < 0.95
    whole = float(np.dot(ref.ravel(), cand.ravel()) / np.linalg.norm(ref) / np.linalg.norm(cand))
    assert whole > 0.995  # what the old judge saw: a pass

    (out,) = compare_outputs([{"mel": ref}], [{"mel": cand}], {"mel": "dense map"}).outputs
    assert out.constant_share == pytest.approx(1 - real / frames)
    assert out.cosine_mean == pytest.approx(on_real, abs=0.01)
    assert "constant regions excluded" in out.metric
    assert Budget.resolve(None, {"mel": "dense map"}, INT8).error(compare_outputs(
        [{"mel": ref}], [{"mel": cand}], {"mel": "dense map"}))[0] > 1.0


def test_drift_of_the_padding_counts_as_damage(rng) -> None:
    ref = np.full((1, 4000), 0.0, np.float32)
    ref[0, :400] = rng.normal(0.0, 1.0, 400)
    cand = ref.copy()
    cand[0, 400:] = 0.3  # the padding moves, the real part is untouched
    (out,) = compare_outputs([{"y": ref}], [{"y": cand}], {"y": "embeddings"}).outputs
    assert out.cosine_mean < 0.8  # a plain cosine: 0.9997


def test_outputs_without_a_constant_region_keep_the_plain_cosine(rng) -> None:
    ref = rng.normal(size=(4, 64)).astype(np.float32)
    cand = ref + rng.normal(scale=0.05, size=ref.shape).astype(np.float32)
    (out,) = compare_outputs([{"y": ref}], [{"y": cand}], {"y": "embeddings"}).outputs
    plain = np.mean(np.sum(ref * cand, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(cand, axis=1))
    assert out.constant_share == 0.0 and out.cosine_mean == pytest.approx(plain, rel=1e-6)
    assert out.metric == "cosine"


def _conv_bn(path: Path) -> Path:
    """Conv + BatchNormalization with outputs in the tens of thousands: onnxruntime's Conv-BN
    fusion alone moves them by ~1e-2."""
    rng = np.random.default_rng(0)
    channels = 32
    weights = {"W": rng.normal(size=(channels, channels, 3, 3)) * 30, "g": rng.normal(size=channels),
               "b": rng.normal(size=channels), "m": rng.normal(size=channels),
               "v": rng.uniform(0.1, 2, size=channels)}
    nodes = [helper.make_node("Conv", ["X", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["Y"])]
    graph = helper.make_graph(nodes, "conv_bn", [tensor("X", [1, channels, 16, 16])],
                              [tensor("Y", [1, channels, 16, 16])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())
    np.savez(path.with_suffix(".npz"), X=(rng.normal(size=(3, channels, 16, 16)) * 10).astype(np.float32))
    return path


def test_the_runtime_floor_is_not_blamed_on_a_lossless_candidate(tmp_path: Path) -> None:
    from graphopt.api import check

    base = _conv_bn(tmp_path / "base.onnx")
    candidate = tmp_path / "candidate.onnx"
    candidate.write_bytes(base.read_bytes())  # what a cleanup that changed nothing numeric writes
    result = check(base, candidate, data=base.with_suffix(".npz"), max_abs=1e-4, latency=False)

    floor = result["runtime_floor"]["Y"]
    assert floor > 1e-3  # without the floor, max_abs 1e-4 would refuse the original itself
    (max_abs,) = [c for c in result["checks"] if c["name"] == "max_abs"]
    assert max_abs["passed"] and max_abs["measured"] > 1e-4
    assert "optimization levels" in max_abs["message"] and "runtime's floor" in max_abs["message"]


def test_a_candidate_beyond_the_runtime_floor_still_fails(tmp_path: Path) -> None:
    import onnx

    from graphopt.api import check
    from graphopt.errors import GateFailed

    base = _conv_bn(tmp_path / "base.onnx")
    proto = onnx.load(base)
    bias = next(t for t in proto.graph.initializer if t.name == "b")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(1.0), "b"))
    candidate = tmp_path / "candidate.onnx"
    onnx.save(proto, candidate)
    with pytest.raises(GateFailed, match="max abs difference"):
        check(base, candidate, data=base.with_suffix(".npz"), max_abs=1e-4, latency=False)


def test_recipes_name_a_detection_budget() -> None:
    budget = Budget.resolve(None, {"output": "detections", "prob": "class scores", "seq": "class score sequence"},
                            INT8)
    metrics = {b.metric: b for b in budget.bounds}
    assert metrics["detections"].outputs == ("output",) and metrics["detections"].limit == 0.97
    assert metrics["sequences"].outputs == ("seq",) and metrics["sequences"].limit == INT8.min_top1
    assert "cosine" not in metrics  # nothing here is judged by a cosine
    # A stated cosine never covers a detector head: its detections are judged at the default share.
    stated = Budget.resolve(_Stated(min_cosine=0.99), {"output": "detections", "emb": "embeddings"})
    assert {b.metric: b.outputs for b in stated.bounds} == {"cosine": ("emb",), "detections": ("output",)}


class _Stated:
    def __init__(self, **values: float) -> None:
        self.__dict__.update(values)


def test_score_threshold_comes_from_the_user(rng) -> None:
    ref = _yolox_head(rng, objects=10)
    budget = Budget.resolve(_Stated(min_detections=0.9, det_threshold=0.5), {"output": "detections"})
    assert budget.score_threshold == 0.5
    parity = compare_outputs([{"output": ref}], [{"output": ref}], budget.kinds, score_threshold=0.9)
    assert parity.outputs[0].detections_reference == 0  # 0.9 * 0.95 < 0.9


def test_kinds_follow_the_shapes_a_model_really_produces() -> None:
    from graphopt.verify.kinds import refine_kinds

    kinds = {"387": "class scores", "scores": "detection scores", "bins": "embeddings", "other": "embeddings"}
    shapes = {"387": (40, 1, 8210), "scores": (1, 7600, 10), "bins": (1, 7600, 32), "other": (1, 1900, 32)}
    assert refine_kinds(kinds, shapes) == {"387": "class score sequence", "scores": "detection scores",
                                           "bins": "detection boxes", "other": "embeddings"}
    budget = Budget.resolve(None, refine_kinds(kinds, shapes), INT8)
    assert {b.metric: b.outputs for b in budget.bounds}["cosine"] == ("other",)  # never the paired bins


def test_a_time_major_recogniser_is_decoded_along_its_time_axis() -> None:
    # [T, 1, C] as CRNN exports write it: the candidate turns "1 2" into "1 1" at time step 2.
    ref = np.zeros((5, 1, 3), np.float32)
    ref[:, 0, 0] = 1.0
    ref[1, 0] = [0, 1, 0]
    ref[3, 0] = [0, 0, 1]
    cand = ref.copy()
    cand[3, 0] = [0, 1, 0]
    out = compare_outputs([{"y": ref}], [{"y": cand}], {"y": "class score sequence"}).outputs[0]
    assert out.sequences == 1 and out.sequences_same == 0.0 and out.top1 == 0.8


def test_a_score_map_keeps_a_detection_only_where_its_box_stays(rng) -> None:
    scores = np.full((1, 50, 3), 0.01, np.float32)
    scores[0, 7, 1] = scores[0, 20, 2] = 0.9
    bins = rng.normal(size=(1, 50, 32)).astype(np.float32)  # 4 sides x 8 DFL bins
    bins[0, 7] = bins[0, 20] = np.tile(np.eye(8)[3] * 8, 4)  # 3 strides on every side
    moved = bins.copy()
    moved[0, 20] = np.tile(np.eye(8)[7] * 8, 4)  # 7 strides: IoU (6/14)^2 < 0.5
    kinds = {"scores": "detection scores", "bins": "detection boxes"}
    parity = compare_outputs([{"scores": scores, "bins": bins}], [{"scores": scores, "bins": moved}], kinds)
    out = {o.name: o for o in parity.outputs}["scores"]
    assert out.detection_layout == "scores with paired boxes"
    assert (out.detections_reference, out.detections_kept) == (2, pytest.approx(1 / 3))


def test_an_undecoded_head_is_matched_at_its_own_anchor(rng) -> None:
    # YOLOX without its decode: centre offsets in grid cells, log sizes (negative below one cell),
    # objectness and class logits.
    head = np.zeros((1, 300, 6), np.float32)
    head[0, :, 0:2] = rng.uniform(0, 1, (300, 2))
    head[0, :, 2:4] = rng.uniform(-1, 2, (300, 2))
    head[0, :, 4:] = -8.0
    head[0, [5, 50, 120], 4:] = 6.0  # three confident anchors
    cand = head.copy()
    cand[0, 50, 2:4] += 1.5  # that box grows e^1.5 = 4.5x per side: IoU 0.05
    out = compare_outputs([{"o": head}], [{"o": cand}], {"o": "detections"}).outputs[0]
    assert out.detection_layout == "raw head-objectness"
    assert (out.detections_reference, out.detections_appeared) == (3, 1) and out.detections_kept == 0.5


def test_one_value_per_sample_is_judged_across_the_samples() -> None:
    # A wake-word probability per window: the per-sample cosine of one number is 1 whatever it is.
    ref = np.array([[0.01], [0.02], [0.95], [0.03], [0.90], [0.02]], np.float32)
    cand = ref.copy()
    cand[2, 0], cand[4, 0] = 0.10, 0.05  # both triggers lost
    parity = compare_outputs([{"p": ref}], [{"p": cand}], {"p": "other"})
    (out,) = parity.outputs
    assert out.across_samples and out.metric == "cosine across samples (one value per sample)"
    assert out.cosine_mean < 0.95  # per sample it was 1.0, six times
    assert Budget.resolve(None, {"p": "other"}, INT8).error(parity)[0] > 1.0
