"""Interrupted `optimize` runs leave nothing behind: no output, no staging folder.

SIGINT (Ctrl-C, a CI runner's cancel) is handled: exit 130 with one line, the staging folder
removed. SIGKILL cannot be handled: its staging folder stays, and the next run writing the
same output removes it once it is older than ``STALE_STAGING_SECONDS`` and its process is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.io import STALE_STAGING_SECONDS, load_model, remove_stale_staging, save_model
from tests.conftest import linear_model

LAYERS, WIDTH, SAMPLES = 24, 512, 300


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> tuple[Path, Path]:
    """24 MatMul+Relu layers of 512×512 (25 MB) and 300 samples: a few seconds of work."""
    folder = tmp_path_factory.mktemp("slow")
    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "X"
    for i in range(LAYERS):
        weights.append(numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH))
                                               .astype(np.float32), f"W{i}"))
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"]), helper.make_node("Relu", [f"h{i}"], [f"r{i}"])]
        x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["Y"]))
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", WIDTH])], weights)
    model = folder / "model.onnx"
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]), model)
    data = folder / "data.npz"
    np.savez(data, X=rng.standard_normal((SAMPLES, WIDTH)).astype(np.float32))
    return model, data


def _interruptible() -> None:
    """A shell starts background jobs with SIGINT ignored, and children inherit that: a test
    run launched with `&` would otherwise see Ctrl-C ignored, as POSIX wants."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(model: Path, data: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "graphopt", "optimize", str(model), "-o", str(out), "--data", str(data),
         "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_interruptible,
    )


def _staging(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and p.name.endswith(".graphopt-tmp")]


def _wait_for_staging(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not _staging(out):
        assert proc.poll() is None, f"finished before staging: {proc.communicate()}"
        assert time.monotonic() < deadline, "no staging folder appeared"
        time.sleep(0.02)


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


def _wait_for_library(proc: subprocess.Popen, name: str) -> None:
    maps = Path(f"/proc/{proc.pid}/maps")
    if not maps.exists():
        pytest.skip("needs /proc to see what the process has loaded")
    while name not in maps.read_text():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)


def _wait_for_line(proc: subprocess.Popen, text: str) -> list[str]:
    seen = []
    while not seen or text not in seen[-1]:
        line = proc.stderr.readline()
        assert line, f"ended before '{text}': {seen}"
        seen.append(line)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("when", ["during passes", "while staged"])
def test_sigint_exits_130_and_leaves_nothing(slow_model, tmp_path, when):
    model, data = slow_model
    out = tmp_path / "out.onnx"
    proc = _start(model, data, out)
    seen = []
    if when == "during passes":
        seen = _wait_for_line(proc, "graphopt: loaded")  # then: reference outputs, simplify…
        assert not _staging(out)
    else:
        _wait_for_staging(proc, out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = "".join(seen) + err
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "graphopt: interrupted; nothing was written"
    assert "Traceback" not in err
    assert _leftovers(out) == []


@pytest.mark.slow
@pytest.mark.parametrize("library", ["onnx_cpp2py_export", "onnxruntime_pybind11_state"])
def test_sigint_while_native_libraries_load_exits_130(slow_model, tmp_path, library):
    """Interrupted inside onnx's initialization the interpreter used to die of SIGSEGV (about
    half the time), inside onnxruntime's with an ImportError (exit 3): tried several times."""
    model, _ = slow_model
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-m", "graphopt", "bench", str(model), "--runs", "1",
                                 "--json", str(tmp_path / "bench.json")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_interruptible)
        _wait_for_library(proc, library)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, (attempt, err)
        assert err.strip().splitlines() == ["graphopt: interrupted; nothing was written"]
        assert list(tmp_path.iterdir()) == []


def _staged_run(slow_model, out):
    """An optimize run that has begun writing its output (its staging folder exists)."""
    model, data = slow_model
    proc = _start(model, data, out)
    _wait_for_staging(proc, out)
    return proc


@pytest.mark.slow
def test_sigterm_is_handled_as_an_interrupt(slow_model, tmp_path):
    """`timeout` and CI runners' cancel send SIGTERM."""
    out = tmp_path / "out.onnx"
    proc = _staged_run(slow_model, out)
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "graphopt: interrupted; nothing was written"
    assert _leftovers(out) == []


@pytest.mark.slow
def test_sigkill_leaves_a_staging_folder_that_the_next_run_removes(slow_model, tmp_path):
    out = tmp_path / "out.onnx"
    proc = _staged_run(slow_model, out)
    proc.kill()
    proc.wait(timeout=30)
    left = _staging(out)
    assert len(left) == 1 and not out.exists()  # a killed process cannot clean up

    # Younger than the threshold, it is kept (it could belong to a run on another host).
    onnx.save(linear_model(np.random.default_rng(0)), tmp_path / "small.onnx")
    save_model(load_model(tmp_path / "small.onnx").model, out)
    assert _staging(out) == left

    old = time.time() - STALE_STAGING_SECONDS - 60
    os.utime(left[0], (old, old))
    save_model(load_model(tmp_path / "small.onnx").model, out)
    assert _staging(out) == [] and out.exists()


def _stale_folder(parent: Path, name: str, age: float) -> Path:
    folder = parent / name
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"partial")
    stamp = time.time() - age
    os.utime(folder, (stamp, stamp))
    return folder


def test_remove_stale_staging_touches_only_old_folders_of_that_output_whose_process_is_gone(tmp_path):
    dead_pid = 2**22 + 12345  # above pid_max's default: no such process
    out = tmp_path / "out.onnx"
    old = STALE_STAGING_SECONDS + 10
    stale = _stale_folder(tmp_path, f".out.onnx.{dead_pid}-abc123.graphopt-tmp", old)
    no_pid = _stale_folder(tmp_path, ".out.onnx.k2j_x9.graphopt-tmp", old)  # package.py's naming
    young = _stale_folder(tmp_path, f".out.onnx.{dead_pid}-young1.graphopt-tmp", 5)
    alive = _stale_folder(tmp_path, f".out.onnx.{os.getpid()}-alive1.graphopt-tmp", old)
    other = _stale_folder(tmp_path, f".other.onnx.{dead_pid}-abc123.graphopt-tmp", old)
    longer = _stale_folder(tmp_path, f".out.onnx.data.{dead_pid}-abc123.graphopt-tmp", old)
    user = _stale_folder(tmp_path, ".out.onnx.backup", old)
    removed = remove_stale_staging(out)
    assert sorted(removed) == sorted([stale, no_pid])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (young, alive, other, longer, user))


def test_a_symlinked_staging_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    link = tmp_path / f".out.onnx.{2**22 + 1}-abc.graphopt-tmp"
    link.symlink_to(victim)
    os.utime(link, (0, 0), follow_symlinks=False)
    assert remove_stale_staging(tmp_path / "out.onnx") == []
    assert (victim / "keep.txt").read_text() == "keep"
