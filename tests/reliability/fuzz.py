"""Fuzzing graphopt's loader and every registered pass with mutated small models.

The contract checked on every example (:func:`check_example`):

- ``load_model`` either returns or raises an :class:`~graphopt.errors.InputError`;
- on a model that loaded, every pass (run alone through a :class:`Pipeline` that checks its
  result, with calibration feeds when random feeds can be made) either returns, or raises a
  :class:`~graphopt.errors.GraphoptError`; a returned model must pass the ONNX checker and
  load in onnxruntime whenever the input did;
- nothing hangs: a watchdog kills the process with every thread's traceback after
  ``HANG_SECONDS``.

Any other exception propagates, and is the bug. Mutations are byte-level (flips,
truncation) or structural (drop an input or a node, rename a tensor, change dims, dtypes,
attributes, the op type or the opset). The hypothesis test in ``test_fuzz.py`` runs a
short, derandomized campaign in CI; ``scripts/fuzz.py --minutes N`` a longer random one.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import faulthandler
import random
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
from onnx import TensorProto

from graphopt.errors import GraphoptError, InputError, PassFailed
from tests.reliability.models import SEEDS

HANG_SECONDS = 120

# Options that make every pass do real work on tiny models, and keep it quick.
PASS_OPTIONS: dict[str, dict[str, object]] = {
    "simplify": {"check_n": 1},
    "quantize-int8": {"min_elements": 16},
    "quantize-dynamic": {"min_elements": 16},
    "quantize-static": {"min_elements": 16},
    "quantize-weights": {"min_elements": 16},
    "quantize-codebook": {"min_elements": 16},
    "lowrank": {"min_elements": 16},
}

_OP_TYPES = ("Relu", "Add", "MatMul", "Identity", "Conv", "Gemm", "Reshape", "Softmax", "If", "Frobnicate")
_DTYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.INT8,
           TensorProto.BOOL, TensorProto.STRING, TensorProto.UNDEFINED, 1000)
_DIMS = (0, 1, 2, 3, 7, 64, -1, -5, 2**31, 2**62)


# -- mutations ---------------------------------------------------------------------------------


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _pick_graph(model: onnx.ModelProto, rng: random.Random) -> onnx.GraphProto:
    return rng.choice(list(_graphs(model.graph)))


def _tensor_names(graph: onnx.GraphProto) -> list[str]:
    names = [v.name for v in (*graph.input, *graph.output)] + [t.name for t in graph.initializer]
    return names + [name for node in graph.node for name in (*node.input, *node.output)]


def drop_input(model: onnx.ModelProto, rng: random.Random) -> None:
    graph = _pick_graph(model, rng)
    if graph.input:
        del graph.input[rng.randrange(len(graph.input))]


def drop_node(model: onnx.ModelProto, rng: random.Random) -> None:
    graph = _pick_graph(model, rng)
    if graph.node:
        del graph.node[rng.randrange(len(graph.node))]


def rename_tensor(model: onnx.ModelProto, rng: random.Random) -> None:
    graph = _pick_graph(model, rng)
    if not graph.node:
        return
    node = rng.choice(graph.node)
    slots = [(node.input, i) for i in range(len(node.input))] + [(node.output, i) for i in range(len(node.output))]
    if slots:
        field, index = rng.choice(slots)
        field[index] = rng.choice([*_tensor_names(model.graph), "", "ghost", "X", "Y"])


def _pick_declaration(model: onnx.ModelProto, rng: random.Random) -> object | None:
    """A random initializer, graph input or graph output of a random graph (None: there is none)."""
    graph = _pick_graph(model, rng)
    targets: list[object] = [*graph.initializer, *graph.input, *graph.output]
    return rng.choice(targets) if targets else None


def change_dims(model: onnx.ModelProto, rng: random.Random) -> None:
    target = _pick_declaration(model, rng)
    if target is None:
        return
    if isinstance(target, TensorProto):
        dims = list(target.dims)
        if dims and rng.random() < 0.7:
            dims[rng.randrange(len(dims))] = rng.choice(_DIMS)
        else:
            dims.append(rng.choice(_DIMS))
        del target.dims[:]
        target.dims.extend(dims)
        return
    shape = target.type.tensor_type.shape
    if shape.dim and rng.random() < 0.7:
        dim = shape.dim[rng.randrange(len(shape.dim))]
        if rng.random() < 0.3:
            dim.dim_param = rng.choice(["N", "", "weird name"])
        else:
            dim.dim_value = max(rng.choice(_DIMS), 0)
    elif rng.random() < 0.5:
        shape.dim.add().dim_value = rng.choice((1, 2, 3))
    else:
        target.type.tensor_type.ClearField("shape")


def change_dtype(model: onnx.ModelProto, rng: random.Random) -> None:
    target = _pick_declaration(model, rng)
    if target is None:
        return
    if isinstance(target, TensorProto):
        target.data_type = rng.choice(_DTYPES)
    else:
        target.type.tensor_type.elem_type = rng.choice(_DTYPES)


def change_attribute(model: onnx.ModelProto, rng: random.Random) -> None:
    nodes = [n for g in _graphs(model.graph) for n in g.node if n.attribute]
    if not nodes:
        node = rng.choice([n for g in _graphs(model.graph) for n in g.node] or [None])
        if node is not None:
            node.attribute.append(onnx.helper.make_attribute(rng.choice(["axis", "alpha", "transB"]),
                                                             rng.choice([0, 1, -1, 7])))
        return
    attr = rng.choice(rng.choice(nodes).attribute)
    if attr.type == onnx.AttributeProto.INT:
        attr.i = rng.choice((-1, 0, 1, 2, 3, 2**31, -(2**62)))
    elif attr.type == onnx.AttributeProto.FLOAT:
        attr.f = rng.choice((0.0, -1.0, 1e30, float("nan"), float("inf")))
    elif attr.type == onnx.AttributeProto.INTS:
        values = list(attr.ints)
        if values:
            values[rng.randrange(len(values))] = rng.choice((-1, 0, 5, 2**40))
        elif rng.random() < 0.5:
            values = [1]
        del attr.ints[:]
        attr.ints.extend(values[: rng.randint(0, len(values))] if rng.random() < 0.3 else values)
    elif attr.type == onnx.AttributeProto.TENSOR:
        attr.t.data_type = rng.choice(_DTYPES)
    else:
        attr.name = rng.choice(["bogus", "axis", attr.name + "_"])


def change_op_type(model: onnx.ModelProto, rng: random.Random) -> None:
    nodes = [n for g in _graphs(model.graph) for n in g.node]
    if nodes:
        rng.choice(nodes).op_type = rng.choice(_OP_TYPES)


def change_opset(model: onnx.ModelProto, rng: random.Random) -> None:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = rng.choice((1, 6, 9, 11, 12, 13, 18, 21, 22, 23, 99))


STRUCTURAL: dict[str, Callable[[onnx.ModelProto, random.Random], None]] = {
    "drop_input": drop_input,
    "drop_node": drop_node,
    "rename_tensor": rename_tensor,
    "change_dims": change_dims,
    "change_dtype": change_dtype,
    "change_attribute": change_attribute,
    "change_op_type": change_op_type,
    "change_opset": change_opset,
}
MUTATIONS = (*STRUCTURAL, "flip_bytes", "truncate")


def mutate(seed: str, mutations: list[str], rng: random.Random) -> bytes:
    """The serialized seed model after ``mutations`` in order (byte-level ones on its bytes)."""
    model = SEEDS[seed]()
    pending_bytes = []
    for name in mutations:
        if name in STRUCTURAL:
            STRUCTURAL[name](model, rng)
        else:
            pending_bytes.append(name)
    data = bytearray(model.SerializeToString())
    for name in pending_bytes:
        if name == "flip_bytes":
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif name == "truncate" and len(data) > 1:
            del data[rng.randrange(1, len(data)):]
    return bytes(data)


# -- the contract ------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """What happened to one example: ``refused`` at load, or one entry per pass."""

    refused: str | None = None
    passes: dict[str, str] = dataclasses.field(default_factory=dict)  # pass → "ok", "error: …"
    internal: list[str] = dataclasses.field(default_factory=list)  # PassFailed caused by a non-graphopt error


class ContractViolation(AssertionError):
    """A pass returned a model that no longer loads, though its input did."""


@contextlib.contextmanager
def watchdog(seconds: float = HANG_SECONDS) -> Iterator[None]:
    """A hang (even inside C++) ends the process with every thread's traceback on stderr."""
    faulthandler.dump_traceback_later(seconds, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _pass_names() -> list[str]:
    from graphopt.passes import available_passes

    return available_passes()


def _make_pass(name: str):  # noqa: ANN202
    from graphopt.passes import get_pass

    cls = get_pass(name)
    valid = {f.name for f in dataclasses.fields(cls.Options)}
    return cls(**{k: v for k, v in PASS_OPTIONS.get(name, {}).items() if k in valid})


def _context(model, cache_dir: str):  # noqa: ANN001, ANN202
    from graphopt.passes.base import PassContext
    from graphopt.verify.feeds import input_specs, random_feeds

    try:
        calibration = random_feeds(input_specs(model), shapes={}, seed=0, count=8, batch_size=2)
    except InputError:
        calibration = None
    return PassContext(calibration=calibration, threads=1, cache_dir=cache_dir)


def _loads_in_runtime(model) -> bool:  # noqa: ANN001
    from graphopt.verify.runtime import check_loadable

    try:
        check_loadable(model)
    except InputError:
        return False
    return True


def check_example(data: bytes, workdir: Path, *, cache_dir: Path | None = None,
                  passes: list[str] | None = None) -> Outcome:
    """Run the loader and every pass on ``data``; raise on any breach of the contract.

    ``cache_dir`` holds the int8 speed profile; share one across examples to measure each
    layer form once."""
    from graphopt.io import load_model
    from graphopt.passes import Pipeline
    from graphopt.verify.runtime import check_loadable

    path = workdir / "model.onnx"
    path.write_bytes(data)
    outcome = Outcome()
    with watchdog():
        try:
            loaded = load_model(path)
        except InputError as exc:
            outcome.refused = str(exc)
            return outcome
        input_ok = _loads_in_runtime(loaded.model)
        context = _context(loaded.model, str(cache_dir or workdir / "cache"))
        for name in passes if passes is not None else _pass_names():
            model = load_model(path).model  # passes work in place: each gets a fresh copy
            try:
                result = Pipeline([_make_pass(name)], check=check_loadable, context=context).run(model)
            except PassFailed as exc:
                outcome.passes[name] = f"error: {exc}"
                cause = exc.__cause__
                if cause is not None and not isinstance(cause, GraphoptError):
                    outcome.internal.append(f"{name}: {type(cause).__name__}: {str(cause)[:200]}")
                continue
            except GraphoptError as exc:
                outcome.passes[name] = f"error: {exc}"
                continue
            if input_ok:
                try:
                    check_loadable(result.model)
                except InputError as exc:
                    raise ContractViolation(f"pass '{name}' returned a model that does not load: {exc}") from exc
            outcome.passes[name] = "ok"
    return outcome


def run_random(minutes: float, seed: int, out: Path, log: Callable[[str], None]) -> dict[str, object]:
    """A random campaign for ``scripts/fuzz.py``: failing inputs are saved under ``out``."""
    import time

    rng = random.Random(seed)
    stats: collections.Counter[str] = collections.Counter()
    internal: collections.Counter[str] = collections.Counter()
    failures = []
    deadline = time.monotonic() + minutes * 60
    cache = Path(tempfile.mkdtemp(prefix="graphopt-fuzz-cache-"))
    while time.monotonic() < deadline:
        seed_name = rng.choice(sorted(SEEDS))
        mutations = [rng.choice(MUTATIONS) for _ in range(rng.randint(1, 3))]
        example_seed = rng.randrange(2**32)
        data = mutate(seed_name, mutations, random.Random(example_seed))
        stats["examples"] += 1
        with tempfile.TemporaryDirectory() as tmp:
            try:
                outcome = check_example(data, Path(tmp), cache_dir=cache)
            except Exception as exc:  # the bug the campaign is looking for: keep the input
                stats["failures"] += 1
                name = f"failure-{len(failures):03d}-{seed_name}-{'+'.join(mutations)}.onnx"
                (out / name).write_bytes(data)
                failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
                log(failures[-1])
                continue
        if outcome.refused is not None:
            stats["refused at load"] += 1
        else:
            stats["loaded"] += 1
            for verdict in outcome.passes.values():
                stats["pass ok" if verdict == "ok" else "pass refused (graphopt error)"] += 1
            internal.update(line.split(":", 2)[0] + ":" + line.split(":", 2)[1] for line in outcome.internal)
    return {"stats": dict(stats), "internal_pass_errors": dict(internal.most_common()), "failures": failures}
