"""Every subcommand on every hostile model: exit 2, one line naming the problem, no traceback,
nothing written, and nothing opened outside the model's folder.

tests/test_cli.py checks inspect/optimize/check/bench for exit code, message and output;
this file adds the remaining subcommands and, for all of them, what was opened.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from graphopt.cli import main
from tests.hostile.corpus import HostileCase, build_corpus, outside_dir
from tests.reliability.commands import COMMANDS, available_commands, write_feeds
from tests.test_cli import COMMANDS as COVERED_BY_TEST_CLI

SECRET_NAMES = {"secret.bin", "secret-subgraph.bin", "hardlink-original.bin", "absolute-secret.bin",
                "symlink-target.bin"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[HostileCase]:
    return build_corpus(tmp_path_factory.mktemp("hostile") / "corpus")


@pytest.fixture(scope="module")
def feeds(tmp_path_factory) -> Path:
    return write_feeds(tmp_path_factory.mktemp("feeds"))


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main([*argv, "-q"])
    return code, capsys.readouterr().err.strip().splitlines()


def _expected_words(case: HostileCase, command: str) -> tuple[str, ...]:
    if command == "evaluate" and case.name == "absurd-dims":
        # evaluate needs real data, so the declared shape is refused against the data's.
        return (str(2**40),)
    return case.expect


@pytest.mark.parametrize("command", [c for c in available_commands() if c not in COVERED_BY_TEST_CLI])
def test_other_commands_refuse_every_hostile_model(command, corpus, feeds, tmp_path, capsys):
    for case in corpus:
        out = tmp_path / case.name
        out.mkdir()
        code, err = _run(COMMANDS[command](case.model, out, feeds), capsys)
        assert code == 2, (case.name, err)
        assert len(err) == 1 and "Traceback" not in err[0], (case.name, err)
        assert any(word in err[0].lower() for word in _expected_words(case, command)), (case.name, err)
        assert list(out.iterdir()) == [], case.name


class _OpenRecorder:
    """Records every path Python opens (``open``, ``os.open``) through an audit hook.

    Audit hooks cannot be removed, so one hook is installed per process and switched on and off.
    It sees Python-level opens only; the strace test below also sees onnx's and onnxruntime's C++.
    """

    _instance: _OpenRecorder | None = None

    def __init__(self) -> None:
        self.paths: list[str] | None = None
        sys.addaudithook(self._hook)

    @classmethod
    def get(cls) -> _OpenRecorder:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _hook(self, event: str, args: tuple) -> None:
        if self.paths is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
            path = args[0].decode(errors="replace") if isinstance(args[0], bytes) else str(args[0])
            self.paths.append(path)

    @contextlib.contextmanager
    def recording(self):
        self.paths = []
        try:
            yield self.paths
        finally:
            self.paths = None


def _forbidden(opened: list[str], case: HostileCase, corpus_root: Path) -> list[str]:
    """Opened paths inside the corpus (or its outside sibling) other than the case's model file."""
    watched = (corpus_root.resolve(), outside_dir(corpus_root))
    bad = []
    for raw in opened:
        # Not resolved: opening a symlink by its own name counts as opening that name.
        path = Path(raw) if Path(raw).is_absolute() else Path.cwd() / raw
        if path.name in SECRET_NAMES:
            bad.append(raw)
        elif any(path.is_relative_to(folder) for folder in watched) and path != case.model:
            bad.append(raw)
    return bad


def test_no_command_opens_anything_outside_the_model_folder(corpus, feeds, tmp_path, capsys):
    recorder = _OpenRecorder.get()
    corpus_root = corpus[0].model.parent.parent
    for command in available_commands():
        for case in corpus:
            out = tmp_path / f"{command}-{case.name}"
            out.mkdir()
            with recorder.recording() as opened:
                _run(COMMANDS[command](case.model, out, feeds), capsys)
            assert case.loads or str(case.model) in opened or case.name == "empty-file", (command, case.name)
            assert _forbidden(opened, case, corpus_root) == [], (command, case.name)


def naive_external_read(model: Path) -> None:
    """What a loader without graphopt's checks does: open each location beside the model."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                (model.parent / entry.value).read_bytes()


def test_the_recorder_sees_a_naive_loader_read_the_secret(corpus):
    """The check above can fail: a naive loader following '../secret.bin' is caught."""
    recorder = _OpenRecorder.get()
    case = next(c for c in corpus if c.name == "external-dotdot")
    with recorder.recording() as opened:
        naive_external_read(case.model)
    assert _forbidden(opened, case, case.model.parent.parent) != []


_STRACE_DRIVER = """
import contextlib, io, sys
from pathlib import Path
from graphopt.cli import main
from tests.hostile.corpus import build_corpus
from tests.reliability.commands import COMMANDS, available_commands, write_feeds
work = Path(sys.argv[1])
cases = [c for c in build_corpus(work / "corpus") if c.unsafe]
feeds = write_feeds(work)
with contextlib.suppress(OSError):  # the corpus was written before this marker
    open("/nonexistent-graphopt-start-marker")
for command in available_commands():
    for case in cases:
        out = work / f"out-{command}-{case.name}"
        out.mkdir()
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            assert main([*COMMANDS[command](case.model, out, feeds), "-q"]) == 2, (command, case.name)
        assert not any(out.iterdir())
# Positive control, after a marker: a naive loader must show up in the trace.
with contextlib.suppress(OSError):
    open("/nonexistent-graphopt-control-marker")
from tests.reliability.test_hostile_commands import naive_external_read
naive_external_read(next(c for c in cases if c.name == "external-dotdot").model)
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_strace_every_command_on_unsafe_models_opens_no_secret(tmp_path):
    """All processes and threads, C++ included (onnx checker, onnxruntime, the ORT converter)."""
    trace = tmp_path / "trace.txt"
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(trace),
         sys.executable, "-c", _STRACE_DRIVER, str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = trace.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "graphopt-start-marker" in line)
    marker = next(i for i, line in enumerate(lines) if "graphopt-control-marker" in line)
    opened = [m[1] for line in lines if (m := re.search(r'open(?:at2?)?\((?:[^,]+, )?"([^"]*)"', line))]
    assert len(opened) > 100  # the trace really covers the run
    window = "\n".join(lines[start:marker])
    for name in ("external-absolute", "external-dotdot", "external-symlink", "external-hardlink",
                 "subgraph-external-dotdot"):
        assert f"{name}/model.onnx" in window, name

    def secret(line: str) -> bool:
        return any(f'/{name}"' in line or f'"{name}"' in line or f'../{name}"' in line for name in SECRET_NAMES) \
            or "external-symlink/weights.bin" in line or "external-hardlink/weights.bin" in line

    assert [line for line in lines[start:marker] if secret(line)] == []
    assert any(secret(line) for line in lines[marker:]), "the control run should have read the secret"
