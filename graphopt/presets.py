"""Built-in TOML presets (recipes, package targets) found by name, or any ``.toml`` by path."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Any

from graphopt.errors import GraphoptError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def builtin_presets(package: str) -> list[str]:
    """Names of the ``*.toml`` files shipped in ``package``."""
    folder = resources.files(package)
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def read_toml(path: Path, *, kind: str, error: type[GraphoptError]) -> dict[str, Any]:
    """The parsed TOML file at ``path``; a missing, unreadable or invalid file is ``error``."""
    if not path.is_file():
        raise error(f"{kind} file '{path}' does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{kind} '{path}': invalid TOML: {exc}") from None


def builtin_text(package: str, name: str) -> str:
    """The TOML text of built-in preset ``name`` of ``package``."""
    return resources.files(package).joinpath(f"{name}.toml").read_text(encoding="utf-8")


def read_preset(name_or_path: str, *, package: str, kind: str,
                error: type[GraphoptError]) -> tuple[dict[str, Any], str]:
    """The parsed TOML of a built-in preset of ``package`` or of a ``.toml`` file, and its name
    (the built-in's, or the path as given). Every failure is ``error`` naming the ``kind`` and file."""
    builtins = builtin_presets(package)
    if name_or_path in builtins:
        text = builtin_text(package, name_or_path)
        name = name_or_path
    elif Path(name_or_path).suffix == ".toml":
        return read_toml(Path(name_or_path), kind=kind, error=error), name_or_path
    else:
        raise error(f"unknown {kind} '{name_or_path}'; built-in {kind}s: {', '.join(builtins)} (or a .toml path)")
    try:
        return tomllib.loads(text), name
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{kind} '{name}': invalid TOML: {exc}") from None
