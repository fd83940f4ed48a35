"""onnxruntime's edge format: an ORT-format copy of a model, made reproducible, and the
required-operators config of a minimal onnxruntime build.

The conversion is onnxruntime's own (``python -m onnxruntime.tools.convert_onnx_models_to_ort``,
style Fixed, with type reduction). Two conversions of one model differ in a few hundred bytes,
because onnxruntime writes one table from a hash map whose order changes with every process;
:func:`canonical_ort` rewrites that table in sorted order, so equal models give equal files.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from graphopt.errors import GraphoptError, InvalidModelError

CONVERTER = "onnxruntime.tools.convert_onnx_models_to_ort"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Conversion:
    """What the converter was asked to do and the operators the ``.config`` lists, for a manifest."""

    optimization_level: str
    platform: str | None
    operators: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": CONVERTER,
            "optimization_style": "Fixed",
            "optimization_level": self.optimization_level,
            "platform": self.platform,
            "type_reduction": True,
            "operators": list(self.operators),
        }


def convert_to_ort(model: Path, *, ort_path: Path, config_path: Path, level: str, platform: str | None,
                   work: Path) -> Conversion:
    """Convert ``model`` (a file ending in .onnx, external data beside it) into ``ort_path``
    and write the operators it needs to ``config_path``; return what was done, for a manifest.

    The converter runs as a subprocess: its prints and native log lines stay off graphopt's
    output, and a crash of it cannot take graphopt down. It runs in ``work``, a folder holding
    nothing from the model's folder, so that no copied file can shadow a Python module.
    """
    out_dir = work / "out"
    out_dir.mkdir(parents=True)
    command = [sys.executable, "-m", CONVERTER, str(model), "--output_dir", str(out_dir),
               "--optimization_style", "Fixed", "--enable_type_reduction",
               *(["--target_platform", platform] if platform else [])]
    env = {**os.environ, "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL": level}
    proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, errors="replace")
    produced = sorted(out_dir.glob("*.ort")), sorted(out_dir.glob("*.config"))
    if proc.returncode != 0 or [len(found) for found in produced] != [1, 1]:
        raise InvalidModelError(f"{model.name}: onnxruntime cannot convert it to ORT format: "
                                f"{_converter_error(proc, model)}")
    (ort_file,), (config_file,) = produced
    ort_path.write_bytes(canonical_ort(ort_file.read_bytes()))
    # The converter's header names the absolute path of the .ort it read.
    config = re.sub(r"^# - .*$", f"# - {ort_path.name}", config_file.read_text(encoding="utf-8"), flags=re.MULTILINE)
    config_path.write_text(config, encoding="utf-8")
    return Conversion(optimization_level=level, platform=platform, operators=tuple(config_operators(config)))


def _converter_error(proc: subprocess.CompletedProcess[str], model: Path) -> str:
    if proc.returncode < 0:
        return f"the converter was killed by signal {-proc.returncode}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("Error converting")]
    lines += [line for line in proc.stderr.splitlines() if line.strip()][-1:]
    reason = (lines or [f"the converter exited with status {proc.returncode}"])[0]
    return reason.replace(str(model.parent) + os.sep, "")[:300]


def config_operators(config: str) -> list[str]:
    """Operator names of a required-operators config ('domain;opset;Op{types},Op…' lines),
    'domain:Op' outside ai.onnx. The type-reduction JSON after a name holds commas too."""
    operators = set()
    for line in config.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        domain, _, ops = line.split(";", 2)
        depth, name, names = 0, "", []
        for char in ops + ",":
            if char == "," and depth == 0:
                names.append(name)
                name = ""
            elif char in "{}":
                depth += 1 if char == "{" else -1
            elif depth == 0:
                name += char
        operators.update(op if domain == "ai.onnx" else f"{domain}:{op}" for op in names if op)
    return sorted(operators)


def _ort_schema() -> Any:
    """onnxruntime's generated flatbuffers classes of the ORT format (the schema's authority)."""
    import onnxruntime.tools.ort_format_model  # noqa: F401  (puts ort_flatbuffers_py on sys.path)
    from ort_flatbuffers_py import fbs  # its __init__ imports every table's module

    return fbs


def _slot(table: Any, index: int) -> int | None:
    """Absolute position of the object a table's field ``index`` points to."""
    offset = table._tab.Offset(4 + 2 * index)
    return table._tab.Indirect(table._tab.Pos + offset) if offset else None


def _resolver_entries(session: Any) -> list[tuple[bytes, list[tuple[bytes, list[tuple[int, int]]]]]]:
    resolver = session.KernelTypeStrResolver()
    entries = []
    for i in range(resolver.OpKernelTypeStrArgsLength() if resolver else 0):
        op = resolver.OpKernelTypeStrArgs(i)
        kinds = []
        for j in range(op.KernelTypeStrArgsLength()):
            kind = op.KernelTypeStrArgs(j)
            args = [(kind.Args(k).ArgType(), kind.Args(k).Index()) for k in range(kind.ArgsLength())]
            kinds.append((kind.KernelTypeStr(), args))
        entries.append((op.OpId(), sorted(kinds)))
    return sorted(entries)


def canonical_ort(data: bytes) -> bytes:
    """The same ORT-format model with its kernel-type-string table in a canonical order.

    onnxruntime writes that table (``KernelTypeStrResolver::SaveToOrtFormat``) by iterating an
    absl hash map, whose seed is an address and so changes with every process (ASLR): two
    conversions of one model differ in the table's first bytes. The model itself is written
    before the table, so it sits at the end of the buffer and never moves relative to the end;
    this keeps those bytes as they are and rebuilds the table and the root, sorted.
    """
    import flatbuffers

    fbs = _ort_schema()
    buffer = bytearray(data)
    if not fbs.InferenceSession.InferenceSession.InferenceSessionBufferHasIdentifier(buffer, 0):
        raise GraphoptError("the converter wrote something that is not an ORT-format model")
    session = fbs.InferenceSession.InferenceSession.GetRootAs(buffer, 0)
    version, model, session_state = _slot(session, 0), _slot(session, 1), _slot(session, 2)
    if version is None or model is None or session_state is not None:
        raise GraphoptError("unexpected ORT-format layout; cannot make it reproducible")
    model_vtable = model - flatbuffers.encode.Get(flatbuffers.packer.soffset, buffer, model)
    tail = bytes(buffer[min(model, model_vtable, version):])
    entries = _resolver_entries(session)

    builder = flatbuffers.Builder(len(tail) + 4096)
    builder.Prep(1, len(tail))
    builder.head -= len(tail)
    builder.Bytes[builder.head : builder.head + len(tail)] = tail
    # Keep every position of the tail aligned as it was, counted from the start of the file.
    builder.minalign = max(builder.minalign, min(len(data) & -len(data), 64))
    root = _build_root(builder, fbs, entries, version=len(data) - version, model=len(data) - model)
    builder.Finish(root, file_identifier=b"ORTM")
    result = bytes(builder.Output())

    check = fbs.InferenceSession.InferenceSession.GetRootAs(bytearray(result), 0)
    if not result.endswith(tail) or len(result) - _slot(check, 1) != len(data) - model or _resolver_entries(check) != entries:
        raise GraphoptError("rewriting the ORT-format model changed it; cannot make it reproducible")
    return result


def _build_root(builder: Any, fbs: Any, entries: list[Any], *, version: int, model: int) -> int:
    def vector(start: Any, offsets: list[int]) -> int:
        start(builder, len(offsets))
        for offset in reversed(offsets):
            builder.PrependUOffsetTRelative(offset)
        return builder.EndVector()

    def table(kind: Any, *fields: tuple[Any, Any]) -> int:
        """One table; its strings and vectors must already be in the buffer."""
        kind.Start(builder)
        for add, value in fields:
            add(builder, value)
        return kind.End(builder)

    arg, kind_entry, op_entry = fbs.ArgTypeAndIndex, fbs.KernelTypeStrArgsEntry, fbs.OpIdKernelTypeStrArgsEntry
    op_offsets = []
    for op_id, kinds in entries:
        kind_offsets = []
        for kernel_type_str, args in kinds:
            arg_offsets = [table(arg, (arg.AddArgType, arg_type), (arg.AddIndex, index)) for arg_type, index in args]
            args_vector = vector(kind_entry.StartArgsVector, arg_offsets)
            name = builder.CreateString(kernel_type_str)
            kind_offsets.append(table(kind_entry, (kind_entry.AddKernelTypeStr, name), (kind_entry.AddArgs, args_vector)))
        kinds_vector = vector(op_entry.StartKernelTypeStrArgsVector, kind_offsets)
        op_name = builder.CreateString(op_id)
        op_offsets.append(table(op_entry, (op_entry.AddOpId, op_name), (op_entry.AddKernelTypeStrArgs, kinds_vector)))
    resolver_kind, session = fbs.KernelTypeStrResolver, fbs.InferenceSession
    ops_vector = vector(resolver_kind.StartOpKernelTypeStrArgsVector, op_offsets)
    resolver = table(resolver_kind, (resolver_kind.AddOpKernelTypeStrArgs, ops_vector))
    return table(session, (session.AddOrtVersion, version), (session.AddModel, model),
                 (session.AddKernelTypeStrResolver, resolver))
