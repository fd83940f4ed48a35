"""The layout is the architecture: what may import what inside graphopt.

Read from the source with ``ast`` (nothing is imported): every ``import`` and ``from … import``
of a graphopt module, at module level or inside a function (a lazy import is a dependency
too). An import names the module it reads from: ``from graphopt.verify import latency`` is
graphopt.verify.latency, ``from graphopt.verify.gate import Thresholds`` is graphopt.verify.gate.

The layers, bottom up: errors, io, progress; verify (measuring: runtime, feeds, parity, judge,
gate…); passes; then what composes them (optimize, recipe, evaluate, report, package, torch,
api) and, on top, cli.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "graphopt"

# What passes may import: themselves and the layers below.
PASSES_MAY_IMPORT = ("graphopt.passes", "graphopt.errors", "graphopt.io", "graphopt.verify", "graphopt.progress",
                     "graphopt.cpu")
# Above the passes: neither passes nor verify may import these.
ABOVE_PASSES = ("graphopt.cli", "graphopt.optimize", "graphopt.api", "graphopt.report", "graphopt.package",
                "graphopt.recipe", "graphopt.torch", "graphopt.evaluate")


@dataclasses.dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    lazy: bool  # inside a function: runs when called, not when the importer loads
    line: int

    def __str__(self) -> str:
        where = "in a function" if self.lazy else "at module level"
        return f"{self.importer}:{self.line} imports {self.imported} ({where})"


def modules(root: Path = SOURCE) -> dict[str, Path]:
    """Dotted name → file of every module and package of graphopt."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(known: Mapping[str, Path]) -> list[Import]:
    """Every import of a graphopt module by a graphopt module."""
    found = []
    for importer, path in known.items():
        package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        found += _imports_of(importer, package, ast.parse(path.read_text(encoding="utf-8")), known)
    return found


def _imports_of(importer: str, package: str, tree: ast.Module, known: Mapping[str, Path]) -> list[Import]:
    found = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = _absolute(child, package)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                           for alias in child.names]
            else:
                visit(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
                continue
            for target in targets:
                module = _known_prefix(target, known)
                if module is not None and module != importer:
                    found.append(Import(importer, module, lazy, child.lineno))

    visit(tree, lazy=False)
    return found


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def _known_prefix(name: str, known: Mapping[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def find_cycle(edges: Iterable[tuple[str, str]]) -> list[str] | None:
    """A cycle of the directed graph as [a, b, …, a], or None."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    done: set[str] = set()

    def walk(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            cycle = walk(nxt, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = walk(start, [])
        if cycle:
            return cycle
    return None


def _within(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.fixture(scope="module")
def graph() -> list[Import]:
    return imports(modules())


# -- the scanner sees what is there -----------------------------------------------------------


def test_the_scanner_sees_module_level_function_level_and_submodule_imports(graph):
    edges = {(i.importer, i.imported, i.lazy) for i in graph}
    assert ("graphopt.cli", "graphopt.errors", False) in edges
    assert ("graphopt.cli", "graphopt.optimize", True) in edges  # inside cmd_optimize
    assert ("graphopt.verify.compare", "graphopt.verify.latency", False) in edges  # from graphopt.verify import latency


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]) == ["a", "b", "c", "a"]
    assert find_cycle([("a", "b"), ("a", "c"), ("b", "c")]) is None


# -- the rules ------------------------------------------------------------------------------


def test_no_import_cycle_at_module_level(graph):
    assert find_cycle((i.importer, i.imported) for i in graph if not i.lazy) is None


def test_no_import_cycle_through_lazy_imports_either(graph):
    """Nothing in the tree needs a lazy import to break a cycle; keep it that way."""
    assert find_cycle((i.importer, i.imported) for i in graph) is None


def test_passes_import_only_passes_and_the_layers_below(graph):
    """Allowed: graphopt.passes.*, errors, io, verify.* (the measuring layer), progress."""
    wrong = [str(i) for i in graph if _within(i.importer, ["graphopt.passes"])
             and not _within(i.imported, PASSES_MAY_IMPORT)]
    assert wrong == []


def test_verify_imports_neither_passes_nor_anything_above_them(graph):
    wrong = [str(i) for i in graph if _within(i.importer, ["graphopt.verify"])
             and _within(i.imported, ["graphopt.passes", *ABOVE_PASSES])]
    assert wrong == []


@pytest.mark.parametrize("part", ["passes", "verify", "report", "package", "torch"])
def test_the_top_level_folders_name_the_parts(part):
    assert (SOURCE / part / "__init__.py").is_file()


def test_the_command_line_is_one_module():
    assert (SOURCE / "cli.py").is_file() and not (SOURCE / "cli").exists()


def test_the_decoder_layout_is_spelled_in_one_module():
    """The KV cache's names (onnxruntime-genai's layout) live in graphopt/verify/layout.py."""
    spelled = [str(path.relative_to(SOURCE)) for path in SOURCE.rglob("*.py")
               if path.name != "layout.py" and any('"past_key_values.' in line or "'past_key_values." in line
                                                  or 'f"past_key_values' in line or '"present.' in line
                                                  for line in path.read_text().splitlines())]
    assert spelled == []


def _source_trees(under: str = "") -> Iterable[tuple[str, ast.Module]]:
    for path in sorted((SOURCE / under).rglob("*.py")):
        yield str(path.relative_to(SOURCE)), ast.parse(path.read_text())


def test_only_verify_defines_verdicts_and_searches():
    """One judging protocol: every verdict type is a ``verify.judge.Verdict`` defined under
    verify/; a pass that searches uses ``verify.search`` (no bisection of its own)."""
    outside = []
    for name, tree in _source_trees():
        if name.startswith("verify/"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Verdict"):
                outside.append(f"{name}: class {node.name}")
            # a hand-written bisection: ``(low + high) // 2`` or ``(low + high) / 2``
            if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.FloorDiv, ast.Div)) \
                    and isinstance(node.left, ast.BinOp) and isinstance(node.left.op, ast.Add) \
                    and isinstance(node.right, ast.Constant) and node.right.value == 2 \
                    and all(isinstance(side, ast.Name) for side in (node.left.left, node.left.right)):
                outside.append(f"{name}:{node.lineno}: bisection")
    assert outside == []


def test_no_pass_decides_pass_or_fail():
    """Passes return their best result; only optimize (and the commands) raise GateFailed."""
    raising = [f"{name}:{node.lineno}" for name, tree in _source_trees("passes") for node in ast.walk(tree)
               if isinstance(node, ast.Raise) and node.exc is not None
               and "GateFailed" in ast.unparse(node.exc)]
    assert raising == []
