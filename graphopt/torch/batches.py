"""How ``distill`` reads what it is given: batches (inputs, keyword inputs, labels), a model's
output (a tensor, or the first of a tuple), and the outputs of named modules during a forward
pass. Shared by ``distill`` and ``teacher_cache``, which imports nothing else of distill."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from graphopt.errors import GraphoptError, UsageError


def split_batch(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], torch.Tensor | None]:
    """(positional inputs, keyword inputs, labels) of a batch.

    A tensor is one input; a dict holds keyword inputs and optionally ``labels``; a tuple or
    list is ``(inputs, labels)`` where inputs is a tensor, a tuple of tensors or a dict (a
    one-element tuple, as a ``TensorDataset`` of inputs yields, is its element).
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        return (), kwargs, batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) == 1:  # a TensorDataset of inputs alone
        return split_batch(batch[0])
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, labels = batch
        if isinstance(inputs, Mapping):
            return (), dict(inputs), labels
        return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {}, labels
    raise UsageError(f"a batch must be a tensor, a dict, or (inputs, labels); got {type(batch).__name__}")


def first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise GraphoptError(f"the model returned {type(value).__name__}; distill needs a tensor (or a tuple starting with one)")


class FeatureTap:
    """Records the outputs of named modules during a forward pass."""

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise UsageError(f"features: {type(model).__name__} has no module {name!r}") from None
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[..., None]:
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.values[name] = first_tensor(output)
        return record

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
