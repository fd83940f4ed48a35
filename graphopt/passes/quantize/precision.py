"""The precision table a precision-choosing pass reports, as typed records: what ``report/``
renders and the JSON report holds (``to_dict``/``from_dict`` keep that file's keys).

``BlockLayer`` is one weight of ``quantize-blockwise``; ``BitSearch`` is its search under the
text budget, one ``BitTrial`` per judged rung (``verify.search``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class BlockLayer:
    node: str
    role: str  # "linear", "head" (untied), "tied" (table + head), "embedding" (untied table)
    shape: tuple[int, int]  # [K, N]
    bits: int
    accuracy_level: int
    block_size: int
    method: str
    awq_alpha: float
    relative_error: float
    sensitivity: float

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BlockLayer:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        return cls(**{**values, "shape": tuple(values.get("shape", (0, 0)))})


@dataclasses.dataclass(frozen=True)
class BitTrial:
    """One judged rung: the layers at 8 bits, in float compute and in float, and the text scores."""

    step: str
    rungs: int
    eight_bit_layers: int
    float_compute_layers: int
    float_layers: int
    ppl_ratio: float
    token_agreement: float
    budget_used: float
    noise: float
    meets: bool
    size_ratio: float | None = None  # the model's bytes over the float model's at this rung
    decode_ratio: float | None = None  # decode ms/token over the float model's, where measured

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BitTrial:
        known = {f.name for f in dataclasses.fields(cls)}
        defaults = {"rungs": 0, "float_layers": 0, "budget_used": float("nan"), "noise": float("nan")}
        return cls(**{**defaults, **{key: value for key, value in data.items() if key in known}})


@dataclasses.dataclass
class BitSearch:
    """The search of bits and compute type per layer under a text budget."""

    windows: int
    target_ppl_ratio: float | None
    target_token_agree: float | None
    trials: list[BitTrial] = dataclasses.field(default_factory=list)
    rungs: int = 0  # the ladder's length
    taken: int = 0  # rungs taken (after any retreat)
    exhausted: str | None = None  # the budget is out of reach on the calibration windows
    max_size_ratio: float | None = None  # a size target: the most faithful model within it
    max_decode_ratio: float | None = None  # a decode-speed target: the most faithful model within it

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["trials"] = [trial.to_dict() for trial in self.trials]
        if self.exhausted is None:
            data.pop("exhausted")
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BitSearch:
        return cls(windows=data.get("windows", 0), target_ppl_ratio=data.get("target_ppl_ratio"),
                   target_token_agree=data.get("target_token_agree"),
                   trials=[BitTrial.from_dict(t) for t in data.get("trials", [])], rungs=data.get("rungs", 0),
                   taken=data.get("taken", 0), exhausted=data.get("exhausted"),
                   max_size_ratio=data.get("max_size_ratio"), max_decode_ratio=data.get("max_decode_ratio"))


__all__ = ["BitSearch", "BitTrial", "BlockLayer"]
