"""Activation statistics on calibration data: one streaming collector, pluggable accumulators.

The three steps onnxruntime's calibrators separate, here once for every pass that needs them:

1. *augment*: the tensors asked for become graph outputs, untyped, so onnxruntime infers each
   type (index tensors are int64, and a cleaned graph may no longer say what a tensor is);
   tensors that are graph inputs are read from the feed instead;
2. *collect*: one onnxruntime session runs feed after feed; each value goes to the
   accumulators registered for its tensor and is then dropped, so memory does not grow with
   the number of feeds;
3. *compute*: each accumulator holds its own result (a range, a histogram, moments).

Users: static quantization ranges (``quantize/calibrate.py``), activation-aware weight-only
int8, low-rank whitening and embedding row frequencies (``lowrank.py``) and the channel
moments of pruning with compensation (``prune/channels.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import onnx
import onnx_ir as ir


class Accumulator(Protocol):
    """Folds one value of its tensor (one feed's worth) into a running statistic."""

    def update(self, value: np.ndarray) -> None: ...


class ActivationCollector:
    """Runs the model with intermediate tensors exposed; one session, reusable for several
    passes over the feeds (a histogram needs the range the first pass found)."""

    def __init__(self, model: ir.Model, names: Iterable[str], *, threads: int | None = None) -> None:
        self.names = list(dict.fromkeys(names))
        given = {value.name for value in model.graph.inputs}
        self._given = [name for name in self.names if name in given]
        self._computed = [name for name in self.names if name not in given]
        self._model = model
        self._threads = threads
        self._session: Any = None

    def _run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = {name: feed[name] for name in self._given}
        if self._computed:
            if self._session is None:
                from graphopt.verify.runtime import make_session

                self._session = make_session(exposed(self._model, self._computed), optimize=False,
                                             threads=self._threads)
            values.update(zip(self._computed, self._session.run(self._computed, dict(feed))))
        return values

    def stream(self, feeds: Iterable[Mapping[str, np.ndarray]],
               accumulators: Mapping[str, Accumulator | Sequence[Accumulator]]) -> None:
        """One pass over ``feeds``: every value of a tensor in ``accumulators`` updates its
        accumulator(s)."""
        wanted = {name: list(acc) if isinstance(acc, Sequence) else [acc] for name, acc in accumulators.items()}
        unknown = sorted(set(wanted) - set(self.names))
        if unknown:
            raise KeyError(f"not collected: {', '.join(unknown)}")
        for feed in feeds:
            for name, value in self._run(feed).items():
                for accumulator in wanted.get(name, ()):
                    accumulator.update(value)


def exposed(model: ir.Model, names: Sequence[str]) -> bytes:
    """The serialized model with ``names`` added as (untyped) graph outputs."""
    proto = ir.serde.serialize_model(model)
    existing = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names if name not in existing)
    return proto.SerializeToString()


def _channel_rows(value: np.ndarray, axis: int, dtype: Any) -> np.ndarray:
    rows = np.moveaxis(np.asarray(value, dtype=dtype), axis, -1)
    return rows.reshape(-1, rows.shape[-1])


# -- accumulators -------------------------------------------------------------------------------


@dataclasses.dataclass
class ChannelRange:
    """min, max, and per channel max|x| and Σx² (channels on axis 1 of 4-D NCHW tensors, else on
    the last axis); float32 values, float64 sums."""

    minimum: float = np.inf
    maximum: float = -np.inf
    channel_absmax: np.ndarray | None = None
    channel_sumsq: np.ndarray | None = None
    count: int = 0  # rows (elements per channel) seen so far
    shape: tuple[int, ...] = ()

    def update(self, value: np.ndarray) -> None:
        value = np.asarray(value, dtype=np.float32)
        if value.size == 0:
            return
        self.shape = value.shape
        self.minimum = min(self.minimum, float(value.min()))
        self.maximum = max(self.maximum, float(value.max()))
        if value.ndim == 0:
            return
        rows = _channel_rows(value, 1 if value.ndim == 4 else -1, np.float32)
        channel = np.abs(rows).max(axis=0)
        sumsq = np.square(rows, dtype=np.float64).sum(axis=0)
        if self.channel_absmax is None or self.channel_absmax.shape != channel.shape:
            self.channel_absmax, self.channel_sumsq, self.count = channel, sumsq, 0
        else:
            self.channel_absmax = np.maximum(self.channel_absmax, channel)
            self.channel_sumsq = self.channel_sumsq + sumsq
        self.count += rows.shape[0]


@dataclasses.dataclass
class AbsHistogram:
    """Counts of |x| in ``bins`` equal bins over [0, top] (``top`` from an earlier range pass)."""

    top: float
    bins: int
    counts: np.ndarray | None = None

    def update(self, value: np.ndarray) -> None:
        top = self.top if self.top > 0 else 1.0
        counts, _ = np.histogram(np.abs(np.asarray(value, dtype=np.float32)), bins=self.bins, range=(0.0, top))
        self.counts = counts if self.counts is None else self.counts + counts


@dataclasses.dataclass
class ChannelMoments:
    """Per-channel Σx, Σx² (and Σxxᵀ between channels with ``gram``) over the rows of a tensor
    whose channels lie on ``axis``; float64."""

    axis: int = -1
    gram: bool = False
    sums: Any = 0.0
    sumsq: Any = 0.0
    cross: Any = 0.0
    count: int = 0

    def update(self, value: np.ndarray) -> None:
        rows = _channel_rows(value, self.axis, np.float64)
        self.sums = self.sums + rows.sum(axis=0)
        self.sumsq = self.sumsq + np.square(rows).sum(axis=0)
        self.count += rows.shape[0]
        if self.gram:
            self.cross = self.cross + rows.T @ rows

    @property
    def mean(self) -> np.ndarray:
        return self.sums / self.count

    @property
    def meansq(self) -> np.ndarray:
        return self.sumsq / self.count

    @property
    def second_moment(self) -> np.ndarray | None:
        """E[x xᵀ] between channels (with ``gram``)."""
        return self.cross / self.count if self.gram else None


@dataclasses.dataclass
class RowSample:
    """A uniform sample of at most ``limit`` rows of a tensor (channels on the last axis) over
    every value seen (each row gets a seeded random key; the smallest keys stay), and each
    channel's largest |x| over all rows; float32."""

    limit: int = 512
    seed: int = 0
    rows: Any = None
    keys: Any = None
    absmax: Any = None
    _rng: Any = None

    def update(self, value: np.ndarray) -> None:
        matrix = np.asarray(value, np.float32).reshape(-1, value.shape[-1])
        peak = np.abs(matrix).max(axis=0)
        self.absmax = peak if self.absmax is None else np.maximum(self.absmax, peak)
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        keys = self._rng.random(matrix.shape[0])
        if self.rows is not None:
            matrix, keys = np.concatenate([self.rows, matrix]), np.concatenate([self.keys, keys])
        if keys.size > self.limit:
            kept = np.sort(np.argpartition(keys, self.limit - 1)[: self.limit])
            matrix, keys = matrix[kept], keys[kept]
        self.rows, self.keys = np.ascontiguousarray(matrix), keys


@dataclasses.dataclass
class SecondMoment:
    """E[x xᵀ] over the rows of a tensor (channels on the last axis; rows are the first axis's
    columns when ``transposed``), or only its diagonal; float64."""

    transposed: bool = False
    diagonal: bool = False
    total: Any = None
    count: int = 0

    def update(self, value: np.ndarray) -> None:
        value = np.asarray(value, np.float64)
        matrix = value.T if self.transposed else value.reshape(-1, value.shape[-1])
        moment = np.einsum("ij,ij->j", matrix, matrix) if self.diagonal else matrix.T @ matrix
        self.total = moment if self.total is None else self.total + moment
        self.count += matrix.shape[0]

    @property
    def value(self) -> np.ndarray | None:
        return None if not self.count else self.total / self.count


@dataclasses.dataclass
class RowFrequency:
    """How often each row of a ``rows``-row table is looked up by an index tensor."""

    rows: int
    total: Any = None
    count: int = 0

    def update(self, value: np.ndarray) -> None:
        ids = np.asarray(value, np.int64).reshape(-1) % self.rows
        counts = np.bincount(ids, minlength=self.rows).astype(np.float64)
        self.total = counts if self.total is None else self.total + counts
        self.count += ids.size

    @property
    def value(self) -> np.ndarray | None:
        return None if not self.count else self.total / self.count
