"""`import graphopt` must stay light: no torch, no onnxruntime until a command needs them."""

from __future__ import annotations

import subprocess
import sys


def test_import_graphopt_loads_neither_torch_nor_onnxruntime():
    code = (
        "import sys, graphopt, graphopt.passes, graphopt.recipe, graphopt.cli, graphopt.optimize; "
        "heavy = sorted(m for m in ('torch', 'onnxruntime', 'onnxsim') if m in sys.modules); "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
