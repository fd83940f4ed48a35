"""Sample data and models for the demo, the tests and the benchmarks, made offline.

* PP-OCRv4 models shipped in ``rapidocr_onnxruntime`` (text detection, recognition, angle
  classification) and rendered English text to feed them, preprocessed as RapidOCR does.
* A frozen corpus of English prose: the docstring sentences of Python's standard library
  (``sentences.txt`` beside this file; ``benchmarks/datasets.py`` builds and splits it).

Pillow is needed for rendering (``pip install -e ".[demo]"``); it is imported on use.

Command line (``make demo`` uses it)::

    python -m graphopt.samples ocr-images --n 16 --seed 0 --out images.npz
    python -m graphopt.samples ocr-lines --n 32 --seed 0 --out lines.npz
    python -m graphopt.samples ppocr-model det --out det.onnx
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import ImageFont

SENTENCES_FILE = Path(__file__).parent / "sentences.txt"


@lru_cache(maxsize=1)
def all_sentences() -> tuple[str, ...]:
    """The frozen sentence corpus: the same on every machine and in every process."""
    return tuple(line for line in SENTENCES_FILE.read_text(encoding="utf-8").splitlines() if line)



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
        for s in all_sentences()
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


# --------------------------------------------------------------------------- CLI

PPOCR_MODELS = {"det": "ch_PP-OCRv4_det_infer.onnx", "rec": "ch_PP-OCRv4_rec_infer.onnx",
                "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx"}


def _save(out: str, array: np.ndarray, start: float) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{PPOCR_DET_INPUT: array})
    print(f"wrote {path}: {PPOCR_DET_INPUT} {array.shape} {array.dtype} ({time.perf_counter() - start:.1f} s)")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m graphopt.samples``."""
    parser = argparse.ArgumentParser(prog="python -m graphopt.samples", description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, height, width, n, what in (("ocr-images", 320, 320, 16, "rendered text images for PP-OCRv4 det"),
                                        ("ocr-lines", 48, 320, 32, "text lines for PP-OCR rec (48x320) and cls (48x192)")):
        command = sub.add_parser(name, help=f"{what} (npz key '{PPOCR_DET_INPUT}')")
        command.add_argument("--n", type=int, default=n)
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--height", type=int, default=height)
        command.add_argument("--width", type=int, default=width)
        command.add_argument("--out", required=True)
    model = sub.add_parser("ppocr-model", help="copy a PP-OCR model shipped in rapidocr_onnxruntime")
    model.add_argument("which", choices=sorted(PPOCR_MODELS))
    model.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        _run(args, start)
    except (ImportError, RuntimeError) as exc:  # Pillow or rapidocr missing: say what to install
        raise SystemExit(f"graphopt.samples: {exc}") from None


def _run(args: argparse.Namespace, start: float) -> None:
    if args.command == "ocr-images":
        _save(args.out, render_text_images(args.n, seed=args.seed, height=args.height, width=args.width), start)
    elif args.command == "ocr-lines":
        _save(args.out, render_text_lines(args.n, seed=args.seed, height=args.height, width=args.width), start)
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ppocr_model_path(PPOCR_MODELS[args.which]), args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
