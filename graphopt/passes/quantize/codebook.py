"""quantize-codebook: non-uniform weight quantization with small codebooks (lossy).

Each eligible float weight ``W`` becomes ``bits``-bit indices into a codebook of at most
``2**bits`` values and is rebuilt inside the graph with standard ONNX ops, under its own name,
so every runtime runs the result and the rest of the graph is unchanged::

    packed uint8 → Cast(int64) → Reshape([groups, bytes]) → [Gather the bytes of each index]
        → Div, (Mul, Add), Mod → Reshape(W.shape) (Slice first when the last group is partial)
        → [per channel: Add(Range(0, C·K, K) reshaped to the channel axis)]
        → Gather(codebook) → W

Indices are bit-packed little-endian: ``lcm(bits, 8)`` bits form a group of ``lcm/8`` bytes
holding ``lcm/bits`` indices (4-bit: 2 per byte, 6-bit: 4 per 3 bytes, 8-bit: 1 per byte).
Every input of the rebuild is a constant, so onnxruntime folds it once at session creation
and inference runs on plain float weights. A later constant-folding step (``simplify``) would
turn the weights back into floats: put this pass last.

Modes:

- ``kmeans``: weight sharing. A deterministic 1-D k-means per codebook: ``2**bits`` centroids
  start at the quantiles of the cube-root density (no randomness) and move by Lloyd iterations
  on the sorted values, where each cluster is a contiguous run, so an iteration costs
  ``O(K log n)`` with prefix sums (a 1.5M-element tensor takes ~0.15 s). A tensor with at most
  ``2**bits`` distinct values keeps them exactly.
- ``log2``: signed powers of two, ``{0} ∪ {±2^e : e_max-L+1 ≤ e ≤ e_max}`` with
  ``L = 2**(bits-1) - 1`` so that ``2L + 1`` entries fit the budget; ``e_max`` is
  ``log2(max |w|)`` rounded. Values go to the nearest entry in linear error (arithmetic
  midpoints), which gives a lower weight error than rounding ``log2 |w|`` (geometric midpoints).

``per_channel`` gives each output channel its own codebook (a flat ``[C·K]`` codebook indexed by
``channel·K + index``); the channel is the output axis of the consumer (MatMul: last, Gemm: by
``transB``, Conv: 0, ConvTranspose: 1, Gather: the feature axis, last, so an embedding table
gets one codebook per feature rather than one per token). A weight whose encoding (indices,
codebooks and the rebuild's constants) would not be smaller than the weight stays float: wide
per-channel codebooks can outweigh short channels.

Only the main graph is rewritten: If/Loop/Scan bodies are left untouched, and so are weights
read from inside them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from graphopt.errors import RecipeError
from graphopt.passes.base import GraphoptPass, PassContext, PassResult
from graphopt.passes.naming import fresh_name, value_names
from graphopt.passes.weights import exclusion
from graphopt.passes.registry import register

logger = logging.getLogger(__name__)

WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0}
"""Op type → index of the input that holds its weight (Gather: the embedding table)."""

# The rebuild's ops all exist at opset 11; 13 is the floor of graphopt's quantization passes
# (upgrade-opset's default target) and the lowest opset the rebuild is tested at.
MIN_OPSET = 13
CODEBOOK_TAG = "graphopt.codebook"  # tensor metadata marking a codebook, so it is never re-encoded
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
_LLOYD_ITERATIONS = 100  # from the cube-root start, more changes the error by < 1%
_DENSITY_BINS = 4096


@register
class QuantizeCodebookPass(GraphoptPass, name="quantize-codebook",
                           summary="weights → bit-packed indices into small k-means or power-of-two codebooks (lossy)"):
    role = "compress"

    class Options:
        mode: Literal["log2", "kmeans"] = "kmeans"
        """``kmeans``: learned codebook (weight sharing); ``log2``: 0 and signed powers of two."""
        bits: int = 4
        """Index width, 2..8; a codebook holds at most ``2**bits`` values."""
        per_channel: bool = False
        """One codebook per output channel instead of one per tensor."""
        min_elements: int = 4096
        """Weights with fewer elements stay float (their codebook and rebuild would not pay)."""
        ops: tuple[str, ...] = ("MatMul", "Gemm", "Conv", "Gather")
        """Consumers whose weight is encoded; any of MatMul, Gemm, Conv, ConvTranspose, Gather."""
        exclude: tuple[str, ...] = ()
        """Glob patterns: a weight whose name, or the name of a node reading it, matches one stays
        as it is, e.g. to encode it with more bits in a second step."""

        def __post_init__(self) -> None:
            _check_options(self)

    def requires(self, model: ir.Model) -> None:
        self.require_opset(model, MIN_OPSET)

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        graph = model.graph
        taken = value_names(graph)
        encoded: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        notes: list[str] = []
        for weight, axis in _candidates(graph, self.options.ops):
            refusal = _refusal(weight, graph, self.options, context.exclude)
            rebuild = None
            if refusal is None:
                rebuild = _plan_rebuild(weight, axis if self.options.per_channel else None, self.options, taken)
                before, after = rebuild.detail["bytes_before"], rebuild.detail["bytes_after"]
                if after >= before:
                    refusal = _Refusal(f"its encoding would take {after} bytes, not fewer than its {before}", warn=True)
            if refusal is not None:
                skipped.append({"name": weight.name or "", "reason": refusal.reason})
                if refusal.warn:
                    notes.append(f"weight '{weight.name}' left as float: {refusal.reason}")
                continue
            _install(graph, weight, rebuild)
            encoded.append(rebuild.detail)
            logger.debug("encoded %s: %s", weight.name, rebuild.detail)
        if any(True for _ in graph.subgraphs()):
            notes.append("If/Loop/Scan bodies are left untouched")
        changes = {
            "weights encoded": len(encoded),
            "weights skipped": len(skipped),
            "bytes before": sum(e["bytes_before"] for e in encoded),
            "bytes after": sum(e["bytes_after"] for e in encoded),
        }
        details = {"weights": encoded, "skipped": skipped}
        return PassResult(model, modified=bool(encoded), changes=changes, notes=notes, details=details)


def _check_options(options: Any) -> None:
    """Options from Python are not checked by the recipe parser: refuse bad values here too."""
    where = "quantize-codebook option"
    if options.mode not in ("log2", "kmeans"):
        raise RecipeError(f"{where} 'mode' must be 'log2' or 'kmeans', got {options.mode!r}")
    if not isinstance(options.bits, int) or isinstance(options.bits, bool) or not 2 <= options.bits <= 8:
        raise RecipeError(f"{where} 'bits' must be an integer from 2 to 8, got {options.bits!r}")
    if not isinstance(options.min_elements, int) or options.min_elements < 1:
        raise RecipeError(f"{where} 'min_elements' must be a positive integer, got {options.min_elements!r}")
    unknown = sorted(set(options.ops) - set(WEIGHT_INPUT))
    if unknown or not options.ops:
        raise RecipeError(
            f"{where} 'ops' must name some of {', '.join(sorted(WEIGHT_INPUT))}; got {list(options.ops)!r}"
        )
    object.__setattr__(options, "ops", tuple(options.ops))
    object.__setattr__(options, "exclude", tuple(options.exclude))


# --------------------------------------------------------------------------- which weights


def _candidates(graph: ir.Graph, ops: tuple[str, ...]) -> Iterator[tuple[ir.Value, int | None]]:
    """Each weight input of a selected op once, in graph order, with its output-channel axis."""
    seen: set[int] = set()
    for node in graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ops:
            continue
        slot = WEIGHT_INPUT[node.op_type]
        weight = node.inputs[slot] if slot < len(node.inputs) else None
        if weight is None or id(weight) in seen:
            continue
        seen.add(id(weight))
        producer = weight.producer()
        if producer is not None and producer.op_type != "Constant":
            continue  # an activation, not a weight
        yield weight, _channel_axis(node, weight)


def _channel_axis(node: ir.Node, weight: ir.Value) -> int | None:
    shape = weight.const_value.shape if weight.const_value is not None else weight.shape
    rank = len(shape) if shape is not None else 0
    if rank < 2:
        return None
    if node.op_type == "MatMul":
        return rank - 1
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    gather_axis = node.attributes.get_int("axis", 0) % rank
    return rank - 1 if gather_axis != rank - 1 else 0


@dataclasses.dataclass(frozen=True)
class _Refusal:
    reason: str
    warn: bool = False
    """Worth a note in the report: the user probably expected this weight to be encoded. Small,
    integer, excluded and run-time weights are left alone by design."""


def _refusal(weight: ir.Value, graph: ir.Graph, options: Any, run_exclude: tuple[str, ...] = ()) -> _Refusal | None:
    """Why ``weight`` must stay as it is, or None when it can be encoded."""
    if weight.is_graph_input():
        return _Refusal("is a graph input, so its value is only known at run time")
    for pattern in options.exclude:
        names = [weight.name or "", *(node.name or "" for node in weight.consumers())]
        if any(fnmatch.fnmatchcase(name, pattern) for name in names):
            return _Refusal(f"matches exclude pattern '{pattern}'")
    for node in weight.consumers():
        if (excluded := exclusion(node, run_exclude)) is not None:
            return _Refusal(excluded)
    tensor = _constant_tensor(weight)
    if tensor is None:
        return _Refusal("is not a constant tensor")
    if CODEBOOK_TAG in tensor.metadata_props:
        return _Refusal("is a codebook written by quantize-codebook")
    if tensor.dtype not in _FLOAT_TYPES:
        return _Refusal(f"has dtype {tensor.dtype.name}, not float16/float32/float64")
    if tensor.size < options.min_elements:
        return _Refusal(f"has {tensor.size} elements, fewer than min_elements={options.min_elements}")
    if not weight.is_initializer():
        return _Refusal("is a Constant node's output, not an initializer (run lift-constants first)", warn=True)
    if weight.is_graph_output():
        return _Refusal("is a graph output", warn=True)
    for use in weight.uses():
        node = use.node
        if node.graph is not graph:
            return _Refusal(f"is read inside a subgraph (node '{node.name}'), which this pass leaves untouched", warn=True)
        if node.op_type not in options.ops or WEIGHT_INPUT[node.op_type] != use.idx:
            return _Refusal(f"is also read by node '{node.name}' ({node.op_type} input {use.idx}), not as a weight", warn=True)
    if not np.all(np.isfinite(tensor.numpy())):
        return _Refusal("holds NaN or Inf", warn=True)
    return None


def _constant_tensor(weight: ir.Value) -> ir.TensorProtocol | None:
    """An initializer's tensor, or the tensor of the Constant node producing ``weight``."""
    if weight.is_initializer():
        return weight.const_value
    attribute = weight.producer().attributes.get("value") if weight.producer() is not None else None
    return attribute.value if attribute is not None and isinstance(attribute.value, ir.TensorProtocol) else None


# --------------------------------------------------------------------------- codebooks


def kmeans_codebook(values: np.ndarray, size: int) -> np.ndarray:
    """Sorted centroids of a deterministic 1-D k-means with at most ``size`` clusters.

    Lloyd iterations from the cube-root-density quantiles, then relocation rounds: Lloyd only
    finds a local optimum and leaves isolated outliers (BatchNorm-folded convolutions have a few)
    sharing one centroid, so while merging the cheapest adjacent pair of clusters and splitting
    the costliest cluster lowers the error, do that and run Lloyd again.
    """
    xs = np.sort(values.astype(np.float64, copy=False).reshape(-1))
    distinct = xs[np.concatenate(([True], xs[1:] != xs[:-1]))]
    if distinct.size <= size:
        return distinct
    runs = _SortedRuns(xs)
    centroids = runs.lloyd(np.unique(cube_root_density_quantiles(xs, size)))
    error = runs.error(centroids)
    for _ in range(size):
        candidate = runs.relocate_one(centroids)
        if candidate is None:
            break
        candidate = runs.lloyd(candidate)
        candidate_error = runs.error(candidate)
        if not candidate_error < error:
            break
        centroids, error = candidate, candidate_error
    return centroids


class _SortedRuns:
    """Sorted values with prefix sums. Nearest-centroid clusters of sorted values are contiguous
    runs, and the sum and squared error of any run cost O(1), so a Lloyd iteration costs
    O(K log n) instead of O(K n)."""

    def __init__(self, xs: np.ndarray) -> None:
        self.xs = xs
        self.sum = np.concatenate(([0.0], np.cumsum(xs)))
        self.sum_sq = np.concatenate(([0.0], np.cumsum(xs * xs)))

    def edges(self, centroids: np.ndarray) -> np.ndarray:
        return np.concatenate(([0], np.searchsorted(self.xs, (centroids[:-1] + centroids[1:]) / 2), [self.xs.size]))

    def run_sum(self, start: Any, stop: Any) -> Any:
        return self.sum[stop] - self.sum[start]

    def run_sse(self, start: Any, stop: Any) -> Any:
        """Squared error of runs around their own means."""
        total = self.run_sum(start, stop)
        spread = self.sum_sq[stop] - self.sum_sq[start] - total * total / np.maximum(stop - start, 1)
        return np.maximum(spread, 0.0)

    def error(self, centroids: np.ndarray) -> float:
        """Squared error of every value to its nearest centroid."""
        edges = self.edges(centroids)
        start, stop = edges[:-1], edges[1:]
        squares = self.sum_sq[stop] - self.sum_sq[start]
        return float(np.sum(squares - 2 * centroids * self.run_sum(start, stop) + (stop - start) * centroids**2))

    def lloyd(self, centroids: np.ndarray) -> np.ndarray:
        for _ in range(_LLOYD_ITERATIONS):
            edges = self.edges(centroids)
            counts = np.diff(edges)
            # An empty cluster keeps its centroid, which still lies between its neighbours.
            moved = np.where(counts > 0, self.run_sum(edges[:-1], edges[1:]) / np.maximum(counts, 1), centroids)
            if np.array_equal(moved, centroids):
                break
            centroids = moved
        return centroids

    def relocate_one(self, centroids: np.ndarray) -> np.ndarray | None:
        """The centroids with the cheapest adjacent pair of clusters merged and the costliest
        cluster split at its best cut, or None when the split gains less than the merge costs."""
        edges = self.edges(centroids)
        start, stop = edges[:-1], edges[1:]
        sse = self.run_sse(start, stop)
        worst = int(np.argmax(sse))
        first, last = int(start[worst]), int(stop[worst])
        if last - first < 2:
            return None
        cuts = np.arange(first + 1, last)
        split_sse = self.run_sse(first, cuts) + self.run_sse(cuts, last)
        cut = int(cuts[np.argmin(split_sse)])
        merge_cost = self.run_sse(start[:-1], stop[1:]) - sse[:-1] - sse[1:]
        merge_cost[max(worst - 1, 0) : worst + 1] = np.inf  # pairs holding the cluster to split
        pair = int(np.argmin(merge_cost))
        if not sse[worst] - split_sse.min() > merge_cost[pair]:
            return None
        merged_count = stop[pair + 1] - start[pair]
        merged = self.run_sum(start[pair], stop[pair + 1]) / merged_count if merged_count else centroids[pair]
        halves = [self.run_sum(first, cut) / (cut - first), self.run_sum(cut, last) / (last - cut)]
        kept = np.delete(centroids, [pair, pair + 1, worst])
        return np.sort(np.concatenate((kept, [merged], halves)))


def cube_root_density_quantiles(xs: np.ndarray, size: int) -> np.ndarray:
    """``size`` points spread like density^(1/3): the MSE-optimal spacing for many levels
    (Panter & Dite). The plain value quantiles leave the tails nearly empty, and Lloyd needs
    thousands of iterations to move centroids out there when there are 64 or more of them."""
    counts, edges = np.histogram(xs, bins=_DENSITY_BINS)
    mass = np.concatenate(([0.0], np.cumsum(np.cbrt(counts))))
    return np.interp((np.arange(size) + 0.5) / size, mass / mass[-1], edges)


def log2_codebook(values: np.ndarray, bits: int) -> np.ndarray:
    """0 and ±2^e for the ``2**(bits-1) - 1`` exponents below the rounded log2 of max |w|."""
    peak = float(np.max(np.abs(values)))
    if peak == 0.0:
        return np.zeros(1)
    top = math.floor(math.log2(peak) + 0.5)
    magnitudes = np.exp2(np.arange(top - 2 ** (bits - 1) + 2, top + 1, dtype=np.float64))
    return np.concatenate((-magnitudes[::-1], [0.0], magnitudes))


def nearest_entry(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of a sorted codebook for every value (ties go up)."""
    return np.searchsorted((codebook[:-1] + codebook[1:]) / 2, values, side="right")


@dataclasses.dataclass
class Encoding:
    codebooks: np.ndarray  # [groups, size] in the weight's dtype; short codebooks repeat their last entry
    indices: np.ndarray  # the weight's shape, each within its group's codebook


def encode(weight: np.ndarray, *, mode: str, bits: int, axis: int | None) -> Encoding:
    """One codebook per tensor (``axis`` None) or per slice along ``axis``."""
    moved = np.moveaxis(weight, axis, 0) if axis is not None else weight.reshape(1, -1)
    groups = moved.reshape(moved.shape[0], -1)
    books = []
    for values in groups:
        learned = kmeans_codebook(values, 2**bits) if mode == "kmeans" else log2_codebook(values, bits)
        # Assign against the values the graph will hold, not the float64 ones.
        books.append(learned.astype(weight.dtype).astype(np.float64))
    size = max(len(b) for b in books)
    indices = np.stack([nearest_entry(values, book) for values, book in zip(groups, books)])
    padded = np.stack([np.pad(b, (0, size - len(b)), mode="edge") for b in books]).astype(weight.dtype)
    shaped = indices.reshape(moved.shape)
    return Encoding(padded, np.moveaxis(shaped, 0, axis) if axis is not None else shaped.reshape(weight.shape))


def bit_layout(bits: int) -> tuple[int, int]:
    """(bytes, indices) of one packing group: the least whole number of bytes of whole indices."""
    group_bits = math.lcm(bits, 8)
    return group_bits // 8, group_bits // bits


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """Little-endian bit packing: index j of a group sits at bit ``j·bits`` of the group's word."""
    group_bytes, per_group = bit_layout(bits)
    flat = indices.reshape(-1).astype(np.uint64)
    groups = -(-flat.size // per_group)
    padded = np.zeros(groups * per_group, np.uint64)
    padded[: flat.size] = flat
    shifts = np.arange(per_group, dtype=np.uint64) * np.uint64(bits)
    words = np.bitwise_or.reduce(padded.reshape(groups, per_group) << shifts, axis=1)
    byte_shifts = np.arange(group_bytes, dtype=np.uint64) * np.uint64(8)
    return ((words[:, None] >> byte_shifts) & np.uint64(0xFF)).astype(np.uint8).reshape(-1)


# --------------------------------------------------------------------------- graph rewrite


@dataclasses.dataclass
class _Rebuild:
    """The nodes and initializers that rebuild one weight, not yet in the graph."""

    builder: _Builder
    codebook: ir.Value
    indices: ir.Value
    detail: dict[str, Any]


def _plan_rebuild(weight: ir.Value, axis: int | None, options: Any, taken: set[str]) -> _Rebuild:
    array = weight.const_value.numpy()
    encoding = encode(array, mode=options.mode, bits=options.bits, axis=axis)
    builder = _Builder(weight.name or "weight", taken)
    codebook = builder.constant("codebook", encoding.codebooks.reshape(-1))
    codebook.const_value.metadata_props[CODEBOOK_TAG] = f"{options.mode}{options.bits}"
    indices = _unpack(builder, pack_indices(encoding.indices, options.bits), options.bits, array.shape)
    if axis is not None:
        groups, size = encoding.codebooks.shape
        starts = builder.op("Range", [builder.constant("first", np.array(0)), builder.constant("end", np.array(groups * size)),
                                      builder.constant("step", np.array(size))], "offsets")
        shape = [1] * array.ndim
        shape[axis] = groups
        offsets = builder.op("Reshape", [starts, builder.constant("offset_shape", np.array(shape))], "channel_offsets")
        indices = builder.op("Add", [indices, offsets], "flat_indices")

    error = encoding.codebooks.reshape(-1)[_flat_indices(encoding, axis)].astype(np.float64) - array
    norm = float(np.linalg.norm(array))
    detail = {
        "name": weight.name,
        "shape": list(array.shape),
        "mode": options.mode,
        "bits": options.bits,
        "per_channel": axis is not None,
        "codebooks": int(encoding.codebooks.shape[0]),
        "codebook_size": int(encoding.codebooks.shape[1]),
        "bytes_before": int(array.nbytes),
        "bytes_after": sum(v.const_value.nbytes for v in builder.initializers),
        "max_abs_error": float(np.max(np.abs(error))),
        "rel_l2_error": float(np.linalg.norm(error) / norm) if norm else 0.0,
    }
    return _Rebuild(builder, codebook, indices, detail)


def _install(graph: ir.Graph, weight: ir.Value, rebuild: _Rebuild) -> None:
    """Replace the initializer by its rebuild; the rebuilt value takes the weight's name."""
    name, first_consumer = weight.name, _first_consumer(graph, weight)
    graph.initializers.pop(name)
    output = ir.Value(name=name, type=ir.TensorType(weight.const_value.dtype), shape=weight.const_value.shape)
    decode = ir.node("Gather", [rebuild.codebook, rebuild.indices], {"axis": 0}, name=f"{name}/decode", outputs=[output])
    weight.replace_all_uses_with(output)
    for value in rebuild.builder.initializers:
        graph.register_initializer(value)
    graph.insert_before(first_consumer, [*rebuild.builder.nodes, decode])


def _flat_indices(encoding: Encoding, axis: int | None) -> np.ndarray:
    if axis is None:
        return encoding.indices
    shape = [1] * encoding.indices.ndim
    shape[axis] = -1
    size = encoding.codebooks.shape[1]
    return encoding.indices + (np.arange(encoding.codebooks.shape[0]) * size).reshape(shape)


def _unpack(builder: _Builder, packed: np.ndarray, bits: int, shape: tuple[int, ...]) -> ir.Value:
    """Nodes turning the packed bytes back into int64 indices of ``shape``.

    Index j of a group starts at bit ``o = j·bits``, in byte ``o // 8`` at shift ``o % 8``, and
    may run into the next byte. ``low // 2^shift + next · 2^(8-shift)`` puts its bits at the
    bottom and ``mod 2^bits`` drops the rest (for an index inside one byte the ``next`` term is a
    multiple of ``2^bits``, so no case split is needed). Every intermediate stays below 2^16:
    exact in any integer arithmetic, unlike a 56-bit word (onnxruntime's int64 ReduceSum rounds
    above 2^53).
    """
    group_bytes, per_group = bit_layout(bits)
    count = math.prod(shape)
    values = builder.op("Cast", [builder.constant("indices", packed)], "bytes", to=ir.DataType.INT64)
    if bits < 8:
        start_bits = bits * np.arange(per_group)
        byte, shift = start_bits // 8, start_bits % 8
        grouped = builder.op("Reshape", [values, builder.constant("group_shape", np.array([-1, group_bytes]))], "groups")
        low = grouped
        if group_bytes > 1:
            low = builder.op("Gather", [grouped, builder.constant("low_byte", byte)], "low", axis=1)
        merged = builder.op("Div", [low, builder.constant("low_scale", 2**shift)], "low_bits")
        if group_bytes > 1:
            following = np.minimum(byte + 1, group_bytes - 1)
            high = builder.op("Gather", [grouped, builder.constant("high_byte", following)], "high", axis=1)
            high_bits = builder.op("Mul", [high, builder.constant("high_scale", 2 ** (8 - shift))], "high_bits")
            merged = builder.op("Add", [merged, high_bits], "merged")
        values = builder.op("Mod", [merged, builder.constant("field_modulus", np.array(2**bits))], "fields")
        if -(-count // per_group) * per_group != count:  # the last group is partial
            flat = builder.op("Reshape", [values, builder.constant("flat_shape", np.array([-1]))], "flat")
            values = builder.op("Slice", [flat, builder.constant("start", np.array([0])),
                                          builder.constant("stop", np.array([count]))], "trimmed")
    return builder.op("Reshape", [values, builder.constant("shape", np.array(shape))], "index_grid")


def _first_consumer(graph: ir.Graph, weight: ir.Value) -> ir.Node:
    consumers = {id(node) for node in weight.consumers()}
    return next(node for node in graph if id(node) in consumers)


class _Builder:
    """Collects the nodes and initializers of one weight's rebuild under names free in the graph."""

    def __init__(self, prefix: str, taken: set[str]) -> None:
        self.prefix = prefix
        self.taken = taken
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []

    def _name(self, suffix: str) -> str:
        return fresh_name(f"{self.prefix}.{suffix}", self.taken, first=2)

    def constant(self, suffix: str, array: np.ndarray) -> ir.Value:
        name = self._name(suffix)
        if array.dtype.kind == "i":
            array = array.astype(np.int64)
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.type = ir.TensorType(value.const_value.dtype)
        value.shape = ir.Shape(array.shape)
        self.initializers.append(value)
        return value

    def op(self, op_type: str, inputs: list[ir.Value], suffix: str, **attributes: Any) -> ir.Value:
        name = self._name(suffix)
        node = ir.node(op_type, inputs, attributes or None, name=f"{self.prefix}/{suffix}", outputs=[ir.Value(name=name)])
        self.nodes.append(node)
        return node.outputs[0]
