"""Edge targets: what a runtime supports, as TOML presets `graphopt package --target` checks.

```toml
description = "what runtime this describes"
opset_min = 11                 # default-domain opset range the runtime implements
opset_max = 21
operators = ["Conv", "Relu", "com.microsoft:QLinearConv"]   # allow-list; "domain:Op" outside ai.onnx
optimization_level = "all"     # ORT-format conversion: basic | extended | layout | all
platform = "arm"               # converter's --target_platform: arm | amd64 (default: portable)
```
Every key is optional. Built-in presets live beside this file; a path to a ``.toml`` file
works too. The allow-list applies to the ONNX model's operators (subgraphs and local
functions included): those are what the model needs. The ``.ort`` copy may use fused
onnxruntime kernels (FusedConv…); the bundle's ``.config`` lists them for a minimal build.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graphopt.errors import TargetError, UnsupportedByTarget
from graphopt.presets import builtin_presets, read_preset

DEFAULT_DOMAIN = "ai.onnx"
OPTIMIZATION_LEVELS = ("basic", "extended", "layout", "all")
PLATFORMS = ("arm", "amd64")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Target:
    name: str
    description: str = ""
    opset_min: int | None = None
    opset_max: int | None = None
    operators: frozenset[str] | None = None  # None: any operator
    optimization_level: str = "all"
    platform: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["operators"] = None if self.operators is None else sorted(self.operators)
        return data


_TYPES: dict[str, type] = {
    "description": str,
    "opset_min": int,
    "opset_max": int,
    "operators": list,
    "optimization_level": str,
    "platform": str,
}


def builtin_targets() -> list[str]:
    return builtin_presets("graphopt.package.targets")


def load_target(name_or_path: str | Path) -> Target:
    """A built-in target by name, or a TOML file by path."""
    data, name = read_preset(str(name_or_path), package="graphopt.package.targets", kind="target", error=TargetError)
    return parse_target(data, Path(name).name)  # the name goes into bundle manifests: no machine paths


def parse_target(data: dict[str, Any], name: str) -> Target:
    unknown = sorted(set(data) - set(_TYPES))
    if unknown:
        raise TargetError(f"target '{name}': unknown key {', '.join(unknown)}; valid keys: {', '.join(sorted(_TYPES))}")
    for key, kind in _TYPES.items():
        if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
            raise TargetError(f"target '{name}': '{key}' must be {kind.__name__}, got {data[key]!r}")
    operators = data.get("operators")
    if operators is not None and (not operators or not all(isinstance(op, str) and op for op in operators)):
        raise TargetError(f"target '{name}': 'operators' must be a non-empty list of operator names")
    opset_min, opset_max = data.get("opset_min"), data.get("opset_max")
    if opset_min is not None and opset_max is not None and opset_min > opset_max:
        raise TargetError(f"target '{name}': opset_min {opset_min} is above opset_max {opset_max}")
    _check_choice(data, "optimization_level", OPTIMIZATION_LEVELS, name)
    _check_choice(data, "platform", PLATFORMS, name)
    return Target(
        name=name,
        description=data.get("description", ""),
        opset_min=opset_min,
        opset_max=opset_max,
        operators=None if operators is None else frozenset(_qualified(op) for op in operators),
        optimization_level=data.get("optimization_level", "all"),
        platform=data.get("platform"),
    )


def _check_choice(data: dict[str, Any], key: str, choices: tuple[str, ...], name: str) -> None:
    if key in data and data[key] not in choices:
        raise TargetError(f"target '{name}': '{key}' must be one of {', '.join(choices)}, got {data[key]!r}")


def _qualified(op: str) -> str:
    """'Conv' and 'ai.onnx:Conv' are the same operator; other domains keep their prefix."""
    domain, sep, op_type = op.rpartition(":")
    return op_type if not sep or domain in ("", DEFAULT_DOMAIN) else op


def model_operators(model: ir.Model) -> Counter[str]:
    """Operators the model runs, 'domain:Op' outside ai.onnx; calls to the model's own
    functions count as the operators of their bodies."""
    functions = set(model.functions)
    nodes = [*ir.traversal.RecursiveGraphIterator(model.graph)]
    for function in model.functions.values():
        nodes.extend(ir.traversal.RecursiveGraphIterator(function))
    return Counter(
        _qualified(f"{node.domain}:{node.op_type}")
        for node in nodes
        if (node.domain, node.op_type, node.overload) not in functions
    )


def check_model(target: Target, model: ir.Model, where: str) -> None:
    """Raise UnsupportedByTarget naming every operator outside the allow-list and an opset
    outside the range."""
    problems = []
    if target.operators is not None:
        outside = sorted(set(model_operators(model)) - target.operators)
        if outside:
            problems.append(f"operators {', '.join(outside)} are not in its allow-list")
    opset = model.opset_imports.get("", model.opset_imports.get(DEFAULT_DOMAIN))
    low = target.opset_min if target.opset_min is not None else 1
    high = target.opset_max
    if opset is not None and (opset < low or (high is not None and opset > high)):
        problems.append(f"opset {opset} is outside {low}..{high if high is not None else ''}")
    if problems:
        raise UnsupportedByTarget(
            f"{where}: not supported by target '{target.name}': {'; '.join(problems)} (a runtime built with them "
            f"needs a target of its own: a .toml file naming them, given as --target FILE; or package without "
            f"--target)")
