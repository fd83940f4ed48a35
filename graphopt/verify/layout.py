"""The decoder layout: how a decoder LLM with a KV cache names its inputs and outputs.

graphopt writes and reads onnxruntime-genai's layout: ``input_ids`` and ``attention_mask``
(``position_ids`` optional) in, ``logits`` out, and per layer ``past_key_values.{i}.key/value``
in, ``present.{i}.key/value`` out, each ``[batch, kv_heads, sequence, head_size]``. This module
is the one place those names are spelled; export, the fusion pass, feeds, the decoder runner and
the synthetic Llama all ask it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Literal

PAST = "past_key_values"
PRESENT = "present"
REQUIRED_INPUTS = ("input_ids", "attention_mask")
LOGITS = "logits"
# optional (an initializer, default 0: every position): logits of the last N positions only
LOGITS_TO_KEEP = "logits_to_keep"

Cache = Literal["past_key_values", "present"]
Part = Literal["key", "value"]

_PAST_NAME = re.compile(rf"^{re.escape(PAST)}\.(\d+)\.(key|value)$")


def cache_name(cache: Cache, layer: int, part: Part) -> str:
    return f"{cache}.{layer}.{part}"


def cache_names(layers: int, cache: Cache) -> list[str]:
    """Every layer's key and value, in order: layer 0 key, layer 0 value, layer 1 key, …"""
    return [cache_name(cache, layer, part) for layer in range(layers) for part in ("key", "value")]


def is_past(name: str | None) -> bool:
    return bool(name) and _PAST_NAME.match(name) is not None


def is_present(name: str | None) -> bool:
    return bool(name) and name.startswith(f"{PRESENT}.")


def past_position(name: str) -> tuple[int, bool]:
    """Sort key of a past input: (layer, is the value)."""
    match = _PAST_NAME.match(name)
    if match is None:
        raise ValueError(f"{name} is not a past cache input")
    return int(match.group(1)), match.group(2) == "value"


def present_for(past: str) -> str:
    """The output that returns the cache ``past`` was read from."""
    return past.replace(f"{PAST}.", f"{PRESENT}.", 1)


def sorted_past(names: Iterable[str]) -> list[str]:
    return sorted((name for name in names if is_past(name)), key=past_position)


def is_decoder(inputs: Iterable[Any]) -> bool:
    """A decoder LLM with a KV cache in this layout: the required inputs, and past inputs of
    shape [batch, kv_heads, sequence, head_size] with the heads and head size fixed (``inputs``:
    anything with ``name`` and ``shape``, such as ``verify.feeds.InputSpec``)."""
    inputs = list(inputs)
    names = {value.name for value in inputs}
    past = [value for value in inputs if is_past(value.name)]
    return set(REQUIRED_INPUTS) <= names and bool(past) and all(
        len(value.shape) == 4 and isinstance(value.shape[1], int) and isinstance(value.shape[3], int) for value in past)


def genai_names() -> dict[str, dict[str, str]]:
    """The ``inputs`` and ``outputs`` naming templates of a genai_config.json."""
    return {"inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                       "past_key_names": f"{PAST}.%d.key", "past_value_names": f"{PAST}.%d.value"},
            "outputs": {"logits": LOGITS, "present_key_names": f"{PRESENT}.%d.key",
                        "present_value_names": f"{PRESENT}.%d.value"}}


__all__ = ["LOGITS", "PAST", "PRESENT", "REQUIRED_INPUTS", "cache_name", "cache_names", "genai_names", "is_decoder", "is_past",
           "is_present", "past_position", "present_for", "sorted_past"]
