"""Recipes: built-ins parse, unknown keys list the valid ones, option types are checked."""

from __future__ import annotations

import pytest

from graphopt.errors import RecipeError
from graphopt.recipe import builtin_recipes, load_recipe, parse_recipe


def test_builtin_lossless_is_simplify_lift_cleanup_dead_channels():
    recipe = load_recipe("lossless")
    assert [p.name for p in recipe.passes] == ["simplify", "lift-constants", "cleanup", "prune-dead-channels"]
    assert recipe.never_larger and recipe.max_abs == 1e-4
    assert "lossless" in builtin_recipes()


def test_recipe_file_with_options(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('min_cosine = 1\n[[steps]]\npass = "simplify"\ncheck_n = 5\ntolerance = 1\n')
    recipe = load_recipe(path)
    (simplify,) = recipe.passes
    assert simplify.options.check_n == 5
    assert simplify.options.tolerance == 1.0 and isinstance(simplify.options.tolerance, float)
    assert recipe.min_cosine == 1.0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"steps": [{"pass": "simplify", "chek_n": 1}]},
         "step 1 (simplify): unknown key chek_n; valid keys: pass, check_n, fuse_bn, max_growth, tolerance"),
        ({"steps": [{"pass": "quantise"}]}, "unknown pass 'quantise'; available: cleanup, fix-input-shapes, fuse-attention, fuse-decoder, keep-logits, lift-constants"),
        ({"steps": [{"pass": "simplify", "check_n": "two"}]}, "'check_n' must be int, got 'two'"),
        ({"steps": [{"pass": "cleanup", "keep_value_info": 1}]}, "'keep_value_info' must be bool, got 1"),
        ({"steps": []}, "needs at least one [[steps]] table"),
        ({"steps": [{"check_n": 1}]}, "each [[steps]] table needs a 'pass' key"),
        ({"stepz": [], "steps": [{"pass": "cleanup"}]}, "unknown key stepz; valid keys: description, fallback, max_abs"),
        ({"never_larger": "yes", "steps": [{"pass": "cleanup"}]}, "'never_larger' must be bool"),
    ],
)
def test_malformed_recipes_name_the_problem(data, message):
    with pytest.raises(RecipeError) as info:
        parse_recipe(data, "r")
    assert message in str(info.value)


def test_unknown_recipe_name_lists_builtins():
    with pytest.raises(RecipeError, match="built-in recipes: .*lossless"):
        load_recipe("turbo")


def test_invalid_toml_is_a_recipe_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[[steps]\npass=")
    with pytest.raises(RecipeError, match="invalid TOML"):
        load_recipe(path)
