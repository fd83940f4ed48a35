"""Drop whole blocks of a layer stack (a transformer's ``encoder.layer`` ModuleList)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from graphopt.errors import UsageError

logger = logging.getLogger(__name__)

# Where common model families keep their block lists, tried in order when none is named.
DEFAULT_STACKS = ("encoder.layer", "bert.encoder.layer", "model.layers", "transformer.h", "layers", "blocks")


def find_stack(model: nn.Module) -> str:
    names = dict(model.named_modules())
    suffixes = [n for n in names if isinstance(names[n], nn.ModuleList) and any(n == s or n.endswith("." + s) for s in DEFAULT_STACKS)]
    if not suffixes:
        raise UsageError(f"no layer stack found (looked for a ModuleList named {', '.join(DEFAULT_STACKS)}); name it")
    return min(suffixes, key=len)


def drop_layers(model: nn.Module, *, keep: Sequence[int] | None = None, keep_every: int | None = None,
                stack: str | None = None) -> dict[str, object]:
    """Keep, in place, only the blocks ``keep`` (indices) or every ``keep_every``-th block
    (0, k, 2k, …) of the ModuleList ``stack`` (found automatically when not given), and
    update a Hugging Face ``config.num_hidden_layers`` it finds on the way."""
    if (keep is None) == (keep_every is None):
        raise UsageError("give exactly one of keep and keep_every")
    stack = stack or find_stack(model)
    blocks = model.get_submodule(stack)
    if not isinstance(blocks, nn.ModuleList):
        raise UsageError(f"{stack} is a {type(blocks).__name__}, not a ModuleList")
    count = len(blocks)
    if keep_every is not None:
        if keep_every < 1:
            raise UsageError(f"keep_every must be >= 1, got {keep_every}")
        keep = list(range(0, count, keep_every))
    keep = sorted(set(keep))  # type: ignore[arg-type]
    if not keep or keep[0] < 0 or keep[-1] >= count:
        raise UsageError(f"keep {keep} must name blocks of {stack} (0..{count - 1})")
    parent_name, _, child = stack.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.ModuleList(blocks[i] for i in keep))
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "num_hidden_layers", None) == count:
            config.num_hidden_layers = len(keep)
    logger.info("kept %d of %d blocks of %s", len(keep), count, stack)
    return {"stack": stack, "kept": keep, "blocks_before": count}
