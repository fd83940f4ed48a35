"""Shared helpers: tiny inline models and onnxruntime runs with optimizations off."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[np.ndarray | onnx.TensorProto] = (),
    *,
    opset: int = OPSET,
    names: Sequence[str] = (),
    ir_version: int = 8,
    full_check: bool = False,
) -> onnx.ModelProto:
    """A checked ModelProto (``full_check``: with shape inference too); numpy initializers are
    named by ``names`` in order."""
    tensors = [
        t if isinstance(t, onnx.TensorProto) else numpy_helper.from_array(t, name)
        for t, name in zip(initializers, list(names) + [""] * len(initializers))
    ]
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    onnx.checker.check_model(model, full_check=full_check)
    return model


def tensor(name: str, shape: Sequence[int | str | None], dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def save(model: onnx.ModelProto | ir.Model, path: Path) -> Path:
    if isinstance(model, ir.Model):
        ir.save(model, path)
    else:
        onnx.save(model, path)
    return path


def run(model: onnx.ModelProto | ir.Model | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs in onnxruntime with graph optimizations off, so it cannot mask a broken rewrite."""
    import onnxruntime as ort

    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def linear_model(rng: np.random.Generator, *, k: int = 8, n: int = 4) -> onnx.ModelProto:
    """X[N,k] → MatMul(W) → Add(b) → Relu → Y[N,n]."""
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    return make_model(
        [
            helper.make_node("MatMul", ["X", "W"], ["h"], name="matmul"),
            helper.make_node("Add", ["h", "b"], ["z"], name="add"),
            helper.make_node("Relu", ["z"], ["Y"], name="relu"),
        ],
        [tensor("X", ["N", k])],
        [tensor("Y", ["N", n])],
        [w, b],
        names=["W", "b"],
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def ppocr_det_path() -> Path:
    """The real PP-OCRv4 detection model shipped in the rapidocr-onnxruntime wheel."""
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("rapidocr-onnxruntime is not installed (pip install --no-deps rapidocr-onnxruntime)")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "ch_PP-OCRv4_det_infer.onnx"


def one_line_error(capsys) -> str:
    """The one stderr line of a refused command (no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def tiny_llama(folder: Path, *, tokenizer: bool = True, dtype: str = "float32", shard: str | None = None) -> Path:
    """A randomly initialised 2-layer Llama (GQA 4/2 heads, tied embeddings) as a Hugging Face
    folder, with a character-level tokenizer: a decoder LLM in seconds. ``dtype`` ("bfloat16",
    "float16") and ``shard`` (a max shard size such as "20KB") write it as users' checkpoints are."""
    return tiny_decoder(folder, "Llama", tokenizer=tokenizer, dtype=dtype, shard=shard, hidden_size=32,
                        intermediate_size=64, tie_word_embeddings=True)


TINY_GGUF_TYPES = {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q4_0",
                   "ffn_gate": "Q4_1", "ffn_up": "Q5_0", "ffn_down": "Q6_K", "token_embd": "Q8_0"}
"""What ``tiny_gguf`` writes each weight as: the K-quants and the legacy block types a GGUF mixes."""


def tiny_gguf(path: Path, *, types: dict[str, str] = TINY_GGUF_TYPES, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama written as llama.cpp writes one (``path``, a .gguf):
    hidden 256 and feed-forward 512 (K-quants need rows of a multiple of 256), GQA 4/2 heads,
    tied embeddings, a byte-level BPE vocabulary in the file, each weight in ``types``' type
    (K types by ``benchmarks.gguf_kquants``, the others by gguf-py), norms in F32."""
    import gguf

    from benchmarks import gguf_kquants

    rng = np.random.default_rng(seed)
    hidden, ffn, layers, heads, kv_heads = 256, 512, 2, 4, 2
    # byte-level BPE: printable ASCII as GPT-2 spells it (space is "Ġ"), a few merges
    chars = ["Ġ" if c == " " else c for c in map(chr, range(32, 127))]
    merged = ["th", "he", "the", "Ġt", "in"]
    tokens = ["<|endoftext|>", "<s>", "</s>", *chars, *merged]
    merges = ["t h", "h e", "th e", "Ġ t", "i n"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)

    def add(name: str, shape: tuple[int, ...], kind: str | None, scale: float = 0.05) -> None:
        values = (rng.standard_normal(shape) * scale).astype(np.float32)
        if kind is None:
            writer.add_tensor(name, values)
            return
        qtype = gguf.GGMLQuantizationType[kind]
        data = (gguf_kquants.quantize(values, kind) if kind in gguf_kquants.ENCODERS
                else gguf.quants.quantize(values, qtype))
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)

    add("token_embd.weight", (len(tokens), hidden), types["token_embd"], 0.5)
    head = hidden // heads
    outputs = {"attn_q": heads * head, "attn_k": kv_heads * head, "attn_v": kv_heads * head, "attn_output": hidden,
               "ffn_gate": ffn, "ffn_up": ffn, "ffn_down": hidden}
    for layer in range(layers):
        for part in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{part}.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        for part, rows in outputs.items():
            add(f"blk.{layer}.{part}.weight", (rows, ffn if part == "ffn_down" else hidden), types[part])
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Per family: (config class, model class, settings beyond the shared small ones; GPT-2 names its own).
TINY_FAMILIES: dict[str, tuple[str, str, dict]] = {
    "Llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "Mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),  # the prompts exceed the window
    "Qwen3Moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                                           "moe_intermediate_size": 32, "mlp_only_layers": []}),
    # soft-capped attention logits (a cap small enough to matter on random weights), sliding window
    "Gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 8,
                                                     "attn_logit_softcapping": 2.0, "initializer_range": 0.3}),
    "GPT2": ("GPT2Config", "GPT2LMHeadModel", {"vocab_size": 96, "n_embd": 64, "n_layer": 2, "n_head": 4,
                                               "n_positions": 256, "bos_token_id": 1, "eos_token_id": 2}),
    # 7B-style: multi-query (one KV head cached whatever num_kv_heads says), parallel attention
    "Falcon": ("FalconConfig", "FalconForCausalLM", {"vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 2,
                                                     "num_attention_heads": 4, "max_position_embeddings": 256,
                                                     "bos_token_id": 1, "eos_token_id": 2}),
}


def tiny_decoder(folder: Path, family: str, *, tokenizer: bool = True, dtype: str = "float32",
                 shard: str | None = None, **settings) -> Path:
    """A randomly initialised 2-layer decoder of ``family`` (``TINY_FAMILIES``) as a Hugging Face
    folder with a character-level tokenizer."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    config_class, model_class, extra = TINY_FAMILIES[family]
    torch.manual_seed(0)
    shared = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
              "bos_token_id": 1, "eos_token_id": 2}
    base = {} if family in ("GPT2", "Falcon") else shared  # their configs take other names, no KV-head count
    config = getattr(transformers, config_class)(**{**base, **extra, **settings})
    model = getattr(transformers, model_class)(config).eval().to(getattr(torch, dtype))
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    if tokenizer:
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
        for char in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?'\"()-_=+*/\n":
            vocab.setdefault(char, len(vocab))
        word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        word_level.pre_tokenizer = pre_tokenizers.Split("", "isolated")
        transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", bos_token="<s>",
                                             eos_token="</s>").save_pretrained(folder)
    return folder


_GRAPHOPT_LOGGER = logging.getLogger("graphopt")
# as the tests found it, before any fixture ran ``main``: a module-scoped fixture that does (the
# exported decoder) runs before a test's own fixtures, so a state saved per test would be its
_LOGGER_BASELINE = (list(_GRAPHOPT_LOGGER.handlers), _GRAPHOPT_LOGGER.propagate, _GRAPHOPT_LOGGER.level)


@pytest.fixture(autouse=True)
def _graphopt_logger_restored():
    """The CLI sets up the 'graphopt' logger for a terminal (its own handler, no propagation);
    a test that runs ``main`` (or a fixture that does) must not leave that to the tests after it
    (caplog reads through propagation): restored to the state before any test. A library
    configuring logging with ``dictConfig`` (the torch exporters) also disables every logger that
    exists by then: graphopt's are enabled again."""
    logger = _GRAPHOPT_LOGGER
    yield
    logger.handlers[:] = _LOGGER_BASELINE[0]
    logger.propagate, logger.level = _LOGGER_BASELINE[1], _LOGGER_BASELINE[2]
    for name, child in logging.root.manager.loggerDict.items():
        if name.startswith("graphopt") and isinstance(child, logging.Logger):
            child.disabled = False
