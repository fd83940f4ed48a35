"""A corpus of hostile ONNX inputs that the graphopt loader must refuse.

Each case starts from one tiny valid model (X[1,4] -> MatMul W[4,4] -> Add B[4] -> Relu -> Y)
and breaks exactly one thing, so a refusal can be traced to that thing and not to some
accidental second defect. Every case lives in its own folder ``root/<name>/`` because
external-data locations are resolved relative to the model's folder.

Cases that try to read outside their folder point at real "secret" files holding canary
weights (every value ``CANARY``): a loader or runtime that follows the path succeeds, and
its output shows that it did, instead of failing with a harmless "file not found".

Layout written by :func:`build_corpus`::

    root/<name>/model.onnx          one folder per case (plus its weights.bin if any)
    root/secret.bin                 read by external-dotdot via "../secret.bin"
    root/secret-subgraph.bin        read by subgraph-external-dotdot
    root/hardlink-original.bin      the other name of external-hardlink/weights.bin
    <root>.outside/absolute-secret.bin   named by external-absolute's absolute location
    <root>.outside/symlink-target.bin    target of external-symlink/weights.bin

Run ``python -m tests.hostile.corpus OUT_DIR`` to write the corpus and list it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import random
import sys
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 17
MODEL_FILE = "model.onnx"

# Value of every weight in the secret files: far from the real weights, so an output
# near 4 * CANARY proves the outside file was read.
CANARY = 1337.0

# random.Random (Mersenne Twister, int seed) gives the same bytes on every Python 3
# version. With this seed the 4 KiB fail to parse as a ModelProto (protobuf DecodeError
# "Wire format was corrupt"), as they did for seeds 0-4 when it was picked;
# tests/hostile/test_corpus_sanity.py checks that this stays true.
RANDOM_BYTES_SEED = 0
RANDOM_BYTES_SIZE = 4096

# The declared batch of the absurd-dims input: 2**40 x 4 floats is 16 TiB.
ABSURD_BATCH = 2**40

# Each dim of huge-declared-dims: 2**31 x 2**31 float32 is 16 EiB.
HUGE_DIM = 2**31

UNKNOWN_DOMAIN = "org.stranger"

# Cases whose model.onnx embeds the corpus's absolute path, so two builds into
# different folders give different bytes.
PATH_DEPENDENT = frozenset({"external-absolute"})

# Expected substrings shared by every "these bytes are not an ONNX protobuf" case.
_NOT_PROTOBUF = ("parse", "protobuf", "decode", "not an onnx", "not a valid onnx", "corrupt")


@dataclasses.dataclass(frozen=True)
class HostileCase:
    name: str  # folder name, e.g. "random-bytes"
    model: pathlib.Path  # the .onnx file to feed the tool
    problem: str  # short human description
    expect: tuple[str, ...]  # lowercase; a good one-line error contains at least one
    unsafe: bool  # True when the case tries to read outside the model folder
    # True when the file is a legal model that only fails once run (absurd input shape,
    # unknown operator): loading and `inspect` succeed, every command that runs it exits 2.
    loads: bool = False


# --- the valid base model -------------------------------------------------------------


def _weights() -> np.ndarray:
    # Fixed, distinct, small values: easy to tell apart from CANARY in an output.
    return (np.arange(16, dtype=np.float32).reshape(4, 4) / 8.0 - 1.0).astype(np.float32)


def _bias() -> np.ndarray:
    return np.array([0.1, -0.2, 0.3, -0.4], dtype=np.float32)


def _value(name: str, dims: Sequence[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))


def _base_nodes(bias: str = "B", matmul_out: str = "xw") -> list[onnx.NodeProto]:
    return [
        helper.make_node("MatMul", ["X", "W"], [matmul_out], name="matmul"),
        helper.make_node("Add", [matmul_out, bias], ["z"], name="add"),
        helper.make_node("Relu", ["z"], ["Y"], name="relu"),
    ]


def _base_initializers(w: onnx.TensorProto | None = None) -> list[onnx.TensorProto]:
    if w is None:
        w = numpy_helper.from_array(_weights(), "W")
    return [w, numpy_helper.from_array(_bias(), "B")]


def _graph(
    nodes: Sequence[onnx.NodeProto],
    initializers: Sequence[onnx.TensorProto],
    dims: Sequence[int] = (1, 4),
) -> onnx.GraphProto:
    return helper.make_graph(
        list(nodes), "tiny", [_value("X", dims)], [_value("Y", dims)], list(initializers)
    )


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    # helper.make_model only assembles the proto; nothing here validates, which is what
    # lets the broken variants through.
    return helper.make_model(
        graph,
        ir_version=IR_VERSION,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="graphopt-hostile-corpus",
    )


def valid_model() -> onnx.ModelProto:
    """The base model every case breaks: passes the full checker and runs in onnxruntime."""
    return _model(_graph(_base_nodes(), _base_initializers()))


# --- writing files --------------------------------------------------------------------


def _write(path: pathlib.Path, data: bytes) -> None:
    # Unlink first: a rebuild must never write through a symlink or hard link left by an
    # earlier build into a file outside the corpus.
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def _serialize(message: onnx.ModelProto | onnx.GraphProto) -> bytes:
    return message.SerializeToString(deterministic=True)


def _write_model(case_dir: pathlib.Path, model: onnx.ModelProto) -> pathlib.Path:
    path = case_dir / MODEL_FILE
    _write(path, _serialize(model))
    return path


def _canary_bytes(count: int) -> bytes:
    return np.full(count, CANARY, dtype=np.float32).tobytes()


def _external_tensor(
    name: str, dims: Sequence[int], entries: Mapping[str, str]
) -> onnx.TensorProto:
    # Built field by field on purpose: onnx's save/convert helpers normalize or check
    # locations, and the point is to keep the hostile entries exactly as written.
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(dims))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    tensor.ClearField("raw_data")
    return tensor


def _model_with_external_w(entries: Mapping[str, str]) -> onnx.ModelProto:
    w = _external_tensor("W", (4, 4), entries)
    return _model(_graph(_base_nodes(), _base_initializers(w)))


def _w_entries(location: str, offset: int = 0, length: int | None = 64) -> dict[str, str]:
    entries = {"location": location, "offset": str(offset)}
    if length is not None:
        entries["length"] = str(length)
    return entries


def _case(
    case_dir: pathlib.Path,
    problem: str,
    expect: tuple[str, ...],
    unsafe: bool = False,
    loads: bool = False,
) -> HostileCase:
    return HostileCase(case_dir.name, case_dir / MODEL_FILE, problem, expect, unsafe, loads)


# --- cases: not an ONNX protobuf at all -----------------------------------------------


def _random_bytes(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    data = random.Random(RANDOM_BYTES_SEED).randbytes(RANDOM_BYTES_SIZE)
    _write(case_dir / MODEL_FILE, data)
    return _case(case_dir, "4 KiB of random bytes", _NOT_PROTOBUF)


def _empty_file(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    # Zero bytes is a *valid* empty protobuf message, so a parser alone accepts it.
    _write(case_dir / MODEL_FILE, b"")
    return _case(case_dir, "the file is empty (0 bytes)", ("empty", "0 bytes"))


def _truncated(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    data = _serialize(valid_model())
    _write(case_dir / MODEL_FILE, data[: len(data) // 2])
    return _case(
        case_dir, "a valid model cut in half", ("truncated",) + _NOT_PROTOBUF
    )


def _wrong_message(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    # A bare GraphProto (someone saved model.graph) is the nasty variant: protobuf keeps
    # mismatched fields as unknown ones, so it parses as a ModelProto with no graph,
    # ir_version 0 and producer_name set to the graph's name.
    _write(case_dir / MODEL_FILE, _serialize(valid_model().graph))
    return _case(
        case_dir,
        "a serialized GraphProto, not a ModelProto",
        ("graph", "ir_version", "ir version", "opset") + _NOT_PROTOBUF,
    )


def _text_file(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    # The text a user really gets when a repository was cloned without `git lfs pull`.
    real = _serialize(valid_model())
    text = (
        "version https://git-lfs.github.com/spec/v1\n"
        f"oid sha256:{hashlib.sha256(real).hexdigest()}\n"
        f"size {len(real)}\n"
    )
    _write(case_dir / MODEL_FILE, text.encode("ascii"))
    return _case(
        case_dir, "a text file (a Git LFS pointer)", ("text", "lfs") + _NOT_PROTOBUF
    )


# --- cases: a ModelProto with a broken graph ------------------------------------------


def _cycle(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    # cyc_a consumes Y, which cyc_b makes from cyc_a's output: no topological order exists.
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["xw"], name="matmul"),
        helper.make_node("Add", ["xw", "B"], ["z"], name="add"),
        helper.make_node("Add", ["z", "Y"], ["loop"], name="cyc_a"),
        helper.make_node("Relu", ["loop"], ["Y"], name="cyc_b"),
    ]
    _write_model(case_dir, _model(_graph(nodes, _base_initializers())))
    return _case(case_dir, "nodes cyc_a and cyc_b feed each other", ("cycl", "topolog"))


def _dangling_input(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    # B is dropped too, so the graph has no unused initializer as a second oddity.
    nodes = _base_nodes(bias="ghost_bias")
    w = numpy_helper.from_array(_weights(), "W")
    _write_model(case_dir, _model(_graph(nodes, [w])))
    return _case(
        case_dir,
        "node input 'ghost_bias' is produced by nothing",
        ("ghost_bias", "dangling", "not produced", "undefined"),
    )


def _duplicate_output_names(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    # Both producers give a float [1,4], so shapes stay consistent and only SSA breaks.
    nodes = _base_nodes(matmul_out="twice_made")
    nodes.insert(1, helper.make_node("Relu", ["X"], ["twice_made"], name="also_twice"))
    _write_model(case_dir, _model(_graph(nodes, _base_initializers())))
    return _case(
        case_dir,
        "two nodes both produce 'twice_made'",
        ("twice_made", "duplicate", "more than once", "ssa"),
    )


def _absurd_dims(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    # The batch dim is absurd but consistent through the graph: the model is formally
    # valid, yet any tool that builds feeds from declared shapes would allocate 16 TiB.
    graph = _graph(_base_nodes(), _base_initializers(), dims=(ABSURD_BATCH, 4))
    _write_model(case_dir, _model(graph))
    return _case(
        case_dir,
        "input X declared as [2**40, 4] float (16 TiB)",
        ("dim", "too large", "exceed", "declares shape", str(ABSURD_BATCH)),
        loads=True,
    )


def _huge_declared_dims(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    # 2**31 x 2**31 floats (16 EiB) declared, 64 bytes present: a loader that allocates
    # from the declared shape before comparing it with the data dies of memory.
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[HUGE_DIM, HUGE_DIM])
    w.raw_data = _weights().tobytes()
    _write_model(case_dir, _model(_graph(_base_nodes(), _base_initializers(w))))
    return _case(
        case_dir,
        "initializer W declares 2**31 x 2**31 floats but holds 64 bytes",
        ("holds 64 bytes", "mismatch", "does not match"),
    )


def _external_huge_dims(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    # The same through external data with no length: the size must come from the shape,
    # compared with the file's size, never allocated.
    _write(case_dir / "weights.bin", _weights().tobytes())
    w = _external_tensor("W", (HUGE_DIM, HUGE_DIM), _w_entries("weights.bin", length=None))
    _write_model(case_dir, _model(_graph(_base_nodes(), _base_initializers(w))))
    return _case(
        case_dir,
        "external W declares 2**31 x 2**31 floats, its 64-byte file has no length entry",
        ("too short", "exceed", "does not match"),
    )


def _unknown_operator(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    # A custom-domain operator is legal ONNX (com.microsoft ops are everyday), so the model
    # loads and `inspect` describes it; anything that runs it must refuse it cleanly.
    nodes = _base_nodes()
    nodes[1] = helper.make_node("Frobnicate", ["xw", "B"], ["z"], name="add", domain=UNKNOWN_DOMAIN)
    model = _model(_graph(nodes, _base_initializers()))
    model.opset_import.append(helper.make_opsetid(UNKNOWN_DOMAIN, 1))
    _write_model(case_dir, model)
    return _case(
        case_dir,
        f"node 'add' is {UNKNOWN_DOMAIN}:Frobnicate, an operator no runtime knows",
        ("frobnicate",),
        loads=True,
    )


def _initializer_size_mismatch(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    w = numpy_helper.from_array(_weights(), "W")
    w.raw_data = w.raw_data[:32]  # dims still say 4x4 = 64 bytes
    _write_model(case_dir, _model(_graph(_base_nodes(), _base_initializers(w))))
    return _case(
        case_dir,
        "initializer W declares 4x4 floats (64 bytes) but holds 32 bytes",
        ("mismatch", "does not match", "size", "length", "bytes"),
    )


def _weights_with(value: float) -> onnx.TensorProto:
    w = _weights()
    w[1, 2] = value
    return numpy_helper.from_array(w, "W")


def _nan_weights(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    w = _weights_with(float("nan"))
    _write_model(case_dir, _model(_graph(_base_nodes(), _base_initializers(w))))
    return _case(case_dir, "initializer W contains NaN", ("nan", "finite"))


def _inf_weights(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    w = _weights_with(float("inf"))
    _write_model(case_dir, _model(_graph(_base_nodes(), _base_initializers(w))))
    return _case(case_dir, "initializer W contains +Inf", ("inf", "finite"))


def _no_graph(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    model = onnx.ModelProto(
        ir_version=IR_VERSION,
        producer_name="graphopt-hostile-corpus",
        opset_import=[helper.make_opsetid("", OPSET)],
    )
    model.graph.name = "empty"  # present but with no node, input or output
    _write_model(case_dir, model)
    return _case(
        case_dir,
        "the graph is empty: no nodes, no outputs",
        ("no output", "no node", "empty", "graph"),
    )


def _missing_opset(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    model = valid_model()
    del model.opset_import[:]
    _write_model(case_dir, model)
    return _case(case_dir, "the model has no opset_import", ("opset",))


# --- cases: external data -------------------------------------------------------------


def _external_absolute(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    secret = outside / "absolute-secret.bin"
    _write(secret, _canary_bytes(16))
    _write_model(case_dir, _model_with_external_w(_w_entries(str(secret))))
    return _case(
        case_dir,
        "external data path of W is absolute (a real file outside the corpus)",
        ("absolute", "outside"),
        unsafe=True,
    )


def _external_dotdot(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    _write(case_dir.parent / "secret.bin", _canary_bytes(16))
    _write_model(case_dir, _model_with_external_w(_w_entries("../secret.bin")))
    return _case(
        case_dir,
        "external data path of W is '../secret.bin' (file exists)",
        ("outside", ".."),
        unsafe=True,
    )


def _external_symlink(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    target = outside / "symlink-target.bin"
    _write(target, _canary_bytes(16))
    link = case_dir / "weights.bin"
    link.unlink(missing_ok=True)
    # Relative link so the corpus and its .outside sibling can be moved together.
    link.symlink_to(os.path.relpath(target, case_dir))
    _write_model(case_dir, _model_with_external_w(_w_entries("weights.bin")))
    return _case(
        case_dir,
        "external data file weights.bin is a symlink to a file outside the folder",
        ("symlink", "symbolic link", "outside"),
        unsafe=True,
    )


def _external_hardlink(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    # The other name sits in root rather than in the .outside sibling: root and its
    # subfolder are always on one filesystem, which a hard link requires.
    original = case_dir.parent / "hardlink-original.bin"
    _write(original, _canary_bytes(16))
    link = case_dir / "weights.bin"
    link.unlink(missing_ok=True)
    os.link(original, link)
    _write_model(case_dir, _model_with_external_w(_w_entries("weights.bin")))
    return _case(
        case_dir,
        "external data file weights.bin is a hard link (st_nlink > 1) to a file outside",
        ("hard link", "hardlink", "link count", "nlink", "outside"),
        unsafe=True,
    )


def _external_missing(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    (case_dir / "missing.bin").unlink(missing_ok=True)
    _write_model(case_dir, _model_with_external_w(_w_entries("missing.bin")))
    return _case(
        case_dir,
        "external data file missing.bin does not exist",
        ("missing", "not found", "does not exist", "no such file"),
    )


def _external_short(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    _write(case_dir / "weights.bin", _weights().tobytes()[:40])
    _write_model(case_dir, _model_with_external_w(_w_entries("weights.bin")))
    return _case(
        case_dir,
        "external data file is 40 bytes, offset 0 + length 64 goes past its end",
        ("short", "truncated", "past the end", "beyond", "exceed"),
    )


def _external_offset_beyond(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    _write(case_dir / "weights.bin", _weights().tobytes())
    _write_model(case_dir, _model_with_external_w(_w_entries("weights.bin", offset=4096)))
    return _case(
        case_dir,
        "external data offset 4096 is beyond the end of the 64-byte file",
        ("offset", "past the end", "beyond", "exceed"),
    )


def _external_no_length_short(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    _write(case_dir / "weights.bin", _weights().tobytes()[:32])
    _write_model(case_dir, _model_with_external_w(_w_entries("weights.bin", length=None)))
    return _case(
        case_dir,
        "external data has no length and the file holds 32 of the 64 bytes W needs",
        ("short", "truncated", "mismatch", "does not match", "expected", "size"),
    )


def _external_nul_name(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    # "weights.bin\0../../secret" : C code stops at the NUL, Python's os calls raise
    # ValueError; neither is a clear refusal.
    _write(case_dir / "weights.bin", _weights().tobytes())
    _write_model(case_dir, _model_with_external_w(_w_entries("weights.bin\x00../../secret.bin")))
    return _case(
        case_dir,
        "external data location of W holds a NUL byte",
        ("control character",),
    )


def _external_long_name(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    # Longer than NAME_MAX: the OS answers ENAMETOOLONG to any stat or open.
    _write_model(case_dir, _model_with_external_w(_w_entries("w" * 5000 + ".bin")))
    return _case(
        case_dir,
        "external data location of W is a 5004-character file name",
        ("too long",),
    )


def _subgraph_external_dotdot(case_dir: pathlib.Path, outside: pathlib.Path) -> HostileCase:
    # The bias comes from an If whose then-branch Constant is external data reached with
    # "../": a loader that only walks graph.initializer never sees it.
    _write(case_dir.parent / "secret-subgraph.bin", _canary_bytes(4))
    secret = _external_tensor(
        "then_bias", (4,), {"location": "../secret-subgraph.bin", "offset": "0", "length": "16"}
    )
    then_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["then_bias"], name="then_const", value=secret)],
        "then_branch",
        [],
        [_value("then_bias", (4,))],
    )
    else_branch = helper.make_graph(
        [
            helper.make_node(
                "Constant",
                [],
                ["else_bias"],
                name="else_const",
                value=numpy_helper.from_array(_bias(), "else_bias"),
            )
        ],
        "else_branch",
        [],
        [_value("else_bias", (4,))],
    )
    pick = helper.make_node(
        "If",
        ["cond"],
        ["bias"],
        name="pick_bias",
        then_branch=then_branch,
        else_branch=else_branch,
    )
    nodes = [pick] + _base_nodes(bias="bias")
    initializers = [
        numpy_helper.from_array(_weights(), "W"),
        numpy_helper.from_array(np.array(True), "cond"),
    ]
    _write_model(case_dir, _model(_graph(nodes, initializers)))
    return _case(
        case_dir,
        "a Constant inside an If branch has external data at '../secret-subgraph.bin'",
        ("outside", ".."),
        unsafe=True,
    )


# --- the corpus -----------------------------------------------------------------------

_Builder = Callable[[pathlib.Path, pathlib.Path], HostileCase]

_BUILDERS: dict[str, _Builder] = {
    "random-bytes": _random_bytes,
    "empty-file": _empty_file,
    "truncated": _truncated,
    "wrong-message": _wrong_message,
    "text-file": _text_file,
    "cycle": _cycle,
    "dangling-input": _dangling_input,
    "duplicate-output-names": _duplicate_output_names,
    "absurd-dims": _absurd_dims,
    "initializer-size-mismatch": _initializer_size_mismatch,
    "nan-weights": _nan_weights,
    "inf-weights": _inf_weights,
    "no-graph": _no_graph,
    "missing-opset": _missing_opset,
    "external-absolute": _external_absolute,
    "external-dotdot": _external_dotdot,
    "external-symlink": _external_symlink,
    "external-hardlink": _external_hardlink,
    "external-missing": _external_missing,
    "external-short": _external_short,
    "external-offset-beyond": _external_offset_beyond,
    "external-no-length-short": _external_no_length_short,
    "subgraph-external-dotdot": _subgraph_external_dotdot,
    "huge-declared-dims": _huge_declared_dims,
    "external-huge-dims": _external_huge_dims,
    "external-nul-name": _external_nul_name,
    "external-long-name": _external_long_name,
    "unknown-operator": _unknown_operator,
}

CASE_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def outside_dir(root: pathlib.Path) -> pathlib.Path:
    """The sibling folder holding the files that unsafe cases point at from outside root."""
    root = root.resolve()
    return root.parent / f"{root.name}.outside"


def build_corpus(root: pathlib.Path) -> list[HostileCase]:
    """Write every case into ``root/<name>/`` and return them in a fixed order.

    Also writes the secret files described in the module docstring, including the
    sibling folder :func:`outside_dir` next to root. Rebuilding into the same root
    overwrites the cases in place.
    """
    # Resolved so the absolute location in external-absolute is really absolute.
    root = root.resolve()
    outside = outside_dir(root)
    outside.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, build in _BUILDERS.items():
        case_dir = root / name
        case_dir.mkdir(parents=True, exist_ok=True)
        cases.append(build(case_dir, outside))
    return cases


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m tests.hostile.corpus OUT_DIR", file=sys.stderr)
        sys.exit(2)
    for case in build_corpus(pathlib.Path(sys.argv[1])):
        flag = "unsafe " if case.unsafe else "invalid"
        print(f"{case.name:<27} {flag} {case.model}  # {case.problem}")
