"""Input data for verification and calibration, in every format graphopt accepts.

- an ``.npz`` with one array per model input, samples stacked on axis 0 (fed in batches);
- a folder of ``.npz`` files, each one complete feed (scalar or state inputs);
- ONNX test-data folders (``test_data_set_*/input_*.pb``);
- nothing: seeded random feeds from the model's signature, marked as weaker evidence.
"""

from __future__ import annotations

import dataclasses
import math
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from graphopt.errors import DataError
from graphopt.verify.layout import is_decoder

Feed = dict[str, np.ndarray]

# Dynamic non-batch dimensions without a --shape override get this size.
DEFAULT_DYNAMIC_DIM = 64
# A random feed bigger than this is almost certainly an absurd declared shape.
MAX_RANDOM_INPUT_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    def describe(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


@dataclasses.dataclass
class FeedSet:
    """Feeds ready for ``session.run``, and where they came from."""

    feeds: list[Feed]
    source: str
    synthetic: bool  # random data from the signature: weaker evidence

    @property
    def batch_size(self) -> int:
        return _batch_len(self.feeds[0]) if self.feeds else 0

    @property
    def samples(self) -> int:
        return sum(_batch_len(feed) for feed in self.feeds)

    def describe(self) -> dict[str, object]:
        return {
            "source": self.source,
            "synthetic": self.synthetic,
            "feeds": len(self.feeds),
            "samples": self.samples,
            "evidence": "weak (random inputs)" if self.synthetic else "data",
        }


def _batch_len(feed: Feed) -> int:
    first = next(iter(feed.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim > 0 else 1


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The inputs a caller must feed (initializers listed as inputs are not among them)."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        shape = tuple(_dimension(d) for d in (value.shape.dims if value.shape is not None else ()))
        specs.append(InputSpec(value.name or "", np.dtype(dtype), shape))
    return specs


def check_same_inputs(base: Sequence[InputSpec], candidate: Sequence[InputSpec], base_name: str,
                      candidate_name: str) -> None:
    """A candidate compared with its base must take the same inputs (names and element types, in
    order; dimensions may differ), or the same feeds cannot run both (DataError naming both)."""
    if [(s.name, s.dtype) for s in base] != [(s.name, s.dtype) for s in candidate]:
        raise DataError(f"{candidate_name} takes inputs {[s.describe() for s in candidate]}, "
                        f"{base_name} takes {[s.describe() for s in base]}")


def _dimension(dim: object) -> int | str | None:
    """A declared dimension: a size, a symbol, or None. Exporters write a dynamic dimension as
    a symbol, an empty one, or a size of -1 or 0 (Paddle, older TensorFlow converters): all
    of those but the symbol are None here."""
    if isinstance(dim, int):
        return dim if dim > 0 else None
    return str(dim) if dim is not None and str(dim) else None


def parse_shape_overrides(items: Sequence[str], flag: str = "--shape") -> dict[str, tuple[int, ...]]:
    """``["x=1,3,320,320"]`` → ``{"x": (1, 3, 320, 320)}``; ``flag`` names the option in errors."""
    shapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise DataError(f"{flag} '{item}': expected NAME=D1,D2,... with integer dimensions") from None
    return shapes


# Where data comes from: a path (.npz, folder of .npz, ONNX test data), arrays stacked on axis 0
# by input name, a list of complete feeds, or None (random feeds).
DataSource = str | Path | Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None


def load_feeds(
    source: DataSource,
    specs: Sequence[InputSpec],
    *,
    batch_size: int = 1,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    random_samples: int = 8,
    extra_keys: Sequence[str] = (),
) -> FeedSet:
    """Feeds from ``source`` (any supported format, or arrays: a dict of input name to samples
    stacked on axis 0, or a list of complete feeds) or random ones when it is None.

    ``extra_keys`` are arrays an ``.npz`` may carry besides inputs (labels) and that are
    not fed to the model.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    if source is None:
        return random_feeds(specs, shapes=shapes or {}, seed=seed, count=random_samples, batch_size=batch_size)
    if isinstance(source, Mapping):  # arrays in memory, samples stacked on axis 0, as in an .npz
        arrays = {str(k): np.asarray(v) for k, v in source.items()}
        return FeedSet(batched_feeds(arrays, specs, batch_size, "data", extra_keys), "arrays", False)
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):  # complete feeds
        feeds = []
        for index, feed in enumerate(source):
            if not isinstance(feed, Mapping):
                raise DataError(f"data[{index}]: expected a dict of input name to array, got {type(feed).__name__}")
            arrays = {str(k): np.asarray(v) for k, v in feed.items() if k not in extra_keys}
            _check_feed(arrays, specs, f"data[{index}]", batched=False)
            feeds.append(arrays)
        if not feeds:
            raise DataError("data: an empty list of feeds")
        return FeedSet(feeds, f"{len(feeds)} feeds given as arrays", False)
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        arrays = read_npz(path)
        return FeedSet(batched_feeds(arrays, specs, batch_size, str(path), extra_keys), str(path), False)
    if _is_test_data_folder(path):
        return FeedSet(_test_data_feeds(path, specs), str(path), False)
    files = sorted(path.glob("*.npz"))
    if not files:
        raise DataError(f"{path}: folder holds neither .npz files nor test_data_set_* folders")
    feeds = []
    for file in files:
        arrays = {k: v for k, v in read_npz(file).items() if k not in extra_keys}
        _check_feed(arrays, specs, file.name, batched=False)
        feeds.append(arrays)
    return FeedSet(feeds, str(path), False)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: a single array, not a .npz archive with one array per model input")
    with data:
        return {key: data[key] for key in data.files}


def batched_feeds(
    arrays: Mapping[str, np.ndarray],
    specs: Sequence[InputSpec],
    batch_size: int,
    where: str,
    extra_keys: Sequence[str] = (),
) -> list[Feed]:
    inputs = {k: v for k, v in arrays.items() if k not in extra_keys}
    _check_feed(inputs, specs, where, batched=True)
    scalars = sorted(name for name, array in inputs.items() if array.ndim == 0)
    if scalars:
        raise DataError(
            f"{where}: input {', '.join(scalars)} holds a single value, not samples stacked on axis 0; "
            "for scalar inputs give a folder of .npz files, one complete feed each"
        )
    counts = {name: array.shape[0] for name, array in inputs.items()}
    if len(set(counts.values())) > 1:
        raise DataError(
            f"{where}: inputs hold different sample counts {counts}; stack samples on axis 0 "
            f"(the model expects {_signature(specs)})"
        )
    total = next(iter(counts.values()))
    if total == 0:
        raise DataError(f"{where}: holds no samples")
    fixed_batch = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)}
    if len(fixed_batch) == 1:  # a model exported with a static batch takes only that size
        (batch_size,) = fixed_batch
        total -= total % batch_size
        if total == 0:
            raise DataError(f"{where}: fewer samples than the model's fixed batch size {batch_size}")
    return [
        {name: np.ascontiguousarray(array[start : start + batch_size]) for name, array in inputs.items()}
        for start in range(0, total, batch_size)
    ]


def _signature(specs: Sequence[InputSpec]) -> str:
    return "; ".join(spec.describe() for spec in specs)


def _check_feed(arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec], where: str, *, batched: bool) -> None:
    expected = {spec.name: spec for spec in specs}
    wanted = _signature(specs)
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(missing)}")
        if extra:
            hint = f" (labels? give --labels {extra[0]})" if not missing else ""
            problems.append(f"unknown {', '.join(extra)}{hint}")
        raise DataError(f"{where}: {' and '.join(problems)}; the model expects {wanted}")
    for name, array in arrays.items():
        spec = expected[name]
        if array.dtype != spec.dtype:
            raise DataError(f"{where}: input '{name}' is {array.dtype}, the model expects {spec.describe()}")
        if spec.shape and array.ndim != len(spec.shape):
            raise DataError(
                f"{where}: input '{name}' has shape {list(array.shape)}, the model expects {spec.describe()}"
            )
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
            if batched and axis == 0:
                continue
            if isinstance(want, int) and got != want:
                raise DataError(
                    f"{where}: input '{name}' has shape {list(array.shape)}, the model expects {spec.describe()}"
                )


def _index(path: Path) -> int:
    """``test_data_set_10`` and ``input_2.pb`` sort by their number, not as text."""
    suffix = path.stem.rsplit("_", 1)[-1]
    if not suffix.isdigit():
        raise DataError(f"{path}: expected a numbered name like input_0.pb or test_data_set_0")
    return int(suffix)


def _is_test_data_folder(path: Path) -> bool:
    return path.name.startswith("test_data_set_") or any(path.glob("test_data_set_*"))


def _test_data_feeds(path: Path, specs: Sequence[InputSpec]) -> list[Feed]:
    sets = [path] if path.name.startswith("test_data_set_") else sorted(path.glob("test_data_set_*"), key=_index)
    feeds = []
    for folder in sets:
        files = sorted(folder.glob("input_*.pb"), key=_index)
        if len(files) != len(specs):
            raise DataError(
                f"{folder}: {len(files)} input_*.pb files, the model expects {len(specs)} inputs "
                f"({'; '.join(s.describe() for s in specs)})"
            )
        feed = {}
        for file, spec in zip(files, specs):
            tensor = onnx.TensorProto()
            try:
                tensor.ParseFromString(file.read_bytes())
                array = numpy_helper.to_array(tensor)
            except Exception as exc:  # protobuf and numpy_helper raise various types
                raise DataError(f"{file}: not a TensorProto ({exc})") from None
            feed[tensor.name or spec.name] = array
        _check_feed(feed, specs, folder.name, batched=False)
        feeds.append(feed)
    return feeds


def random_feeds(
    specs: Sequence[InputSpec],
    *,
    shapes: Mapping[str, Sequence[int]],
    seed: int,
    count: int,
    batch_size: int = 1,
) -> FeedSet:
    """Seeded random feeds from the signature; dynamic dims: ``batch_size`` on axis 0, 64
    elsewhere, unless ``shapes`` gives them."""
    unknown = sorted(set(shapes) - {s.name for s in specs})
    if unknown:
        raise DataError(f"--shape names unknown input {', '.join(unknown)}; the model expects {_signature(specs)}")
    rng = np.random.default_rng(seed)
    if not shapes and is_decoder(specs):
        return _decoder_feeds(specs, rng, count, batch_size, seed)
    concrete = {spec.name: _concrete_shape(spec, shapes.get(spec.name), batch_size) for spec in specs}
    feeds = [{spec.name: _random_array(rng, spec, concrete[spec.name]) for spec in specs} for _ in range(count)]
    described = ", ".join(f"{n}={list(s)}" for n, s in concrete.items())
    return FeedSet(feeds, f"random (seed {seed}; {described})", True)


def _decoder_feeds(specs: Sequence[InputSpec], rng: np.random.Generator, count: int, batch: int,
                   seed: int) -> FeedSet:
    """Consistent decoder steps: the mask covers past + new tokens, positions continue the past.
    Even feeds are prefills of 16 tokens (empty cache), odd ones one-token steps after 16 cached
    positions of random values: the two ways a decoder is driven."""
    from graphopt.verify.layout import is_past

    feeds = []
    for index in range(count):
        past, length = (0, 16) if index % 2 == 0 else (16, 1)
        feed: dict[str, np.ndarray] = {}
        for spec in specs:
            if spec.name == "input_ids":
                feed[spec.name] = rng.integers(0, 32, (batch, length)).astype(spec.dtype)  # in any vocabulary
            elif spec.name == "attention_mask":
                feed[spec.name] = np.ones((batch, past + length), spec.dtype)
            elif spec.name == "position_ids":
                feed[spec.name] = np.tile(np.arange(past, past + length), (batch, 1)).astype(spec.dtype)
            elif is_past(spec.name):
                feed[spec.name] = rng.standard_normal((batch, spec.shape[1], past, spec.shape[3])).astype(spec.dtype)
            else:
                feed[spec.name] = _random_array(rng, spec, _concrete_shape(spec, None, batch))
        feeds.append(feed)
    return FeedSet(feeds, f"random decoder steps (seed {seed}; prefills of 16 tokens and one-token steps "
                          "after 16 cached positions)", True)


def _concrete_shape(spec: InputSpec, override: Sequence[int] | None, batch_size: int) -> tuple[int, ...]:
    if override is not None:
        if spec.shape and len(override) != len(spec.shape):
            raise DataError(f"--shape {spec.name}: {len(override)} dims given, the model expects {spec.describe()}")
        for got, want in zip(override, spec.shape):
            if isinstance(want, int) and got != want:
                raise DataError(f"--shape {spec.name}={list(override)} conflicts with {spec.describe()}")
        shape = tuple(override)
    else:
        shape = tuple(
            d if isinstance(d, int) else (batch_size if axis == 0 else DEFAULT_DYNAMIC_DIM)
            for axis, d in enumerate(spec.shape)
        )
    nbytes = math.prod(shape) * spec.dtype.itemsize
    if any(d < 0 for d in shape) or nbytes > MAX_RANDOM_INPUT_BYTES:
        raise DataError(
            f"input '{spec.name}' declares shape {list(shape)} ({nbytes / 2**30:.1f} GiB per feed); "
            "give real data or --shape"
        )
    return shape


def _random_array(rng: np.random.Generator, spec: InputSpec, shape: tuple[int, ...]) -> np.ndarray:
    if np.issubdtype(spec.dtype, np.floating):
        return rng.standard_normal(shape).astype(spec.dtype)
    if spec.dtype == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)  # a 0-d comparison gives a scalar onnxruntime refuses
    if np.issubdtype(spec.dtype, np.integer):
        # Small non-negative values stay valid as token ids, indices and masks.
        return rng.integers(0, 2, size=shape).astype(spec.dtype)
    raise DataError(f"input '{spec.name}' has type {spec.dtype}; random feeds cannot be made for it, give --data")
