"""The README's Python API section, run as written on a small model (doc-tests)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

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


# -- command blocks -------------------------------------------------------------------------------

# Lines of the README's shell blocks that set up the machine rather than use graphopt: `make`
# (the two commands themselves, run by CI) and `pip install`.
_SETUP = ("make ", "pip ")


def _shell_blocks() -> list[tuple[int, list[str]]]:
    """(README line, commands) of every ```bash block, continuations joined, comments and
    `[optional …]` parts removed, setup lines left out."""
    text = README.read_text(encoding="utf-8")
    blocks = []
    for block in re.finditer(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block.group(1))
        commands = [re.sub(r"\s+#.*$", "", re.sub(r"\s*\[[^\]]*\]", "", line)).strip() for line in joined.splitlines()]
        commands = [c for c in commands if c and not c.startswith(_SETUP)]
        if commands:
            blocks.append((text[: block.start()].count("\n") + 2, commands))
    return blocks


def _from_example(commands: list[str]) -> bool:
    return any(c.startswith("python examples/") for c in commands)


def _stand_ins(folder: Path, *, decoder: bool = False) -> None:
    """Small files under the names the README's commands use."""
    import numpy as np
    import onnx
    from onnx import helper

    from tests.conftest import make_model, tensor

    rng = np.random.default_rng(0)
    # Heavy enough (a few milliseconds a batch) that a latency ratio between two copies is not
    # noise: at 256 wide, two copies once measured 1.31 against the README's 1.3 bound.
    w = rng.standard_normal((256, 1024)).astype(np.float32) * 0.1
    classifier = make_model([helper.make_node("MatMul", ["X", "W"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                             helper.make_node("MatMul", ["r", "W2"], ["logits"])],
                            [tensor("X", ["N", 256])], [tensor("logits", ["N", 10])],
                            [w, rng.standard_normal((1024, 10)).astype(np.float32) * 0.1], names=["W", "W2"])
    for name in ("base.onnx", "candidate.onnx", "minilm.onnx", "det.onnx"):
        onnx.save(classifier, folder / name)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    for name in ("eval.npz", "calib.npz", "images.npz"):
        np.savez(folder / name, X=x)
    np.savez(folder / "labelled.npz", X=x, labels=rng.integers(0, 10, 64))
    if decoder:  # the decoder section's stand-ins
        from graphopt.samples import SENTENCES_FILE
        from tests.conftest import tiny_llama

        tiny_llama(folder / "llm-folder")
        (folder / "prose.txt").write_text(SENTENCES_FILE.read_text(encoding="utf-8")[:20000], encoding="utf-8")
        (folder / "prompts.json").write_text('["The capital of France is", "Once upon a time"]', encoding="utf-8")


def test_readme_has_the_commands_it_documents():
    commands = [c for _, block in _shell_blocks() for c in block]
    assert any(c.startswith("graphopt check") for c in commands)
    assert any(c.startswith("graphopt package") for c in commands)


@pytest.mark.parametrize(("line", "commands"), [b for b in _shell_blocks() if not _from_example(b[1])],
                         ids=lambda value: f"line{value}" if isinstance(value, int) else "")
def test_readme_command_blocks_run_as_written(line, commands, tmp_path, monkeypatch, capsys):
    """Each block of graphopt commands in the README, in order, on small stand-ins for its files."""
    from graphopt.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    decoder = any("llm-folder" in command for command in commands)
    if decoder:
        pytest.importorskip("transformers")
    _stand_ins(tmp_path, decoder=decoder)
    for command in commands:
        assert main(shlex.split(command)[1:]) == 0, f"README line {line}: {command}\n{capsys.readouterr().err}"


@pytest.mark.slow
@pytest.mark.parametrize(("line", "commands"), [b for b in _shell_blocks() if _from_example(b[1])],
                         ids=lambda value: f"line{value}" if isinstance(value, int) else "")
def test_readme_example_blocks_run_as_written(line, commands, tmp_path, monkeypatch, capsys):
    """Blocks that start from an example script (torch, scikit-learn): the script, then its commands."""
    import subprocess
    import sys

    from graphopt.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    for command in commands:
        args = shlex.split(command)
        if args[0] == "python":
            subprocess.run([sys.executable, str(README.parent / args[1]), *args[2:]], check=True, cwd=tmp_path)
        else:
            assert main(args[1:]) == 0, f"README line {line}: {command}\n{capsys.readouterr().err}"
