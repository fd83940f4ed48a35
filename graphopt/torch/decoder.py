"""Decoder LLMs: export a causal language model with its KV cache, in the layout onnxruntime-genai
reads, prove it generates what torch generates, and write a model folder.

``export_decoder(source, folder)``:

1. load a Hugging Face folder, or a ``.gguf`` file (transformers dequantizes it to float32);
2. wrap the model so that its cache is flat tensors (``past_key_values.{i}.key/value`` in,
   ``present.{i}.key/value`` out; the wrapper builds transformers' ``DynamicCache`` inside
   ``forward``, so ``torch.export`` sees plain tensors only) and export it with the dynamo exporter,
   batch, sequence and past length dynamic, weights as external data;
3. fuse attention, rotary embeddings and RMS norms into onnxruntime's CPU kernels (``fuse-decoder``);
4. verify against torch before anything is written: on each prompt the logits of the prefill and
   of ``decode_steps`` cached greedy steps (teacher-forced on torch's tokens) within ``max_abs``,
   and the greedy continuation itself, which may fork from torch's only where torch's two best
   logits nearly tie;
5. write the folder: ``model.onnx`` (+ ``model.onnx.data``), the tokenizer, ``config.json``,
   ``generation_config.json`` and a ``genai_config.json``, atomically (staged beside it, renamed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import json
import logging
import os
import pickle
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphopt.errors import GateFailed, UnsafeModelError, UnsupportedModelError, UsageError, reason, require_extra
from graphopt.verify.layout import LOGITS, PAST, PRESENT, cache_names, genai_names, is_present

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TIE_MARGIN = 0.05  # torch's top two logits closer than this (in logit units) count as a near tie

DEFAULT_PROMPTS = (
    "The capital of France is", "Once upon a time, there was a", "def fibonacci(n):",
    "The three primary colors are", "Water boils at a temperature of", "My favourite food is",
    "In 1492, Christopher Columbus", "The quick brown fox", "To make a cup of tea, first",
    "import numpy as np\n", "The largest planet in the solar system is", "Photosynthesis is the process",
    "Dear Sir or Madam,", "Machine learning is", "The meaning of life is", "1, 2, 3, 4, 5,",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderExportOptions:
    fuse: bool = True
    """Fuse attention, rotary embeddings and RMS norms into onnxruntime's CPU kernels."""
    opset: int = 20
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    decode_steps: int = 32
    max_abs: float = 1e-3
    """Largest logit difference to torch, prefill and every cached step."""
    threads: int | None = None
    allow_pickle: bool = False
    """Load pickled weights (``pytorch_model.bin``, ``*.pt``) with torch's ``weights_only`` loader;
    without it a folder holding only pickled weights is refused before anything is read."""


# Pickled weight files: unpickling can run code; torch's weights_only loader refuses most of it.
_PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


@dataclasses.dataclass
class CausalLM:
    model: Any  # transformers PreTrainedModel, float32, eval
    tokenizer: Any
    source: Path


def load_causal_lm(source: str | os.PathLike, *, allow_pickle: bool = False) -> CausalLM:
    """A Hugging Face folder or a ``.gguf`` file, as a float32 causal LM and its tokenizer.
    UnsupportedModelError (exit 2) when it is not a causal LM or has no tokenizer; UnsafeModelError
    (exit 2) for pickled weights without ``allow_pickle``, or ones torch's safe loader refuses."""
    path = Path(source)
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    transformers = require_extra("transformers", extra="llm", purpose="export")
    AutoConfig, AutoModelForCausalLM, AutoTokenizer = (transformers.AutoConfig,  # noqa: N806
                                                       transformers.AutoModelForCausalLM, transformers.AutoTokenizer)
    if path.is_file() and path.suffix.lower() == ".gguf":
        folder, extra = path.parent, {"gguf_file": path.name}
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise UnsupportedModelError(f"{path}: no config.json: not a Hugging Face model folder")
        folder, extra = path, _weights_choice(path, allow_pickle)
    else:
        raise UsageError(f"{path}: give a Hugging Face model folder or a .gguf file")
    with _quiet():
        try:
            config = AutoConfig.from_pretrained(folder, **extra)
        except (ValueError, KeyError, OSError) as exc:
            raise UnsupportedModelError(f"{path}: cannot read the model's configuration: {reason(exc)}") from None
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(_causal(name) for name in architectures) and "gguf_file" not in extra:
        raise UnsupportedModelError(f"{path}: not a causal language model (architectures: "
                                    f"{', '.join(architectures) or 'none'}); export takes text-generation models")
    started = time.perf_counter()
    with _quiet():
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
        except pickle.UnpicklingError as exc:
            raise UnsafeModelError(f"{path}: torch's safe loader (weights_only) refused its pickled weights, nothing "
                                   f"of them was run: {reason(exc, 160)}") from None
        except (ValueError, KeyError) as exc:
            raise UnsupportedModelError(f"{path}: cannot load it as a causal language model: {reason(exc)}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        except (ValueError, OSError, TypeError) as exc:
            raise UnsupportedModelError(f"{path}: no usable tokenizer ({reason(exc)}); export needs one to verify "
                                        "the model as a text generator") from None
    if getattr(model.config, "num_key_value_heads", None) is None:
        model.config.num_key_value_heads = _kv_heads(model.config)
    experts = getattr(model.config, "num_experts", None) or getattr(model.config, "num_local_experts", None)
    if experts and hasattr(model, "set_experts_implementation"):
        # The default grouped_mm experts become a custom op no ONNX exporter translates.
        model.set_experts_implementation("batched_mm")
    logger.info("loaded %s (%s, %d layers) in %.1fs", path.name, type(model).__name__,
                model.config.num_hidden_layers, time.perf_counter() - started)
    return CausalLM(model, tokenizer, path)


def _kv_heads(config: Any) -> int:
    """The KV heads a cache layer holds when the config names no ``num_key_value_heads``: Falcon's
    ``num_kv_heads`` (one, for multi-query on its original layout), else every attention head."""
    if hasattr(config, "num_kv_heads") and hasattr(config, "multi_query"):
        if getattr(config, "new_decoder_architecture", False) or not config.multi_query:
            return config.num_kv_heads
        return 1
    return config.num_attention_heads


def _causal(architecture: str) -> bool:
    """A text-generation class: ``*ForCausalLM``, or one transformers maps to causal LM (GPT2LMHeadModel)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return architecture.endswith("ForCausalLM") or architecture in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def _weights_choice(folder: Path, allow_pickle: bool) -> dict[str, Any]:
    """How transformers may read the folder's weights: safetensors whenever there are any (never a
    pickle beside them); pickled weights alone only with ``allow_pickle``."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return {"use_safetensors": True}
    pickled = sorted(p.name for pattern in _PICKLED for p in folder.glob(pattern))
    if pickled and not allow_pickle:
        raise UnsafeModelError(f"{folder / pickled[0]}: pickled weights can run code when loaded; graphopt reads "
                               "safetensors (convert them), or give --allow-pickle to load them with torch's "
                               "weights_only loader")
    return {}


@contextlib.contextmanager
def _quiet() -> Any:
    """transformers and the exporters print and warn liberally; the report carries what matters."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _cache_keyword(model: Any) -> str:
    """transformers 5.2x renamed ``forward(past_key_values=)`` to ``forward(cache=)``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class FlatCacheDecoder(torch.nn.Module):
    """The causal LM with its cache as flat tensors: (ids, mask, positions, k0, v0, k1, …) →
    (logits, present k0, v0, …)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.keyword = _cache_keyword(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        # A plain cache for every layer: a config would give sliding-window layers (Mistral, Gemma 2/3)
        # whose bounded length torch.export turns into a fixed past length. The window still applies,
        # through the attention mask the model builds.
        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, return_dict=True, **{self.keyword: cache})
        present: list[torch.Tensor] = []
        for layer in cache.layers:  # updated in place: read the cache, not the (renamed) output field
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _head_size(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def export_onnx(model: Any, *, opset: int) -> Any:
    """The dynamo export of ``FlatCacheDecoder(model)``, as an ``onnx_ir.Model``."""
    import onnx_ir as ir

    config = model.config
    layers, kv_heads, head = config.num_hidden_layers, config.num_key_value_heads, _head_size(config)
    # Example sizes >= 2 everywhere, or torch.export specializes a dimension to 0 or 1.
    batch, length, past = 2, 3, 5
    args = (torch.randint(0, config.vocab_size, (batch, length)), torch.ones(batch, past + length, dtype=torch.int64),
            torch.arange(past, past + length).expand(batch, length).contiguous(),
            *[torch.randn(batch, kv_heads, past, head) for _ in range(2 * layers)])
    dim = torch.export.Dim
    b, s, p = dim("batch"), dim("sequence_length"), dim("past_sequence_length")
    # The mask's length is past + sequence: a derived dimension, left for export to infer.
    shapes = [{0: b, 1: s}, {0: b, 1: dim.AUTO}, {0: b, 1: s}, tuple([{0: b, 2: p}] * (2 * layers))]
    # The exporter logs each torchvision op it cannot register, straight to the terminal.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            FlatCacheDecoder(model).eval(), args, dynamo=True, opset_version=opset, optimize=True,
            input_names=["input_ids", "attention_mask", "position_ids", *cache_names(layers, PAST)],
            output_names=[LOGITS, *cache_names(layers, PRESENT)], dynamic_shapes=shapes, external_data=True)
    graph = program.model.graph
    for value in [*graph.inputs, *graph.outputs]:  # name the total length as onnxruntime-genai does
        if value.name == "attention_mask":
            value.shape = ir.Shape([value.shape[0], "total_sequence_length"])
        elif is_present(value.name):
            value.shape = ir.Shape([value.shape[0], value.shape[1], "total_sequence_length", value.shape[3]])
    return program.model


def _fuse(model: Any, threads: int | None) -> tuple[Any, dict[str, Any]]:
    """The model fused (``fuse-decoder``, verified), and what the pass did."""
    from graphopt.passes.base import PassContext
    from graphopt.passes.fuse_decoder import FuseDecoderPass

    result = FuseDecoderPass()(model, PassContext(threads=threads))
    return result.model, {"modified": result.modified, "changes": result.changes, "notes": result.notes}


def _keep_logits(model: Any) -> Any:
    """The model with the optional ``logits_to_keep`` input (``keep-logits``): a generation's
    prefill computes the LM head for its last position only."""
    from graphopt.passes.base import PassContext
    from graphopt.passes.keep_logits import KeepLogitsPass

    return KeepLogitsPass()(model, PassContext()).model


# -- verification against torch --------------------------------------------------------------


@torch.no_grad()
def torch_greedy(model: Any, prompt: list[int], steps: int) -> tuple[list[np.ndarray], list[int]]:
    """Torch's last-position logits after the prompt and after each greedy token (with its
    cache), and the greedy tokens."""
    from transformers import DynamicCache

    cache, keyword = DynamicCache(config=model.config), _cache_keyword(model)
    tokens, rows, step_input = [], [], torch.tensor([prompt])
    for _ in range(steps + 1):
        logits = model(input_ids=step_input, use_cache=True, **{keyword: cache}).logits[0, -1]
        rows.append(logits.numpy().copy())
        tokens.append(int(logits.argmax()))
        step_input = torch.tensor([[tokens[-1]]])
    return rows, tokens[:steps]


@dataclasses.dataclass(frozen=True)
class Fork:
    """Where the ONNX model's greedy continuation of a prompt leaves torch's."""

    prompt: str
    position: int
    torch_top2_gap: float  # torch's two best logits there, apart by this much
    near_tie: bool  # closer than TIE_MARGIN: rounding alone may pick either


@dataclasses.dataclass(frozen=True)
class DecoderParity:
    """The exported decoder against torch: the largest logit differences and the greedy forks."""

    prompts: int
    decode_steps: int
    prefill_max_abs: float
    decode_max_abs: float
    greedy_identical: int
    forks: list[Fork]

    def failures(self, max_abs: float) -> list[str]:
        """What refuses the export: logits beyond ``max_abs``, or a fork that is no near-tie."""
        failed = []
        worst = max(self.prefill_max_abs, self.decode_max_abs)
        if worst > max_abs:
            failed.append(f"logits differ from torch by {worst:.3g} (> {max_abs})")
        real = [fork for fork in self.forks if not fork.near_tie]
        if real:
            failed.append(f"greedy continuation of {real[0].prompt!r} forks from torch's at token "
                          f"{real[0].position} where torch's top two logits are {real[0].torch_top2_gap:.3g} apart")
        return failed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def verify_decoder(lm: CausalLM, model_path: Path, options: DecoderExportOptions) -> DecoderParity:
    """Logit parity (prefill and cached steps) and greedy agreement of the ONNX folder with torch."""
    from graphopt.verify.decoder import OrtDecoder

    decoder = OrtDecoder(model_path, threads=options.threads, name=str(model_path.name))
    worst_prefill = worst_decode = 0.0
    identical, forks = 0, []
    for text in options.prompts:
        prompt = lm.tokenizer(text)["input_ids"]
        reference, tokens = torch_greedy(lm.model, prompt, options.decode_steps)
        rows = decoder.teacher_forced(prompt, tokens)
        worst_prefill = max(worst_prefill, float(np.abs(rows[0] - reference[0]).max()))
        worst_decode = max(worst_decode, max(float(np.abs(a - b).max()) for a, b in zip(rows[1:], reference[1:])))
        # Fed torch's tokens, the ONNX model's own greedy choice at each step is its argmax: its
        # greedy continuation equals torch's up to the first step where the two argmaxes differ.
        at = next((i for i, (row, token) in enumerate(zip(rows, tokens)) if int(np.argmax(row)) != token), None)
        if at is None:
            identical += 1
            continue
        top2 = np.sort(reference[at])[-2:]
        gap = float(top2[1] - top2[0])
        forks.append(Fork(text, at, gap, gap < TIE_MARGIN))
    return DecoderParity(len(options.prompts), options.decode_steps, worst_prefill, worst_decode, identical, forks)


# -- the folder ------------------------------------------------------------------------------


def genai_config(config: Any, tokenizer: Any) -> dict[str, Any]:
    """onnxruntime-genai's description of the folder: a decoder whose cache grows each step
    (past and present are separate buffers), greedy by default."""
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else (tokenizer.pad_token_id or eos)
    context = getattr(config, "max_position_embeddings", 4096)
    return {
        "model": {
            "bos_token_id": config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": _head_size(config),
                "hidden_size": config.hidden_size,
                **genai_names(),
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": config.model_type,
            "vocab_size": config.vocab_size,
        },
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def _write_side_files(lm: CausalLM, folder: Path) -> None:
    config = lm.model.config
    with _quiet():
        lm.tokenizer.save_pretrained(folder)
        saved = config.to_dict()
        saved.pop("quantization_config", None)  # a GGUF's: the folder holds float32 weights
        (folder / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if getattr(lm.model, "generation_config", None) is not None:
            lm.model.generation_config.save_pretrained(folder)
    (folder / "genai_config.json").write_text(json.dumps(genai_config(config, lm.tokenizer), indent=4) + "\n",
                                              encoding="utf-8")


def export_decoder(source: str | os.PathLike, output: str | os.PathLike,
                   options: DecoderExportOptions = DecoderExportOptions()) -> dict[str, Any]:
    """Export, fuse, verify and write the model folder ``output``; returns the report (also in
    the folder as ``graphopt_export.json``). GateFailed, nothing written, when the parity fails."""
    import onnx_ir as ir

    from graphopt.io import check_new_folder, staged_folder, to_json

    started = time.perf_counter()
    out, source_path = Path(output), Path(source)
    check_new_folder(out, (source_path,))
    lm = load_causal_lm(source_path, allow_pickle=options.allow_pickle)
    with staged_folder(out, (source_path,)) as folder:
        target = folder / MODEL_FILE
        logger.info("exporting with the dynamo exporter (opset %d)", options.opset)
        clock = time.perf_counter()
        try:
            exported = export_onnx(lm.model, opset=options.opset)
        except Exception as exc:  # the exporter's failures are many and deep: name the model, keep the cause
            raise UnsupportedModelError(f"{source_path}: the exporter failed: {type(exc).__name__}: {reason(exc)}") from exc
        export_seconds = time.perf_counter() - clock
        fusion: dict[str, Any] = {"modified": False, "changes": {}, "notes": []}
        if options.fuse:
            exported, fusion = _fuse(exported, options.threads)
        exported = _keep_logits(exported)
        ir.save(exported, target, external_data=target.name + ".data")
        del exported
        logger.info("verifying against torch: %d prompts, prefill and %d cached steps each",
                    len(options.prompts), options.decode_steps)
        parity = verify_decoder(lm, target, options)
        report = {
            "source": str(source_path), "output": str(out), "architecture": type(lm.model).__name__,
            "layers": lm.model.config.num_hidden_layers, "opset": options.opset,
            "export_seconds": round(export_seconds, 2), "fusion": fusion, "parity": parity.to_dict(),
        }
        failed = parity.failures(options.max_abs)
        if failed:
            raise GateFailed(f"{out}: not written: " + "; ".join(failed), ["decoder_parity"], report=report)
        _write_side_files(lm, folder)
        report["seconds"] = round(time.perf_counter() - started, 2)
        (folder / "graphopt_export.json").write_text(to_json(report), encoding="utf-8")
    return report


__all__ = ["CausalLM", "DecoderExportOptions", "FlatCacheDecoder", "export_decoder", "genai_config",
           "load_causal_lm", "verify_decoder"]

