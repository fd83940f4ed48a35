"""A Llama-shaped decoder of any size, built from a seed with onnx and numpy, written tensor by
tensor to external data (never more than one weight in memory): the large model that
`--recipe int4`'s streaming is measured on (issue #21).

Shape: token embedding, ``layers`` blocks of RMS norm → Q/K/V projections → attention over the
KV cache (``past_key_values.{i}.key/value`` → ``present.{i}.key/value``, onnxruntime-genai's
layout) → output projection → residual, RMS norm → SiLU-gated MLP → residual; final norm and an
untied LM head. Random weights (N(0, 1/fan_in)), standard ONNX ops (opset 21) plus onnxruntime's
default-domain SimplifiedLayerNormalization. No rotary embedding and no causal mask: the
arithmetic and the bytes of a Llama, not its function.

    python -m graphopt.samples.synthetic_llama OUT_DIR [--hidden 2048 --intermediate 5632 --layers 18 --vocab 32000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphopt.verify.layout import PAST, PRESENT, cache_name


class _Writer:
    """Appends tensors to one external data file, aligned, and returns their TensorProtos."""

    def __init__(self, folder: Path, name: str = "model.onnx.data") -> None:
        self.name = name
        self.file = open(folder / name, "wb")  # noqa: SIM115 (closed by close())
        self.offset = 0
        self.bytes = 0

    def add(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        pad = -self.offset % 4096
        self.file.write(b"\0" * pad)
        self.offset += pad
        data = np.ascontiguousarray(array).tobytes()
        tensor = onnx.TensorProto(name=name, dims=list(array.shape), data_type=TensorProto.FLOAT,
                                  data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.name), ("offset", str(self.offset)), ("length", str(len(data)))):
            tensor.external_data.add(key=key, value=value)
        self.file.write(data)
        self.offset += len(data)
        self.bytes += len(data)
        return tensor

    def close(self) -> None:
        self.file.close()


def build(folder: Path, *, hidden: int = 2048, intermediate: int = 5632, layers: int = 18, vocab: int = 32000,
          heads: int = 16, seed: int = 0) -> dict[str, int]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = _Writer(folder)
    head_dim = hidden // heads
    nodes, inits = [], []

    def weight(name: str, shape: tuple[int, int]) -> str:
        inits.append(writer.add(name, (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])).astype(np.float32)))
        return name

    def const(name: str, values: list[int]) -> str:
        inits.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
        return name

    def norm(x: str, name: str) -> str:
        inits.append(helper.make_tensor(f"{name}.weight", TensorProto.FLOAT, [hidden], [1.0] * hidden))
        nodes.append(helper.make_node("SimplifiedLayerNormalization", [x, f"{name}.weight"], [f"{name}.out"],
                                      epsilon=1e-5, axis=-1, name=name))
        return f"{name}.out"

    def node(op: str, inputs: list[str], output: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    heads_shape = const("heads_shape", [0, 0, heads, head_dim])
    merged_shape = const("merged_shape", [0, 0, hidden])
    scale = "attn_scale"
    inits.append(helper.make_tensor(scale, TensorProto.FLOAT, [], [1.0 / np.sqrt(head_dim)]))
    embedding = weight("model.embed_tokens.weight", (vocab, hidden))
    x = node("Gather", [embedding, "input_ids"], "embedded")
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"])]
    outputs = []
    for i in range(layers):
        p = f"model.layers.{i}"
        h = norm(x, f"{p}.input_layernorm")
        q, k, v = (node("MatMul", [h, weight(f"{p}.self_attn.{n}_proj.weight", (hidden, hidden))], f"{p}.{n}")
                   for n in "qkv")
        q, k, v = (node("Transpose", [node("Reshape", [t, heads_shape], f"{t}.heads")], f"{t}.bhsd", perm=[0, 2, 1, 3])
                   for t in (q, k, v))
        past_k, past_v = cache_name(PAST, i, "key"), cache_name(PAST, i, "value")
        inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", heads, "past", head_dim])
                   for name in (past_k, past_v)]
        keys = node("Concat", [past_k, k], cache_name(PRESENT, i, "key"), axis=2)
        values = node("Concat", [past_v, v], cache_name(PRESENT, i, "value"), axis=2)
        outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", heads, "total", head_dim])
                    for name in (keys, values)]
        scores = node("Mul", [node("MatMul", [q, node("Transpose", [keys], f"{p}.kT", perm=[0, 1, 3, 2])],
                                   f"{p}.qk"), scale], f"{p}.scores")
        attended = node("MatMul", [node("Softmax", [scores], f"{p}.probs", axis=-1), values], f"{p}.attended")
        merged = node("Reshape", [node("Transpose", [attended], f"{p}.bshd", perm=[0, 2, 1, 3]), merged_shape],
                      f"{p}.merged")
        x = node("Add", [x, node("MatMul", [merged, weight(f"{p}.self_attn.o_proj.weight", (hidden, hidden))],
                                 f"{p}.o")], f"{p}.attn_residual")
        h = norm(x, f"{p}.post_attention_layernorm")
        gate = node("MatMul", [h, weight(f"{p}.mlp.gate_proj.weight", (hidden, intermediate))], f"{p}.gate")
        up = node("MatMul", [h, weight(f"{p}.mlp.up_proj.weight", (hidden, intermediate))], f"{p}.up")
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}.sigmoid")], f"{p}.silu")
        down = node("MatMul", [node("Mul", [silu, up], f"{p}.gated"),
                               weight(f"{p}.mlp.down_proj.weight", (intermediate, hidden))], f"{p}.down")
        x = node("Add", [x, down], f"{p}.mlp_residual")
    logits = node("MatMul", [norm(x, "model.norm"), weight("lm_head.weight", (hidden, vocab))], "logits")
    outputs.insert(0, helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", "sequence", vocab]))
    writer.close()
    graph = helper.make_graph(nodes, "synthetic_llama", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.save(model, folder / "model.onnx")  # the big tensors are already external
    config = {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "vocab_size": vocab, "num_attention_heads": heads, "num_key_value_heads": heads, "seed": seed}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return {"weight_bytes": writer.bytes, "file_bytes": (folder / "model.onnx").stat().st_size + writer.offset}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = build(args.out, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                  vocab=args.vocab, heads=args.heads, seed=args.seed)
    print(json.dumps(sizes))


if __name__ == "__main__":
    main()
