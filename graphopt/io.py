"""Safe loading and atomic saving of ONNX models.

Loading checks everything a stranger's file could do wrong *before* any tensor is read:
external data must stay inside the model's folder (no absolute paths, ``..``, symlinks or
hard links) and must be long enough; the graph must be well formed; weights must be finite.

Saving never leaves a partial file: the model (and its external data) is written into a
hidden staging folder beside the target, fsynced, optionally verified, and only then
renamed into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from graphopt import validation
from graphopt.errors import (
    GraphoptError,
    InvalidModelError,
    UnsafeModelError,
    UsageError,
    reason,
)

logger = logging.getLogger(__name__)

# Protobuf cannot serialize 2 GiB; leave headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000

# Linux's PATH_MAX and NAME_MAX; longer locations cannot be opened anyway ("File name too long").
_MAX_LOCATION_BYTES = 4096
_MAX_NAME_BYTES = 255

# A staging folder of a run that was killed (SIGKILL, power loss) cannot be removed by that
# run; the next run writing the same output removes it once it is this old and the process
# named in it is gone.
STALE_STAGING_SECONDS = 300


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model and what it was read from."""

    model: ir.Model
    path: Path
    files: tuple[Path, ...]  # the .onnx file and every external data file it reads
    has_external_data: bool

    @property
    def file_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def model_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or for a model folder (model + tokenizer + configs, as ``graphopt export``
    writes) its ``model.onnx``, else its one ``.onnx`` file."""
    path = Path(path)
    if not path.is_dir():
        return path
    if (path / "model.onnx").is_file():
        return path / "model.onnx"
    models = sorted(path.glob("*.onnx"))
    if len(models) != 1:
        raise InvalidModelError(f"{path}: a model folder needs model.onnx or exactly one .onnx file, "
                                f"found {len(models)}")
    return models[0]


def side_files(folder: Path, model: Path) -> list[Path]:
    """The files of a model folder that are not the model: tokenizer, configs, templates."""
    own = {model.name, *(f.name for f in external_files(model))}
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name not in own and not p.name.startswith("."))


def external_files(model: Path) -> list[Path]:
    """The external data files a model file names (each once), read from its graph only."""
    proto = onnx.load(model, load_external_data=False)
    return sorted({model.parent / entry.value for tensor in validation.iter_tensors(proto)
                   for entry in tensor.external_data if entry.key == "location"})


def model_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a model (a model file, or a folder's model) and the external data it reads."""
    model = model_file(path)
    return model.stat().st_size + sum(f.stat().st_size for f in external_files(model))


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Load a model (a file, or a model folder's model) from a stranger safely; raise
    InvalidModelError/UnsafeModelError otherwise."""
    path = model_file(path)
    proto = _parse(path)
    data_files = check_external_data(proto, path)
    validation.check_structure(proto, path)
    try:
        model = ir.serde.deserialize_model(proto)
        ir.external_data.set_base_dir(model.graph, str(path.parent))
        if data_files and weights_nbytes(model) <= EXTERNAL_DATA_THRESHOLD_BYTES:
            # In memory, passes and checks never depend on where the data files are.
            ir.external_data.load_to_model(model)
        validation.check_input_types(model, str(path))
        validation.check_finite_weights(model, str(path))
    except GraphoptError:
        raise
    except Exception as exc:  # onnx-ir meets what the checker let through (unknown data types…)
        while exc.__cause__ is not None:  # onnx-ir wraps the reason in "error calling …"
            exc = exc.__cause__
        raise InvalidModelError(f"{path}: cannot read the model: {type(exc).__name__}: {reason(exc, 200)}") from None
    return LoadedModel(model, path, (path, *data_files), bool(data_files))


def _parse(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file")
    if not path.is_file():
        raise InvalidModelError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise InvalidModelError(f"{path}: empty file")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidModelError(
            f"{path}: not an ONNX model (protobuf parse failed: {reason})"
        ) from None
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise InvalidModelError(f"{path}: not an ONNX model (no graph or no IR version)")
    return proto


# -- external data --------------------------------------------------------------------------


def check_external_data(proto: onnx.ModelProto, model_path: Path) -> tuple[Path, ...]:
    """Refuse any external-data reference that leaves the model folder or is too short.

    Returns the distinct data files the model reads. Nothing is read from them.
    """
    base = model_path.parent.resolve()
    files: dict[Path, None] = {}
    for tensor in validation.iter_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = _check_one_external(tensor, base, str(model_path))
        files[model_path.parent / location] = None
    return tuple(files)


def _check_one_external(tensor: onnx.TensorProto, base: Path, model_name: str) -> str:
    """The tensor's data location, once it is known to be safe and long enough."""
    where = f"{model_name}: tensor '{tensor.name}'"
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    if not location:
        raise InvalidModelError(f"{where}: external data has no location")
    if any(ord(char) < 32 for char in location):
        raise InvalidModelError(f"{where}: external data path {_shown(location)} contains control characters")
    if len(location.encode("utf-8", "surrogatepass")) > _MAX_LOCATION_BYTES or any(
        len(part.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES for part in location.replace("\\", "/").split("/")
    ):
        raise InvalidModelError(
            f"{where}: external data path {_shown(location)} is too long ({len(location)} characters)"
        )
    normalized = location.replace("\\", "/")
    if os.path.isabs(location) or normalized.startswith("/") or (len(location) > 1 and location[1] == ":"):
        raise UnsafeModelError(f"{where}: external data path '{location}' is absolute (outside the model folder)")
    if ".." in PurePosixPath(normalized).parts:
        raise UnsafeModelError(f"{where}: external data path '{location}' uses '..' (outside the model folder)")

    target = base
    for part in PurePosixPath(normalized).parts:
        target = target / part
        if target.is_symlink():
            raise UnsafeModelError(f"{where}: external data path '{location}' goes through a symlink")
    if not target.resolve().is_relative_to(base):
        raise UnsafeModelError(f"{where}: external data path '{location}' resolves outside the model folder")
    if not target.exists():
        raise InvalidModelError(f"{where}: external data file '{location}' does not exist")
    if not target.is_file():
        raise InvalidModelError(f"{where}: external data '{location}' is not a regular file")
    stat = target.stat()
    if stat.st_nlink > 1:
        raise UnsafeModelError(f"{where}: external data file '{location}' is a hard link (shared with another path)")

    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise InvalidModelError(f"{where}: external data offset/length are not integers") from None
    needed = validation.tensor_nbytes(tensor)
    if offset < 0 or (length is not None and length < 0):
        raise InvalidModelError(f"{where}: negative external data offset or length")
    if length is not None and needed is not None and length != needed:
        raise InvalidModelError(
            f"{where}: external data length {length} does not match its shape and type ({needed} bytes)"
        )
    span = length if length is not None else needed
    if span is not None and offset + span > stat.st_size:
        raise InvalidModelError(
            f"{where}: external data file '{location}' is too short "
            f"(needs bytes {offset}..{offset + span}, file has {stat.st_size})"
        )
    return normalized


def _shown(location: str) -> str:
    """A stranger's path, printable on one line and short enough to read."""
    text = repr(location)
    return text if len(text) <= 80 else text[:60] + "…" + text[-12:]


# -- saving ---------------------------------------------------------------------------------


@dataclasses.dataclass
class StagedModel:
    """A model written into a staging folder, not yet visible at its final path."""

    final_path: Path
    staging_dir: Path
    external_data: bool

    @property
    def model_path(self) -> Path:
        return self.staging_dir / self.final_path.name

    @property
    def data_name(self) -> str:
        return self.final_path.name + ".data"

    def staged_files(self) -> list[Path]:
        """Data file first (when tensors went to it), the model last."""
        data = self.staging_dir / self.data_name
        return [*([data] if data.exists() else []), self.model_path]

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.staged_files())

    def commit(self) -> list[Path]:
        """Move the staged files into place: data first, so the model never points at old data."""
        written = []
        for staged in self.staged_files():
            final = self.final_path.parent / staged.name
            os.replace(staged, final)
            written.append(final)
        fsync_dir(self.final_path.parent)
        return written


def _refuse_overwriting_inputs(out: Path, external: bool, protected: tuple[Path, ...]) -> None:
    outputs = [out] + ([out.with_name(out.name + ".data")] if external else [])
    for candidate in outputs:
        for source in protected:
            same = candidate.resolve() == source.resolve() or (
                candidate.exists() and source.exists() and os.path.samefile(candidate, source)
            )
            if same:
                raise UsageError(f"{candidate}: output would overwrite the input file {source}")


@contextlib.contextmanager
def staged_save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protected: tuple[Path, ...] = (),
    unchanged_from: Path | None = None,
) -> Iterator[StagedModel]:
    """Write ``model`` into a staging folder beside ``path``; commit only if the block succeeds.

    ``unchanged_from`` names the file ``model`` was read from when nothing changed it (and it
    has no external data): its bytes are written as they are.
    ``external_data=None`` picks external data when the weights exceed ~1.8 GB.
    ``protected`` lists files that must never be overwritten (the input model and its data).
    On any exception — including KeyboardInterrupt — the staging folder is removed and
    nothing appears at ``path``.
    """
    path = Path(path)
    if external_data is None:
        external_data = weights_nbytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
    _refuse_overwriting_inputs(path, external_data, protected)
    if not path.parent.is_dir():
        raise UsageError(f"{path}: output folder {path.parent} does not exist")
    remove_stale_staging(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".graphopt-tmp", dir=path.parent))
    try:
        staged = StagedModel(path, staging, external_data)
        _write(model, staged, unchanged_from if not external_data else None)
        yield staged
        staged.commit()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_new_folder(output: Path, sources: tuple[Path, ...] = ()) -> None:
    """A folder a command will create: its parent exists, it does not exist or is empty, and it
    neither is nor holds one of ``sources``. Checked before any work starts."""
    if not output.parent.is_dir():
        raise UsageError(f"{output}: folder {output.parent} does not exist")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UsageError(f"{output}: exists and is not an empty folder; choose another -o or remove it")
    for source in sources:
        if output.resolve() == source.resolve() or source.resolve().is_relative_to(output.resolve()):
            raise UsageError(f"{output}: would overwrite the input {source}; choose another -o")


@contextlib.contextmanager
def staged_folder(output: Path, sources: tuple[Path, ...] = ()) -> Iterator[Path]:
    """A new folder, written inside a hidden staging folder beside ``output`` and renamed into
    place only when the block succeeds (as ``staged_save`` does for one model)."""
    check_new_folder(output, sources)
    remove_stale_staging(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.{os.getpid()}-", suffix=".graphopt-tmp",
                                    dir=output.parent)).resolve()
    try:
        folder = staging / "folder"
        folder.mkdir()
        yield folder
        if output.exists():
            output.rmdir()  # empty (checked): the staged folder takes its place
        os.rename(folder, output)
        fsync_dir(output.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(path: Path, *, older_than: float = STALE_STAGING_SECONDS) -> list[Path]:
    """Remove staging folders of ``path`` left by killed runs: older than ``older_than``
    seconds and, when the folder names its process (``.NAME.PID-XXXX.graphopt-tmp``), that
    process no longer runs. Only this output's folders are touched."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)-)?[a-z0-9_]+\.graphopt-tmp")
    removed = []
    now = time.time()
    for entry in path.parent.iterdir() if path.parent.is_dir() else ():
        match = pattern.fullmatch(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir():
            continue
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime < older_than or (match[1] and _process_alive(int(match[1]))):
                continue
            shutil.rmtree(entry)
            removed.append(entry)
            logger.info("removed %s, left by an interrupted run", entry.name)
    return removed


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def save_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None,
               protected: tuple[Path, ...] = ()) -> Path:
    """Atomically write ``model`` to ``path`` (see :func:`staged_save`)."""
    with staged_save(model, path, external_data=external_data, protected=protected):
        pass
    return Path(path)


def _write(model: ir.Model, staged: StagedModel, source: Path | None = None) -> None:
    """``source``: a model file whose bytes are the model (nothing changed it) — copied as is."""
    if source is not None:
        shutil.copyfile(source, staged.model_path)
    else:
        with _no_initializer_value_info(model):
            if staged.external_data:
                ir.save(model, staged.model_path, external_data=staged.data_name)
                proto = onnx.load_model(str(staged.model_path), load_external_data=False)
            else:
                _inline_external_tensors(model)
                proto = ir.serde.serialize_model(model)
            _drop_default_fields(proto)
            staged.model_path.write_bytes(proto.SerializeToString())
    for file in staged.staged_files():
        with open(file, "rb+") as handle:
            os.fsync(handle.fileno())


def _drop_default_fields(proto: onnx.ModelProto) -> None:
    """onnx-ir writes the default opset's empty domain explicitly; the exporters leave it unset.
    Unset, an unchanged model does not grow by serialization alone."""
    for opsets in (proto.opset_import, *(f.opset_import for f in proto.functions)):
        for opset in opsets:
            if opset.HasField("domain") and not opset.domain:
                opset.ClearField("domain")


@contextlib.contextmanager
def _no_initializer_value_info(model: ir.Model) -> Iterator[None]:
    """onnx-ir writes a value_info entry per initializer, repeating what the tensor already
    says; leaving them out keeps an unchanged model from growing on save."""
    graph_inputs = {id(v) for v in model.graph.inputs}
    saved = []
    for value in model.graph.initializers.values():
        if id(value) not in graph_inputs and (value.type is not None or value.shape is not None):
            saved.append((value, value.type, value.shape))
            value.type, value.shape = None, None
    try:
        yield
    finally:
        for value, type_, shape in saved:
            value.type, value.shape = type_, shape


def _inline_external_tensors(model: ir.Model) -> None:
    """Make an inline save possible for a model loaded with external data."""
    ir.external_data.load_to_model(model)


def weights_nbytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- text files (reports, manifests, caches) ----------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Infinity
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return value


def to_json(data: dict[str, Any]) -> str:
    return json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n"


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"{path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a report is for everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
