"""Run a decoder LLM exported in onnxruntime-genai's layout, with its KV cache.

The layout (what ``graphopt export`` writes and onnxruntime-genai reads):

* inputs ``input_ids`` [batch, sequence], ``attention_mask`` [batch, past + sequence],
  ``position_ids`` [batch, sequence] (optional), ``past_key_values.{i}.key/value``
  [batch, kv_heads, past, head_size];
* outputs ``logits`` [batch, sequence, vocab] and ``present.{i}.key/value``
  [batch, kv_heads, past + sequence, head_size].

A fused model (``GroupQueryAttention``) takes batch > 1 only for a prefill (empty past) or a
one-token decode step, as onnxruntime-genai drives it; this runner does the same.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import DataError, UnsupportedModelError, UsageError, require_extra
from graphopt.verify.layout import LOGITS, LOGITS_TO_KEEP, PAST, REQUIRED_INPUTS, present_for, sorted_past



@dataclasses.dataclass(frozen=True)
class DecoderSignature:
    """What a session says about a decoder in the genai layout."""

    past_names: tuple[str, ...]  # layer 0 key, layer 0 value, layer 1 key, … (verify.layout)
    present_names: tuple[str, ...]
    kv_heads: int
    head_size: int
    has_position_ids: bool
    float_type: Any  # numpy dtype of the cache

    @property
    def layers(self) -> int:
        return len(self.past_names) // 2


def decoder_signature(session: Any, name: str = "model", config: dict[str, Any] | None = None) -> DecoderSignature:
    """The cache layout of ``session``; UnsupportedModelError when it is not a genai-layout decoder.
    ``config``: the ``decoder`` part of a genai_config.json, for head counts the graph leaves symbolic."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    past = sorted_past(inputs)
    missing = [n for n in REQUIRED_INPUTS if n not in inputs]
    if missing or not past or LOGITS not in outputs:
        raise UnsupportedModelError(
            f"{name}: not a decoder with a KV cache in onnxruntime-genai's layout (needs {', '.join(REQUIRED_INPUTS)}, "
            f"{PAST}.N.key/value and {LOGITS})")
    present = tuple(present_for(n) for n in past)
    absent = [n for n in present if n not in outputs]
    if absent:
        raise UnsupportedModelError(f"{name}: output {absent[0]} (for {past[0]}) is missing")
    shape = list(inputs[past[0]].shape)
    if len(shape) == 4 and config:
        shape[1] = shape[1] if isinstance(shape[1], int) else config.get("num_key_value_heads")
        shape[3] = shape[3] if isinstance(shape[3], int) else config.get("head_size")
    if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
        raise UnsupportedModelError(f"{name}: {past[0]} must be [batch, kv_heads, past, head_size] with fixed "
                                    f"kv_heads and head_size, has {shape}")
    dtype = np.float16 if "float16" in inputs[past[0]].type else np.float32
    return DecoderSignature(tuple(past), present, int(shape[1]), int(shape[3]), "position_ids" in inputs, dtype)


class OrtDecoder:
    """One onnxruntime session over a genai-layout decoder: prefill, cached decode steps, greedy."""

    def __init__(self, model: str | Path | bytes, *, threads: int | None = None, optimize: bool = True,
                 name: str | None = None) -> None:
        from graphopt.verify.runtime import make_session

        self.session = make_session(model, optimize=optimize, threads=threads)
        config = None
        if not isinstance(model, bytes) and (Path(model).parent / "genai_config.json").is_file():
            genai = json.loads((Path(model).parent / "genai_config.json").read_text(encoding="utf-8"))
            config = genai.get("model", {}).get("decoder")
        self.signature = decoder_signature(self.session, name or (str(model) if not isinstance(model, bytes) else "model"),
                                           config)
        self._outputs = [LOGITS, *self.signature.present_names]
        # keep-logits: the head limited to the last positions on request (a generation's prefill)
        self.keeps_logits = any(i.name == LOGITS_TO_KEEP for i in self.session.get_overridable_initializers())

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        empty = np.zeros((batch, self.signature.kv_heads, 0, self.signature.head_size), self.signature.float_type)
        return [empty] * len(self.signature.past_names)

    def step(self, input_ids: np.ndarray, cache: Sequence[np.ndarray],
             attention_mask: np.ndarray | None = None, *, last: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits of ``input_ids`` [batch, sequence] after ``cache`` (past length from it), and the
        cache that includes them. Without a mask every position is attended. ``last``: only the
        last position's logits are needed ([batch, 1, vocab] where the model can limit its head,
        else every position's)."""
        feed = self.feed(input_ids, cache, attention_mask)
        if last and self.keeps_logits:
            feed[LOGITS_TO_KEEP] = np.asarray(1, np.int64)
        logits, *present = self.session.run(self._outputs, feed)
        return logits, present

    def feed(self, input_ids: np.ndarray, cache: Sequence[np.ndarray],
             attention_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The model's inputs for ``step``."""
        batch, length = input_ids.shape
        past = cache[0].shape[2] if cache else 0
        if attention_mask is None:
            attention_mask = np.ones((batch, past + length), np.int64)
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        if self.signature.has_position_ids:
            # Left padding: a row's positions count its attended tokens only.
            positions = np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0)[:, -length:]
            feed["position_ids"] = positions.astype(np.int64)
        feed.update(zip(self.signature.past_names, cache))
        return feed

    def greedy(self, prompt: Sequence[int], new_tokens: int, *, stop: Sequence[int] = ()) -> Iterator[int]:
        """Greedy continuation of ``prompt`` (token ids), one token at a time, with the cache."""
        logits, cache = self.step(np.asarray([list(prompt)], np.int64), self.empty_cache(), last=True)
        for _ in range(new_tokens):
            token = int(np.argmax(logits[0, -1]))
            yield token
            if token in stop:
                return
            logits, cache = self.step(np.asarray([[token]], np.int64), cache)

    def teacher_forced(self, prompt: Sequence[int], continuation: Sequence[int]) -> list[np.ndarray]:
        """Last-position logits after the prompt (prefill) and after each token of
        ``continuation`` fed one at a time with the cache: len(continuation) + 1 vectors."""
        logits, cache = self.step(np.asarray([list(prompt)], np.int64), self.empty_cache(), last=True)
        rows = [logits[0, -1]]
        for token in continuation:
            logits, cache = self.step(np.asarray([[token]], np.int64), cache)
            rows.append(logits[0, -1])
        return rows


# -- model folders --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecoderFolder:
    folder: Path
    model: Path
    tokenizer: Any  # tokenizers.Tokenizer
    stop_ids: tuple[int, ...]


def open_folder(path: str | Path) -> DecoderFolder:
    """The model, tokenizer and stop tokens of a decoder folder; one-line errors naming what is missing."""
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"{folder}: not a folder; give the folder graphopt export wrote")
    models = sorted(folder.glob("*.onnx"))
    if not models:
        raise UnsupportedModelError(f"{folder}: no .onnx model in the folder")
    model = folder / "model.onnx" if (folder / "model.onnx").is_file() else models[0]
    if not (folder / "tokenizer.json").is_file():
        raise DataError(f"{folder}: no tokenizer.json: the folder's model has no tokenizer to read text with")
    Tokenizer = require_extra("tokenizers", extra="llm", purpose=f"reading {folder / 'tokenizer.json'}").Tokenizer  # noqa: N806
    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as exc:  # the library raises its own Exception subclass for a malformed file
        raise DataError(f"{folder / 'tokenizer.json'}: cannot read it: {exc}") from None
    return DecoderFolder(folder, model, tokenizer, _stop_ids(folder))


def _stop_ids(folder: Path) -> tuple[int, ...]:
    for name, keys in (("genai_config.json", ("model", "eos_token_id")), ("generation_config.json", ("eos_token_id",)),
                       ("config.json", ("eos_token_id",))):
        path = folder / name
        if not path.is_file():
            continue
        value: Any = json.loads(path.read_text(encoding="utf-8"))
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            return tuple(value) if isinstance(value, list) else (int(value),)
    return ()


def folder_bytes(folder: DecoderFolder) -> int:
    """Bytes of the model file and its external data (the tokenizer and configs are not the model)."""
    from graphopt.io import external_files

    return folder.model.stat().st_size + sum(path.stat().st_size for path in external_files(folder.model))
