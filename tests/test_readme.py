"""The README's Python API section, run as written on a small model (doc-tests)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import linear_model, save

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks(section: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {section}")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_the_python_api_section_has_its_examples():
    assert len(_python_blocks("Python API")) == 2


def test_python_api_examples_run_as_written(tmp_path, monkeypatch, rng, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    save(linear_model(rng, k=8, n=4), tmp_path / "model.onnx")
    for index, block in enumerate(_python_blocks("Python API")):
        exec(compile(block, f"README.md (Python API block {index})", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("True cosine (mean per sample)")
    assert lines[1].startswith("True {") or lines[1].startswith("False {")
    assert (tmp_path / "model.int8.onnx").is_file() and (tmp_path / "bundle.zip").is_file()
