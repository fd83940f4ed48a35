"""Structured channel pruning that removes channels for real.

Which channels are coupled, which to remove and how to cut each layer are kept apart
(as in Torch-Pruning): :func:`find_chains` finds producer → … → consumer chains, the
importance of an output channel is the L1 norm of its filter (scaled by the following
BatchNorm's |γ|/σ, the filter's effective gain), and one cutter per layer type slices the
weights.

Supported, inside one ``nn.Sequential`` (nested Sequentials are handled each on its own):

* ``Conv{1,2,3}d → [BatchNorm] → [element-wise / pooling / dropout]* → Conv`` (groups=1)
* ``Linear → [BatchNorm1d] → [element-wise / dropout]* → Linear``
* ``Conv → [BatchNorm] → […]* → Flatten → [dropout]* → Linear`` (each channel owns a
  contiguous block of the flattened features, as ``Flatten`` on NCHW lays them out)

Anything else ends a chain and is left alone: residual additions, concatenations, grouped or
depthwise convolutions, layers used outside a Sequential. The last layer of a Sequential is
never pruned (its outputs are the model's interface).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from graphopt.errors import UsageError

logger = logging.getLogger(__name__)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Modules that act on each channel independently: a removed channel just disappears.
_CHANNELWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid,
    nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)


@dataclasses.dataclass
class Chain:
    """``producer``'s output channels feed ``consumer``; ``norm`` sits between them, and each
    channel spans ``block`` consecutive input features of the consumer (1 unless a Flatten)."""

    producer: str
    consumer: str
    norm: str | None
    block: int


def _prunable_producer(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, _CONV) and module.groups == 1)


def _chain_from(seq: nn.Sequential, prefix: str, start: int) -> Chain | None:
    children = list(seq.named_children())
    producer = children[start][1]
    channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    norm, flatten = None, False
    for name, module in children[start + 1:]:
        if isinstance(module, _NORM) and norm is None and not flatten and module.num_features == channels:
            norm = prefix + name
        elif isinstance(module, _CHANNELWISE) and not (flatten and not isinstance(module, (nn.Dropout, nn.Identity))):
            continue
        elif isinstance(module, nn.Flatten) and isinstance(producer, _CONV) and not flatten:
            flatten = True
        elif isinstance(module, _CONV) and not flatten and isinstance(producer, _CONV) and module.groups == 1:
            return Chain(prefix + children[start][0], prefix + name, norm, 1)
        elif isinstance(module, nn.Linear) and (flatten or isinstance(producer, nn.Linear)):
            if module.in_features % channels:
                return None
            return Chain(prefix + children[start][0], prefix + name, norm, module.in_features // channels)
        else:
            return None
    return None


def find_chains(model: nn.Module) -> list[Chain]:
    """Every prunable producer → consumer chain of the model's Sequentials."""
    chains = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        prefix = f"{seq_name}." if seq_name else ""
        for index, (_, child) in enumerate(seq.named_children()):
            if _prunable_producer(child):
                chain = _chain_from(seq, prefix, index)
                if chain is not None:
                    chains.append(chain)
    return chains


def channel_importance(producer: nn.Module, norm: nn.Module | None) -> torch.Tensor:
    weight = producer.weight.detach()
    score = weight.abs().reshape(weight.shape[0], -1).sum(1)
    if isinstance(norm, _NORM) and norm.affine:
        score = score * norm.weight.detach().abs() / torch.sqrt(norm.running_var + norm.eps)
    return score


def _keep(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().index_select(dim, index).clone(), requires_grad=tensor.requires_grad)


def _cut_outputs(layer: nn.Module, keep: torch.Tensor) -> None:
    layer.weight = _keep(layer.weight, 0, keep)
    if layer.bias is not None:
        layer.bias = _keep(layer.bias, 0, keep)
    if isinstance(layer, nn.Linear):
        layer.out_features = len(keep)
    else:
        layer.out_channels = len(keep)


def _cut_norm(norm: nn.Module, keep: torch.Tensor) -> None:
    if norm.affine:
        norm.weight = _keep(norm.weight, 0, keep)
        norm.bias = _keep(norm.bias, 0, keep)
    if norm.running_mean is not None:
        norm.running_mean = norm.running_mean.index_select(0, keep).clone()
        norm.running_var = norm.running_var.index_select(0, keep).clone()
    norm.num_features = len(keep)


def _cut_inputs(layer: nn.Module, keep: torch.Tensor, block: int) -> None:
    features = (keep[:, None] * block + torch.arange(block)).reshape(-1) if block > 1 else keep
    layer.weight = _keep(layer.weight, 1, features)
    if isinstance(layer, nn.Linear):
        layer.in_features = len(features)
    else:
        layer.in_channels = len(features)


def prune_channels(model: nn.Module, *, ratio: float, min_channels: int = 1) -> dict[str, dict[str, int]]:
    """Remove, in place, the ``ratio`` least important output channels of every producer in a
    supported chain (rounded; at least ``min_channels`` kept) and the matching inputs of its
    consumer. Returns {producer: {channels_before, channels_after}}."""
    if not 0 <= ratio < 1:
        raise UsageError(f"prune ratio must be in [0, 1), got {ratio}")
    changes: dict[str, dict[str, int]] = {}
    for chain in find_chains(model):
        producer = model.get_submodule(chain.producer)
        norm = model.get_submodule(chain.norm) if chain.norm else None
        before = producer.weight.shape[0]
        kept = max(min_channels, before - round(ratio * before))
        if kept >= before:
            continue
        keep = torch.sort(torch.topk(channel_importance(producer, norm), kept).indices).values
        _cut_outputs(producer, keep)
        if norm is not None:
            _cut_norm(norm, keep)
        _cut_inputs(model.get_submodule(chain.consumer), keep, chain.block)
        changes[chain.producer] = {"channels_before": before, "channels_after": kept}
    logger.info("pruned %d layers", len(changes))
    return changes
