from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import pytest


@pytest.fixture
def save(tmp_path: Path) -> Callable[[onnx.ModelProto, str], Path]:
    """Write a model into the test's temporary folder and return its path."""

    def write(model: onnx.ModelProto, name: str) -> Path:
        path = tmp_path / name
        onnx.save(model, path)
        return path

    return write
