"""The same command twice writes the same bytes: lossless, int8 (with its speed profile cached
in a per-test GRAPHOPT_CACHE_DIR), and with external data. Each run is its own process with
its own PYTHONHASHSEED, so an order that depends on set or dict hashing shows up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.reliability.models import conv, mlp


def _optimize(model: Path, out: Path, *args: str, hash_seed: int, cache: Path) -> None:
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "GRAPHOPT_CACHE_DIR": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "graphopt", "optimize", str(model), "-o", str(out),
                           "--no-latency", "-q", *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _twice(model: Path, tmp_path: Path, *args: str) -> tuple[dict[str, bytes], dict[str, bytes]]:
    cache = tmp_path / "cache"
    runs = []
    for run, hash_seed in enumerate((1, 2)):
        folder = tmp_path / f"run{run}"
        folder.mkdir()
        _optimize(model, folder / "out.onnx", *args, hash_seed=hash_seed, cache=cache)
        runs.append(_files(folder))
    return runs[0], runs[1]


@pytest.fixture
def calibration(tmp_path) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, X=np.random.default_rng(0).standard_normal((48, 32)).astype(np.float32))
    return path


@pytest.mark.parametrize("external", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["inline", "external-data"])
def test_lossless_twice_gives_identical_bytes(tmp_path, external):
    model = tmp_path / "model.onnx"
    onnx.save(conv(), model)
    first, second = _twice(model, tmp_path, *(["--external-data"] if external else []))
    assert list(first) == (["out.onnx", "out.onnx.data"] if external else ["out.onnx"])
    assert first == second


@pytest.mark.slow  # four processes importing onnxruntime, and a speed profile
def test_int8_twice_gives_identical_bytes(tmp_path, calibration):
    model = tmp_path / "model.onnx"
    onnx.save(mlp(), model)
    first, second = _twice(model, tmp_path, "--recipe", "int8", "--calib", str(calibration))
    assert first == second
    quantized = onnx.load_from_string(first["out.onnx"])
    assert {i.data_type for i in quantized.graph.initializer} & {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    assert (tmp_path / "cache" / "speed-profile.json").is_file()  # the second run read the first's profile

