"""`graphopt generate`: a greedy continuation from a decoder model folder, streamed as it is
decoded, with onnxruntime and the folder's own tokenizer, so a person can try what they ship.

A model folder is what ``graphopt export`` writes (and onnxruntime-genai reads): ``model.onnx``
(+ external data), ``tokenizer.json`` and ``genai_config.json`` (or ``config.json``) naming the
end-of-sequence token. Only the ``tokenizers`` library is needed, not torch or transformers.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from graphopt.errors import DataError, UnsupportedModelError, UsageError


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
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise UsageError(f"generate needs the tokenizers package: pip install tokenizers ({exc})") from None
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


def generate(folder: str | Path, prompt: str, *, max_new_tokens: int = 64, threads: int | None = None,
             stop: bool = True) -> Iterator[str]:
    """The continuation of ``prompt``, piece by piece as tokens are decoded (greedy, with the
    cache). ``stop``: end at the folder's end-of-sequence token."""
    from graphopt.verify.decoder import OrtDecoder

    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    opened = open_folder(folder)
    prompt_ids = opened.tokenizer.encode(prompt).ids
    if not prompt_ids:
        raise DataError("the prompt is empty after tokenization")
    decoder = OrtDecoder(opened.model, threads=threads, name=str(opened.model))
    tokens: list[int] = []
    shown = ""
    for token in decoder.greedy(prompt_ids, max_new_tokens, stop=opened.stop_ids if stop else ()):
        if token in opened.stop_ids and stop:
            break
        tokens.append(token)
        # Decode the whole continuation: a character may span tokens (byte-level BPE).
        text = opened.tokenizer.decode(tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        yield text[len(shown):]
        shown = text
