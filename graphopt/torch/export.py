"""Export a torch module to ONNX and prove the file computes what the module computes.

The dynamo exporter (``torch.export`` + onnxscript) is tried first; ``exporter="auto"`` falls
back to the TorchScript exporter when it fails, and the report says why. The export is written
into a hidden staging folder beside ``path`` (dynamo may write ``NAME.onnx.data`` next to it),
loaded in onnxruntime with graph optimizations off, compared with the torch outputs on the
example inputs (and any extra ``check_inputs``), and only then moved into place.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphopt.errors import GateFailed, GraphoptError, UsageError, reason

logger = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript", "auto")


def _as_tuple(inputs: Any) -> tuple[Any, ...]:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _torch_outputs(model: torch.nn.Module, args: tuple[Any, ...]) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(*args)
    flat = out if isinstance(out, (tuple, list)) else (out,)
    return [t.detach().cpu().numpy() for t in flat]


def _feeds(session: Any, args: tuple[Any, ...]) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if len(names) != len(tensors):
        raise GraphoptError(f"the exported model takes {len(names)} inputs {names}, the example has {len(tensors)} tensors")
    return {name: t.detach().cpu().numpy() for name, t in zip(names, tensors)}


def _export_once(model: torch.nn.Module, args: tuple[Any, ...], target: Path, *, dynamo: bool, opset: int,
                 input_names: Sequence[str] | None, output_names: Sequence[str] | None,
                 dynamic_axes: Mapping[str, Any] | None, dynamic_shapes: Any, external_data: bool) -> None:
    options: dict[str, Any] = dict(input_names=list(input_names) if input_names else None,
                                   output_names=list(output_names) if output_names else None,
                                   opset_version=opset, dynamo=dynamo)
    if dynamo:
        options.update(external_data=external_data, dynamic_shapes=dynamic_shapes,
                       dynamic_axes=None if dynamic_shapes is not None else dynamic_axes)
    else:
        if dynamic_shapes is not None:
            raise UsageError("dynamic_shapes needs the dynamo exporter; give dynamic_axes for torchscript")
        options.update(dynamic_axes=dynamic_axes, do_constant_folding=True)
    # Both exporters chat on stdout/stderr and warn liberally; the report carries what matters.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(model, args, str(target), **options)
    if not target.is_file():
        raise GraphoptError(f"the exporter wrote no {target.name}")


def _parity(target: Path, model: torch.nn.Module, inputs: list[tuple[Any, ...]]) -> Any:
    from graphopt.verify.parity import compare_outputs, run_outputs
    from graphopt.verify.runtime import make_session

    session = make_session(target, optimize=False, threads=1)
    output_names = [o.name for o in session.get_outputs()]
    reference, candidate = [], []
    for args in inputs:
        expected = _torch_outputs(model, args)
        if len(expected) != len(output_names):
            raise GraphoptError(f"torch returned {len(expected)} outputs, the ONNX model has {len(output_names)}")
        reference.append(dict(zip(output_names, expected)))
        candidate.extend(run_outputs(session, [_feeds(session, args)]))
    return compare_outputs(reference, candidate)


def _int_axes(dynamic_axes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Axis keys as ints: TOML and JSON configs can only spell them as strings."""
    if dynamic_axes is None:
        return None
    return {name: {int(k): v for k, v in axes.items()} if isinstance(axes, Mapping) else [int(a) for a in axes]
            for name, axes in dynamic_axes.items()}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def export(
    model: torch.nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
    opset: int = 18,
    exporter: str = "auto",
    external_data: bool = False,
    check_inputs: Sequence[Any] = (),
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> dict[str, Any]:
    """Export ``model`` called on ``example_inputs`` (a tensor or a tuple of them) to ``path``.

    ``dynamic_axes`` ({input or output name: {axis: "name"}}) works with both exporters;
    ``dynamic_shapes`` (torch.export's form) only with dynamo. ``external_data=True`` lets
    dynamo store the weights in ``path + ".data"``; otherwise one self-contained file is
    written (models above protobuf's 2 GB limit always get external data). Parity: every
    output element must satisfy ``|onnx - torch| <= atol + rtol * max|torch|`` on the example
    and on every ``check_inputs`` entry (use those to exercise the dynamic axes), else
    :class:`GateFailed` and nothing is written. Returns the report.
    """
    if exporter not in EXPORTERS:
        raise UsageError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    target = Path(path)
    if not target.parent.is_dir():
        raise UsageError(f"{target}: folder {target.parent} does not exist")
    was_training = model.training
    model.eval()
    args = _as_tuple(example_inputs)
    dynamic_axes = _int_axes(dynamic_axes)
    order = {"dynamo": [True], "torchscript": [False], "auto": [True, False]}[exporter]
    attempts: list[dict[str, str]] = []
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
    try:
        for dynamo in order:
            name = "dynamo" if dynamo else "torchscript"
            for stale in _files(staging):
                stale.unlink()
            try:
                _export_once(model, args, staging / target.name, dynamo=dynamo, opset=opset,
                             input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                             dynamic_shapes=dynamic_shapes, external_data=external_data)
            except UsageError:
                raise
            except Exception as exc:  # exporters raise anything from torch._dynamo to onnxscript errors
                first = reason(exc)
                attempts.append({"exporter": name, "error": f"{type(exc).__name__}: {first}"})
                logger.info("%s exporter failed: %s", name, first)
                continue
            break
        else:
            raise GraphoptError(f"{target.name}: export failed: " + "; ".join(f"{a['exporter']}: {a['error']}" for a in attempts))
        inputs = [args, *(_as_tuple(extra) for extra in check_inputs)]
        parity = _parity(staging / target.name, model, inputs)
        scale = max(float(np.max(np.abs(o), initial=0.0)) for a in inputs for o in _torch_outputs(model, a))
        budget = atol + rtol * scale
        passed = parity.max_abs <= budget and not parity.shape_mismatches and parity.new_nonfinite == 0
        files = _files(staging)
        report = {
            "path": str(target),
            "exporter": name,
            "fallback_from": attempts,
            "opset": opset,
            "files": [{"name": f.name, "bytes": f.stat().st_size} for f in files],
            "bytes": sum(f.stat().st_size for f in files),
            "parity": {**parity.to_dict(), "budget_max_abs": budget, "passed": passed, "inputs_checked": len(inputs)},
        }
        if not passed:
            detail = "; ".join(parity.shape_mismatches) or f"max abs {parity.max_abs:.3g} > budget {budget:.3g}"
            raise GateFailed(f"{target.name} not written: ONNX ({name}) disagrees with torch: {detail}",
                             ["export_parity"], report=report)
        for file in files:
            os.replace(file, target.parent / file.name)
        logger.info("exported %s with %s (max abs %.3g)", target.name, name, parity.max_abs)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        model.train(was_training)
