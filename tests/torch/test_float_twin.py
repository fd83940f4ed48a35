"""benchmarks/float_twin.py: the twin computes what its source computes, and no block of its weights
stays on the source's grid (a tiny Llama whose weights are first snapped to Q4_1 / Q8_0 grids)."""

import numpy as np
import pytest
import torch

from benchmarks.float_twin import BLOCK, make_float_twin, on_grid, on_q8_grid, reparametrize
from tests.conftest import tiny_decoder


def _snap_q4_1(weight: torch.Tensor) -> torch.Tensor:
    """GGUF Q4_1's grid: per block of 32 along the input, lo + k·(max − min)/15, k in 0..15."""
    blocks = weight.reshape(-1, BLOCK)
    lo, hi = blocks.min(dim=1, keepdim=True).values, blocks.max(dim=1, keepdim=True).values
    step = (hi - lo) / 15
    return (lo + torch.round((blocks - lo) / step) * step).reshape(weight.shape)


def _snap_q8_0(weight: torch.Tensor) -> torch.Tensor:
    blocks = weight.reshape(-1, BLOCK)
    scale = blocks.abs().max(dim=1, keepdim=True).values / 127
    return (torch.round(blocks / scale) * scale).reshape(weight.shape)


def _gridded_llama(folder):
    from transformers import AutoModelForCausalLM

    tiny_decoder(folder, "Llama")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(_snap_q4_1(module.weight))
        model.model.embed_tokens.weight.copy_(_snap_q8_0(model.model.embed_tokens.weight))
    model.save_pretrained(folder)
    return folder


def test_twin_keeps_the_function_and_leaves_every_grid(tmp_path):
    check = make_float_twin(_gridded_llama(tmp_path / "source"), tmp_path / "twin", sigma=0.3, seed=0)
    assert check.linear_on_grid == (1.0, 0.0)
    assert check.table_on_grid == (1.0, 0.0)
    assert check.max_abs_relative < 1e-5
    assert check.written_max_abs_relative == check.max_abs_relative  # float32 written as computed
    assert check.passed()


def test_grid_tests_tell_grids_from_floats():
    rng = np.random.default_rng(0)
    floats = rng.standard_normal((64, BLOCK)).astype(np.float32)
    codes = rng.integers(0, 16, (64, BLOCK))
    codes[:, 0] = 3  # a grid whose extremes are not both used: j < 15
    gridded = (0.37 + 0.021 * codes).astype(np.float32)
    assert on_grid(gridded, levels=16).all()
    assert not on_grid(floats, levels=16).any()
    assert not on_grid(gridded * rng.uniform(0.5, 2, BLOCK).astype(np.float32), levels=16).any()
    q8_codes = rng.integers(-127, 128, (64, BLOCK))
    q8_codes[:, 0] = -127  # Q8_0's scale is the block's max |value| / 127
    assert on_q8_grid((0.013 * q8_codes).astype(np.float32)).all()
    assert not on_q8_grid(floats).any()


def test_refuses_a_layout_it_would_break(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_decoder(tmp_path / "moe", "Qwen3Moe", tokenizer=False))
    with pytest.raises(ValueError, match="not a Llama-style decoder"):
        reparametrize(model, sigma=0.3, seed=0)
