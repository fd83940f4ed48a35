"""Rendered document pages for the layout detector (PP-PicoDet, CDLA classes): a header, maybe a
title, one or two columns of paragraphs, figures (plots or photo-like), tables with captions, and
a page-number footer, with scan noise; preprocessed as rapid_layout does (608x800, BGR, ImageNet)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from benchmarks.real_models.images import BOLD, IMAGENET_MEAN, IMAGENET_STD, SERIF, font
from graphopt import samples

W, H = 850, 1100
BOTTOM = H - 140  # body text stops here, above the footer


def _fit(draw: ImageDraw.ImageDraw, text: str, face, width: float) -> str:
    while draw.textlength(text, font=face) > width:
        text = text.rsplit(" ", 1)[0]
    return text


def _paragraph(draw, rng, words, x0: int, x1: int, y: int, body) -> int:
    for _ in range(int(rng.integers(3, 10))):
        line, pending = "", list(rng.choice(words, 30))
        while pending and draw.textlength(line + " " + pending[0], font=body) < x1 - x0:
            line = (line + " " + pending.pop(0)).strip()
        draw.text((x0, y), line, font=body, fill=(20, 20, 20))
        y += int(body.size * 1.45)
        if y > BOTTOM:
            break
    return y + body.size


def _figure(img, draw, rng, words, x0: int, x1: int, y: int, small) -> int | None:
    height = int(rng.integers(120, 260))
    if y + height + 40 > H - 120:
        return None
    width = x1 - x0 - int(rng.integers(0, 60))
    fx = x0 + (x1 - x0 - width) // 2
    if rng.random() < 0.5:  # a line plot
        draw.line([(fx + 30, y), (fx + 30, y + height - 20), (fx + width, y + height - 20)], fill=(0, 0, 0), width=2)
        for _ in range(int(rng.integers(1, 4))):
            walk = np.cumsum(rng.normal(0, 8, 20)) + height / 2
            colour = tuple(int(v) for v in rng.integers(0, 200, 3))
            draw.line([(fx + 30 + i * (width - 40) / 19, y + float(np.clip(p, 5, height - 25)))
                       for i, p in enumerate(walk)], fill=colour, width=2)
    else:  # a photo-like patch
        photo = np.clip(rng.normal(128, 50, (height // 8, width // 8, 3)), 0, 255).astype(np.uint8)
        img.paste(Image.fromarray(photo).resize((width, height), Image.BICUBIC), (fx, y))
    y += height + 8
    caption = _fit(draw, f"Figure {int(rng.integers(1, 9))}: " + " ".join(rng.choice(words, int(rng.integers(4, 9)))),
                   small, x1 - x0)
    draw.text((x0 + (x1 - x0 - draw.textlength(caption, font=small)) / 2, y), caption, font=small, fill=(0, 0, 0))
    return y + 40


def _table(draw, rng, words, x0: int, x1: int, y: int, small) -> int | None:
    rows, cols, row_height = int(rng.integers(3, 8)), int(rng.integers(3, 6)), 22
    if y + rows * row_height + 40 > H - 120:
        return None
    caption = _fit(draw, f"Table {int(rng.integers(1, 9))}: " + " ".join(rng.choice(words, int(rng.integers(3, 7)))),
                   small, x1 - x0)
    draw.text((x0, y), caption, font=small, fill=(0, 0, 0))
    y += 22
    col_width = (x1 - x0) / cols
    for i in range(rows + 1):
        draw.line([(x0, y + i * row_height), (x1, y + i * row_height)], fill=(0, 0, 0), width=1 if 0 < i < rows else 2)
    for i in range(rows):
        for j in range(cols):
            cell = str(rng.choice(words)) if (i == 0 or j == 0) else f"{rng.uniform(0, 100):.2f}"
            draw.text((x0 + j * col_width + 4, y + i * row_height + 4), cell[:10], font=small, fill=(0, 0, 0))
    return y + rows * row_height + 30


def _column(img, draw, rng, words, x0: int, x1: int, y: int, body, small) -> None:
    while y < BOTTOM:
        r = rng.random()
        if r < 0.55:
            y = _paragraph(draw, rng, words, x0, x1, y, body)
            continue
        after = (_figure(img, draw, rng, words, x0, x1, y, small) if r < 0.75
                 else _table(draw, rng, words, x0, x1, y, small))
        if after is None:  # no room left in this column
            return
        y = after


def page(rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    words = samples._word_list()
    body, small = font(SERIF, int(rng.integers(13, 17))), font(SERIF, 11)
    margin = int(rng.integers(60, 90))
    two_columns = rng.random() < 0.5
    draw.text((margin, 30), " ".join(rng.choice(words, 5)) + f"   {int(rng.integers(1, 300))}", font=small,
              fill=(80, 80, 80))
    y = 80
    if rng.random() < 0.8:
        face = font(BOLD, int(rng.integers(24, 34)))
        title = _fit(draw, " ".join(w.capitalize() for w in rng.choice(words, int(rng.integers(3, 7)))), face,
                     W - 2 * margin)
        draw.text(((W - draw.textlength(title, font=face)) / 2, y), title, font=face, fill=(0, 0, 0))
        y += int(face.size * 2.2)
    columns = ([(margin, (W - 3 * margin // 2) // 2 + margin // 2), ((W + margin // 2) // 2, W - margin)]
               if two_columns else [(margin, W - margin)])
    for x0, x1 in columns:
        _column(img, draw, rng, words, x0, x1, y, body, small)
    draw.text((W / 2 - 10, H - 50), str(int(rng.integers(1, 300))), font=small, fill=(60, 60, 60))
    return img


def layout_pages(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, 800, 608), np.float32)
    for i in range(n):
        pixels = np.asarray(page(rng).resize((608, 800), Image.BILINEAR), np.float32)
        pixels = pixels + rng.normal(0, 2, pixels.shape)  # scan noise
        bgr = np.clip(pixels, 0, 255)[:, :, ::-1]
        out[i] = ((bgr / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    return out
