"""Every graphopt subcommand as an argument list, for running it on a hostile model.

Each builder takes the model and an empty output folder; everything a command may write goes
into that folder, so "nothing written" is "the folder is still empty". ``evaluate`` is listed
only when the installed CLI has it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from graphopt.cli import build_parser

CommandBuilder = Callable[[Path, Path, Path], list[str]]


def subcommands() -> set[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")  # argparse has no public accessor
    return set(action.choices)


def write_feeds(folder: Path) -> Path:
    """Feeds for the corpus's base signature X[1,4] (for `evaluate --metric cosine`, no labels)."""
    path = folder / "feeds.npz"
    rng = np.random.default_rng(0)
    np.savez(path, X=rng.standard_normal((8, 4)).astype(np.float32))
    return path


COMMANDS: dict[str, CommandBuilder] = {
    "inspect": lambda model, out, data: ["inspect", str(model)],
    "optimize": lambda model, out, data: ["optimize", str(model), "-o", str(out / "out.onnx"), "--no-latency",
                                          "--report", str(out / "report.json")],
    "check": lambda model, out, data: ["check", str(model), str(model), "--json", str(out / "r.json")],
    "bench": lambda model, out, data: ["bench", str(model), "--runs", "3", "--json", str(out / "r.json")],
    "package": lambda model, out, data: ["package", str(model), "-o", str(out / "bundle.zip")],
    "evaluate": lambda model, out, data: ["evaluate", str(model), "--data", str(data), "--holdout", "0.5",
                                          "--recipe", "lossless", "--metric", "cosine",
                                          "--json", str(out / "r.json")],
}


def available_commands() -> list[str]:
    present = subcommands()
    return sorted(name for name in COMMANDS if name in present)
