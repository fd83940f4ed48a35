"""`graphopt distill CONFIG.toml`: teacher, student and data from factory functions, then
distill → save the student's state dict → export it with parity → write a JSON report.

```toml
[teacher]
factory = "digits:teacher"          # package.module:function; the config's folder is importable
args = { epochs = 30 }              # keyword arguments of the factory (optional)

[student]
factory = "digits:student"          # called as factory(teacher, **args): compress it, or build one

[data]
factory = "digits:data"             # returns {"train": …, "val": … (optional), "example": inputs}

[distill]                           # graphopt.torch.DistillOptions (every key optional)
task = "classification"
epochs = 40

[export]                            # graphopt.torch.export options (every key optional)
exporter = "auto"
input_names = ["x"]
output_names = ["logits"]
dynamic_axes = { x = { 0 = "N" }, logits = { 0 = "N" } }

[output]
dir = "out"                         # relative to the config's folder
name = "student"                    # → student.pt, student.onnx, student.distill.json
```
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graphopt.errors import InputError, UsageError
from graphopt.presets import read_toml

_SECTIONS = {"teacher", "student", "data", "distill", "export", "output"}
_FACTORY_KEYS = {"factory", "args"}
_EXPORT_KEYS = {"exporter", "opset", "input_names", "output_names", "dynamic_axes", "external_data", "atol", "rtol"}
_OUTPUT_KEYS = {"dir", "name"}


def _check_keys(where: str, table: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise InputError(f"{where}: must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise InputError(f"{where}: unknown key {', '.join(unknown)}; valid keys: {', '.join(sorted(allowed))}")
    return table


def resolve_factory(spec: str, where: str) -> Callable[..., Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"{where}: factory must look like package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"{where}: cannot import {module_name}: {exc}") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise InputError(f"{where}: {module_name} has no function {attr}")
    return func


@dataclasses.dataclass
class DistillConfig:
    path: Path
    teacher: dict[str, Any]
    student: dict[str, Any]
    data: dict[str, Any]
    distill: dict[str, Any]
    export: dict[str, Any]
    output_dir: Path
    name: str


def load_config(path: str | Path) -> DistillConfig:
    from graphopt.torch.distill import DistillOptions

    path = Path(path)
    raw = read_toml(path, kind="distill config", error=InputError)
    _check_keys(path.name, raw, _SECTIONS)
    for section in ("teacher", "student", "data"):
        if section not in raw or "factory" not in raw[section]:
            raise InputError(f"{path.name}: [{section}] needs factory = \"package.module:function\"")
        _check_keys(f"{path.name} [{section}]", raw[section], _FACTORY_KEYS)
    distill = _check_keys(f"{path.name} [distill]", raw.get("distill", {}),
                          {f.name for f in dataclasses.fields(DistillOptions)})
    export = _check_keys(f"{path.name} [export]", raw.get("export", {}), _EXPORT_KEYS)
    output = _check_keys(f"{path.name} [output]", raw.get("output", {}), _OUTPUT_KEYS)
    return DistillConfig(path=path, teacher=raw["teacher"], student=raw["student"], data=raw["data"],
                         distill=distill, export=export,
                         output_dir=(path.parent / output.get("dir", "out")).resolve(), name=output.get("name", "student"))


def _call(section: dict[str, Any], where: str, *args: Any) -> Any:
    func = resolve_factory(section["factory"], where)
    return func(*args, **section.get("args", {}))


def _example(data: dict[str, Any]) -> tuple[Any, ...]:
    """Export inputs: the first validation (or training) sample or batch."""
    import torch

    from graphopt.torch.batches import split_batch

    source = data["val"] if data.get("val") is not None else data["train"]
    is_dataset = isinstance(source, torch.utils.data.Dataset)
    args, kwargs, _ = split_batch(source[0] if is_dataset else next(iter(source)))
    if kwargs:
        raise UsageError("[data]: models with keyword inputs need an 'example' in the factory's result")
    return tuple(a.unsqueeze(0) for a in args) if is_dataset else args


def run_config(path: str | Path, *, quiet: bool = False) -> dict[str, Any]:
    """Run a distill config; return its report (also written beside the outputs)."""
    import torch

    from graphopt.io import to_json, write_text
    from graphopt.torch.compress import parameter_count
    from graphopt.torch.distill import DistillOptions, distill
    from graphopt.torch.export import export

    started = time.perf_counter()
    config = load_config(path)
    folder = str(config.path.parent.resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    options = DistillOptions(**{**config.distill, "quiet": quiet or config.distill.get("quiet", False)})
    teacher = _call(config.teacher, "[teacher]")
    student = _call(config.student, "[student]", teacher)
    data = _call(config.data, "[data]")
    if not isinstance(data, dict) or "train" not in data:
        raise UsageError("[data]: the factory must return a dict with 'train' (and optionally 'val', 'example')")
    if not isinstance(teacher, torch.nn.Module) or not isinstance(student, torch.nn.Module):
        raise UsageError("[teacher] and [student] factories must return torch.nn.Module")
    example = data.get("example") if data.get("example") is not None else _example(data)
    result = distill(teacher, student, data["train"], val=data.get("val"), options=options)
    report: dict[str, Any] = {
        "config": str(config.path),
        "teacher_params": parameter_count(teacher),
        "student_params": parameter_count(student),
        "distill": result.to_dict(),
    }
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    if rank != 0:  # one writer under torchrun
        return report
    config.output_dir.mkdir(parents=True, exist_ok=True)
    weights = config.output_dir / f"{config.name}.pt"
    torch.save(student.state_dict(), weights)
    onnx_path = config.output_dir / f"{config.name}.onnx"
    report["export"] = export(student, example, onnx_path, **config.export)
    report["outputs"] = {"state_dict": str(weights), "onnx": str(onnx_path)}
    report["seconds"] = round(time.perf_counter() - started, 3)
    write_text(config.output_dir / f"{config.name}.distill.json", to_json(report))
    return report
