"""`graphopt package`: a verified, reproducible edge bundle of one model.

Load (safely) → check the target → stage beside the output: the ``.onnx`` copied byte-exact
with its external data, an ORT-format copy and the required-operators ``.config`` from
onnxruntime's own converter → verify that the ``.ort`` computes what the ``.onnx`` computes →
``SUMMARY.txt`` and ``manifest.json`` → commit atomically, as a zip or a folder.

Packaging the same model twice gives the same bytes: zip members have fixed dates, order and
permissions; the manifest holds no dates and no absolute paths; and the ``.ort`` is rewritten
into a canonical form, because onnxruntime serializes one of its tables from a hash map
whose order changes from process to process (see ``graphopt.package.ortformat``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from graphopt import __version__
from graphopt.errors import GateFailed, InputError, UsageError
from graphopt.io import (
    LoadedModel,
    fsync_dir,
    load_model,
    remove_stale_staging,
    save_model,
    side_files,
    to_json,
)
from graphopt.package.ortformat import Conversion, convert_to_ort
from graphopt.package.targets import Target, check_model, load_target
from graphopt.report.inspection import DataFile, ModelDescription, ValueInfo, describe
from graphopt.report.records import DataRecord, to_record
from graphopt.verify.feeds import DataSource
from graphopt.verify.gate import CheckResult
from graphopt.verify.parity import ParityReport

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "graphopt-bundle/1"
MANIFEST = "manifest.json"
SUMMARY = "SUMMARY.txt"
DEFAULT_MAX_ABS = 1e-4
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_FILE_MODE = 0o644
_DIR_MODE = 0o755
_MODEL_KEYS = ("ir_version", "producer", "opsets", "inputs", "outputs", "nodes", "ops", "parameters")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackageOptions:
    data: DataSource = None
    batch_size: int = 1
    shapes: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    seed: int = 0
    # One thread by default: the parity numbers in the manifest must not depend on the core count.
    threads: int = 1
    max_abs: float = DEFAULT_MAX_ABS
    target: str | Path | None = None
    report: str | Path | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class BundleNames:
    """The bundle's own files: the model (always ending in .onnx), its ORT copy and the config."""

    model: str
    ort: str
    config: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class BundleModel:
    file: str
    description: ModelDescription
    external_data: tuple[str, ...]
    normalized: str | None = None  # what the copy changed (a legacy IR 3 model), else byte-exact
    folder_files: tuple[str, ...] = ()  # a model folder's other files, carried beside the model

    def to_dict(self) -> dict[str, Any]:
        described = self.description.to_dict()
        data = {"file": self.file, **{key: described[key] for key in _MODEL_KEYS},
                "external_data": list(self.external_data)}
        if self.normalized:
            data.update(normalized=self.normalized)
        if self.folder_files:
            data.update(folder_files=list(self.folder_files))
        return data


@dataclasses.dataclass(frozen=True, kw_only=True)
class BundleVerification:
    """The .ort against the .onnx at the level an ORT file stores (``parity``, gated by
    ``max_abs_budget``), and against the .onnx with optimizations off (recorded only)."""

    data: DataRecord
    threads: int
    max_abs_budget: float
    parity: ParityReport
    unoptimized: ParityReport
    checks: tuple[CheckResult, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": dataclasses.asdict(self.data),
            "threads": self.threads,
            "max_abs_budget": self.max_abs_budget,
            "parity": self.parity.to_dict(),
            "unoptimized_onnx": {"max_abs": self.unoptimized.max_abs, "cosine_min": self.unoptimized.cosine_min},
            "checks": [check.to_dict() for check in self.checks],
            "passed": True,
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class FileEntry(DataFile):
    """A file of the bundle, its path relative to the bundle."""

    sha256: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Manifest:
    """``manifest.json``: what the bundle holds, how it was made and verified."""

    graphopt: str
    onnxruntime: str
    model: BundleModel
    names: BundleNames
    conversion: Conversion
    target: Target | None
    verification: BundleVerification
    optimization: dict[str, Any] | None  # optimize's JSON report as given, machine paths cut to file names
    files: tuple[FileEntry, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "graphopt": self.graphopt,
            "onnxruntime": self.onnxruntime,
            "model": self.model.to_dict(),
            "ort": {"file": self.names.ort, "config": self.names.config, **self.conversion.to_dict()},
            "target": self.target.to_dict() if self.target else None,
            "verification": self.verification.to_dict(),
            "optimization": self.optimization,
            "files": [dataclasses.asdict(entry) for entry in self.files],
        }


def package(model_path: str | os.PathLike, output: str | os.PathLike, options: PackageOptions) -> Manifest:
    """Write the bundle of ``model_path`` to ``output`` (``.zip``: a zip file; otherwise a
    folder) and return its manifest. Nothing is written unless the ``.ort`` loads in
    onnxruntime and matches the ``.onnx`` within ``options.max_abs`` (else GateFailed)."""
    from graphopt.verify.feeds import input_specs, load_feeds

    out = Path(output)
    as_zip = out.suffix.lower() == ".zip"
    target = load_target(options.target) if options.target is not None else None
    paths = [p for p in (options.report, options.data) if isinstance(p, (str, os.PathLike))]
    _check_output(out, as_zip, [Path(model_path), *(Path(p) for p in paths)])
    loaded = load_model(model_path)
    _check_output(out, as_zip, list(loaded.files))
    if target is not None:
        check_model(target, loaded.model, loaded.path.name)
    report = _load_report(Path(options.report)) if options.report else None
    feeds = load_feeds(options.data, input_specs(loaded.model), batch_size=options.batch_size,
                       shapes=options.shapes, seed=options.seed)
    if isinstance(options.data, (str, os.PathLike)):
        feeds.source = Path(feeds.source).name  # the manifest names nothing of the machine

    # Named like optimize's (with the PID) so that a killed run's folder is recognised and removed
    # by the next one. Absolute: the converter runs in a folder of its own.
    remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}-", suffix=".graphopt-tmp",
                                    dir=out.parent)).resolve()
    try:
        bundle = staging / "bundle"
        names = _bundle_names(loaded)
        normalized = _copy_model(loaded, bundle, names.model)
        carried = _copy_side_files(Path(model_path), loaded, bundle, names)
        conversion = _convert(bundle / names.model, bundle, names, target, staging / "convert")
        verification = _verify(bundle / names.model, bundle / names.ort, feeds, options,
                               stored_level=_stored_level(conversion.optimization_level))
        manifest = _manifest(loaded, names, target, conversion, verification, report, normalized, carried)
        files = tuple(_file_entry(bundle, name) for name in _bundle_files(bundle))
        (bundle / SUMMARY).write_text(_summary_text(manifest, files), encoding="utf-8")
        manifest = dataclasses.replace(manifest, files=(_file_entry(bundle, SUMMARY), *files))
        (bundle / MANIFEST).write_text(to_json(manifest.to_dict()), encoding="utf-8")
        _normalize_tree(bundle)
        if as_zip:
            _write_zip(bundle, staging / "bundle.zip")
            os.replace(staging / "bundle.zip", out)
        else:
            _commit_folder(bundle, out, staging / "previous")
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


# -- output ----------------------------------------------------------------------------------


def _check_output(out: Path, as_zip: bool, inputs: list[Path]) -> None:
    """Refuse an output that would overwrite or swallow an input, or replace a stranger's folder."""
    for source in inputs:
        if out.resolve() == source.resolve() or (out.exists() and source.exists() and os.path.samefile(out, source)):
            raise UsageError(f"{out}: output would overwrite the input file {source}")
        if not as_zip and source.resolve().is_relative_to(out.resolve()):
            raise UsageError(f"{out}: output folder holds the input file {source}; choose another -o")
    if not out.parent.is_dir():
        raise UsageError(f"{out}: output folder {out.parent} does not exist")
    if as_zip and out.is_dir():
        raise UsageError(f"{out}: is a folder; a .zip output must be a file")
    if not as_zip and out.exists() and not _is_replaceable_folder(out):
        raise UsageError(f"{out}: exists and is not a graphopt bundle folder; choose another -o or remove it")


def _is_replaceable_folder(path: Path) -> bool:
    if not path.is_dir() or path.is_symlink():
        return False
    if not any(path.iterdir()):
        return True
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("format") == BUNDLE_FORMAT
    return False


def _commit_folder(bundle: Path, out: Path, previous: Path) -> None:
    """Rename the staged folder into place; an earlier bundle there moves into staging first
    (and is deleted with it)."""
    if out.exists():
        if not _is_replaceable_folder(out):  # it changed since the first check
            raise UsageError(f"{out}: exists and is not a graphopt bundle folder; choose another -o or remove it")
        os.rename(out, previous)
    try:
        os.rename(bundle, out)
    except BaseException:
        if previous.exists():
            os.rename(previous, out)
        raise


def _write_zip(bundle: Path, path: Path) -> None:
    """Stored (not deflated) members: the bytes do not depend on the zlib build, and an app can
    read the .ort straight out of the zip. Fixed date, permissions and order."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in _bundle_files(bundle):
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.create_system = 3  # Unix, so that external_attr carries the permissions
            info.external_attr = (0o100000 | _FILE_MODE) << 16
            info.file_size = (bundle / name).stat().st_size
            with open(bundle / name, "rb") as source, archive.open(info, "w") as member:
                shutil.copyfileobj(source, member, 1 << 20)
    _fsync(path)


def _bundle_files(bundle: Path) -> list[str]:
    """Manifest and summary first, then every other file by path."""
    rest = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    return [name for name in (MANIFEST, SUMMARY) if name in rest] + [n for n in rest if n not in (MANIFEST, SUMMARY)]


def _normalize_tree(bundle: Path) -> None:
    for path in sorted(bundle.rglob("*")):
        os.chmod(path, _DIR_MODE if path.is_dir() else _FILE_MODE)
        if path.is_file():
            _fsync(path)
    os.chmod(bundle, _DIR_MODE)


# -- staging ---------------------------------------------------------------------------------


def _bundle_names(loaded: LoadedModel) -> BundleNames:
    # onnxruntime's converter only takes files ending in .onnx.
    model = loaded.path.name if loaded.path.suffix.lower() == ".onnx" else loaded.path.name + ".onnx"
    stem = model[: -len(".onnx")]
    names = BundleNames(model=model, ort=f"{stem}.ort", config=f"{stem}.required_operators_and_types.config")
    taken = {MANIFEST, SUMMARY, names.ort, names.config}
    for data in loaded.files[1:]:
        relative = data.relative_to(loaded.path.parent).as_posix()
        if relative in taken:
            raise InputError(f"{loaded.path}: external data file '{relative}' has the name of a bundle file")
    return names


def _copy_side_files(source: Path, loaded: LoadedModel, bundle: Path, names: BundleNames) -> tuple[str, ...]:
    """A model folder's other files (tokenizer, configs), byte for byte beside the model."""
    if not source.is_dir():
        return ()
    carried = []
    for path in side_files(source, loaded.path):
        if path.name in (MANIFEST, SUMMARY, names.ort, names.config):
            raise InputError(f"{path}: has the name of a bundle file; rename it")
        shutil.copyfile(path, bundle / path.name)
        carried.append(path.name)
    return tuple(carried)


def _copy_model(loaded: LoadedModel, bundle: Path, name: str) -> str | None:
    """The .onnx and its external data, byte for byte, at the same relative paths — except a
    legacy IR 3 model whose initializers are also graph inputs: those inputs are dropped (the
    initializers become constants, IR 4), because the ORT format would otherwise keep them as
    inputs the app must feed. Returns what was changed, for the manifest."""
    bundle.mkdir()
    legacy = [v for v in loaded.model.graph.inputs if v.name in loaded.model.graph.initializers]
    if loaded.model.ir_version < 4 and legacy and not loaded.has_external_data:
        model = loaded.model.clone()
        model.graph.inputs[:] = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
        model.ir_version = 4
        save_model(model, bundle / name)
        return (f"IR {loaded.model.ir_version} -> 4: {len(legacy)} initializers were also graph inputs; "
                "they are constants in the bundle")
    shutil.copyfile(loaded.path, bundle / name)
    for data in loaded.files[1:]:
        target = bundle / data.relative_to(loaded.path.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data, target)
    return None


def _convert(model: Path, bundle: Path, names: BundleNames, target: Target | None, work: Path) -> Conversion:
    level = target.optimization_level if target else "all"
    platform = target.platform if target else None
    logger.info("converting %s to ORT format (optimization level %s)", model.name, level)
    return convert_to_ort(model, ort_path=bundle / names.ort, config_path=bundle / names.config,
                          level=level, platform=platform, work=work)


# -- verification ----------------------------------------------------------------------------


def _stored_level(conversion_level: str) -> str:
    """The optimization level an ORT-format file keeps: layout rewrites are redone at load."""
    return "basic" if conversion_level == "basic" else "extended"


def _verify(onnx_path: Path, ort_path: Path, feeds: Any, options: PackageOptions, *,
            stored_level: str) -> BundleVerification:
    """The .ort against the .onnx optimized to the level an ORT-format file stores: at most
    "extended", since layout rewrites (NCHWc) are made at load time, not saved — measured: an
    int8 PP-OCR .ort equals its .onnx at "extended" exactly, while at "all" the NCHWc int8
    kernels round differently by up to 0.65. Any difference there is the conversion's fault,
    gated by ``max_abs``. The distance to the .onnx with optimizations off is recorded too:
    for int8 QDQ models onnxruntime's fused kernels round differently from the float
    simulation of quantization, which is expected and not the conversion's doing."""
    from graphopt.verify.gate import Thresholds, failures, gate_checks
    from graphopt.verify.parity import compare_outputs, run_outputs
    from graphopt.verify.runtime import make_session

    logger.info("verifying %s against %s on %s", ort_path.name, onnx_path.name, feeds.source)

    def outputs(path: Path, optimize: bool, level: str | None) -> list[dict[str, Any]]:
        return run_outputs(make_session(path, optimize=optimize, level=level, threads=options.threads), feeds.feeds)

    reference = outputs(onnx_path, False, None)
    optimized = outputs(onnx_path, True, stored_level)
    ort = outputs(ort_path, True, None)
    parity = compare_outputs(optimized, ort)
    unoptimized = compare_outputs(reference, ort)
    checks = gate_checks(Thresholds(max_abs=options.max_abs), parity)
    failed = failures(checks)
    if failed:
        raise GateFailed(f"bundle not written: {ort_path.name} differs from {onnx_path.name} optimized to the "
                         f"'{stored_level}' level it stores: " + "; ".join(c.message for c in failed),
                         [c.name for c in failed])
    return BundleVerification(data=to_record(DataRecord, feeds.describe()), threads=options.threads,
                              max_abs_budget=options.max_abs, parity=parity, unoptimized=unoptimized,
                              checks=tuple(checks))


# -- manifest and summary --------------------------------------------------------------------


def _load_report(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the optimization report ({exc})") from None
    if not isinstance(report, dict):
        raise UsageError(f"{path}: not an optimization report (expected a JSON object)")
    return _without_absolute_paths(report)


def _without_absolute_paths(value: Any) -> Any:
    """Absolute paths become file names: a manifest names nothing of the machine that built it."""
    if isinstance(value, dict):
        return {k: _without_absolute_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_absolute_paths(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    return value


def _manifest(loaded: LoadedModel, names: BundleNames, target: Target | None, conversion: Conversion,
              verification: BundleVerification, report: dict[str, Any] | None, normalized: str | None,
              carried: tuple[str, ...]) -> Manifest:
    from graphopt.verify.runtime import onnxruntime_version

    model = BundleModel(file=names.model, description=describe(loaded),
                        external_data=tuple(f.relative_to(loaded.path.parent).as_posix() for f in loaded.files[1:]),
                        normalized=normalized, folder_files=carried)
    return Manifest(graphopt=__version__, onnxruntime=onnxruntime_version(), model=model, names=names,
                    conversion=conversion, target=target, verification=verification, optimization=report)


def _file_entry(bundle: Path, name: str) -> FileEntry:
    digest = hashlib.sha256()
    with open(bundle / name, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return FileEntry(path=name, bytes=(bundle / name).stat().st_size, sha256=digest.hexdigest())


def _signature(value: ValueInfo) -> str:
    dims = "?" if value.shape is None else ",".join("?" if d is None else str(d) for d in value.shape)
    return f"{value.name}: {value.dtype}[{dims}]"


def _summary_text(manifest: Manifest, files: tuple[FileEntry, ...]) -> str:
    model, names, conversion = manifest.model, manifest.names, manifest.conversion
    verification, target = manifest.verification, manifest.target
    parity, data = verification.parity, verification.data
    lines = [
        f"graphopt edge bundle of {model.file} (graphopt {manifest.graphopt}, onnxruntime {manifest.onnxruntime})",
        "",
        *(f"input   {_signature(v)}" for v in model.description.inputs),
        *(f"output  {_signature(v)}" for v in model.description.outputs),
        "opsets  " + ", ".join(f"{d} {v}" for d, v in model.description.opsets.items()),
        f"target  {target.name}: {target.description}" if target else "target  none (no operator allow-list)",
        "",
        "files",
        *(f"  {f.path:<48} {f.bytes:>12,} bytes  sha256 {f.sha256[:16]}…" for f in files),
        "",
        f"{names.ort}: ORT format, optimization level '{conversion.optimization_level}', "
        f"platform {conversion.platform or 'any'}",
        f"minimal onnxruntime build: --minimal_build --include_ops_by_config {names.config} "
        "--enable_reduced_operator_type_support",
        "operators  " + ", ".join(conversion.operators),
        "",
        f"verification: {names.ort} against {model.file} optimized to the level an ORT file stores, on "
        f"{data.samples} samples from {data.source}" + (" — random inputs, weak evidence" if data.synthetic else ""),
        f"  max abs {parity.max_abs:.3g} (budget {verification.max_abs_budget:.3g}), "
        f"cosine min {parity.cosine_min:.6f}",
        f"  against {model.file} with optimizations off (int8 kernels round differently): max abs "
        f"{verification.unoptimized.max_abs:.3g}",
        "",
        "manifest.json lists every file with its size and sha256.",
    ]
    return "\n".join(lines) + "\n"


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())



