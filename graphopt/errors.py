"""The one error hierarchy of graphopt.

The library raises these and never prints or exits; the CLI turns each into one line on
stderr and the exit code its class carries (documented in README):

- 1: a gate or a parity budget failed (:class:`GateFailed`)
- 2: bad input or usage (:class:`InputError` and subclasses)
- 3: internal error (:class:`GraphoptError` itself, :class:`PassFailed`)
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class GraphoptError(Exception):
    """Base of every error graphopt raises on purpose."""

    exit_code = EXIT_INTERNAL


class InputError(GraphoptError):
    """The user gave something graphopt cannot work with."""

    exit_code = EXIT_BAD_INPUT


class UsageError(InputError):
    """Wrong command-line or API usage (for example: output path equal to input path)."""


class InvalidModelError(InputError):
    """The file is not a valid ONNX model (not protobuf, truncated, dangling input, NaN weights…)."""


class UnsafeModelError(InvalidModelError):
    """The model tries to reach outside its folder (external data paths, links)."""


class RecipeError(InputError):
    """A recipe is malformed: unknown pass, unknown option, wrong option type."""


class TargetError(InputError):
    """A package target is unknown or malformed: unknown key, wrong type, empty allow-list."""


class UnsupportedByTarget(InputError):
    """The model needs operators or an opset the package target does not provide."""


class DataError(InputError):
    """Input data (feeds, calibration data) does not match what the model expects."""


class UnsupportedModelError(InputError):
    """A valid model uses something a pass cannot handle (an opset the converter cannot
    upgrade, an operator with no rewrite): the run stops at that pass, naming what."""


class MissingExtraError(UsageError):
    """An optional dependency a command needs is not installed (``require_extra``)."""


def require_extra(module: str, *, extra: str, purpose: str) -> ModuleType:
    """``module`` imported, or MissingExtraError (exit 2) naming what needs it and the extra that
    installs it — the same way from every command, pass and recipe."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(f"{purpose} needs {module.split('.')[0]}: pip install 'graphopt[{extra}]' "
                                f"({reason(exc, 120)})") from None


class PassFailed(GraphoptError):
    """A pass produced an invalid model: a bug in graphopt or an unsupported model."""


class GateFailed(GraphoptError):
    """A measured value missed a stated threshold; ``failures`` names each one and ``report``
    (when the command measured one) holds everything it measured."""

    exit_code = EXIT_GATE_FAILED

    def __init__(self, message: str, failures: list[str] | None = None, report: dict | None = None):
        super().__init__(message)
        self.failures = list(failures or [])
        self.report = report


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def reason(exc: BaseException, limit: int = 300) -> str:
    """Another tool's exception as one readable line for a graphopt message: terminal colour
    codes removed, the first non-empty line, shortened at a word boundary."""
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return (cut if len(cut) > limit // 2 else text[:limit]) + " …"
