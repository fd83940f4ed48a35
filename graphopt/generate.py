"""`graphopt generate`: a greedy continuation from a decoder model folder, streamed as it is
decoded, with onnxruntime and the folder's own tokenizer, so a person can try what they ship.

A model folder is what ``graphopt export`` writes (and onnxruntime-genai reads): ``model.onnx``
(+ external data), ``tokenizer.json`` and ``genai_config.json`` (or ``config.json``) naming the
end-of-sequence token. Only the ``tokenizers`` library is needed, not torch or transformers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from graphopt.errors import DataError, UsageError


def generate(folder: str | Path, prompt: str, *, max_new_tokens: int = 64, threads: int | None = None,
             stop: bool = True) -> Iterator[str]:
    """The continuation of ``prompt``, piece by piece as tokens are decoded (greedy, with the
    cache). ``stop``: end at the folder's end-of-sequence token."""
    from graphopt.verify.decoder import OrtDecoder, open_folder

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
