"""Fuzzing the loader and every registered pass (contract: tests/reliability/fuzz.py).

CI runs a short derandomized campaign; ``python scripts/fuzz.py --minutes N`` a longer one.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphopt.passes import available_passes
from tests.reliability.fuzz import MUTATIONS, ContractViolation, check_example, mutate
from tests.reliability.models import SEEDS

CI_EXAMPLES = 30


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("speed-profile")


@pytest.mark.parametrize("seed", sorted(SEEDS))
def test_every_pass_succeeds_on_every_unmutated_seed(seed, cache_dir, tmp_path):
    """The fuzzer's starting points are valid: every pass handles them without an error."""
    outcome = check_example(SEEDS[seed]().SerializeToString(), tmp_path, cache_dir=cache_dir)
    assert outcome.refused is None
    assert outcome.passes == {name: "ok" for name in available_passes()}


@settings(max_examples=CI_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(sorted(SEEDS)),
       mutations=st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3),
       rng_seed=st.integers(0, 2**32 - 1))
def test_mutated_models_load_or_are_refused_and_passes_never_crash(seed, mutations, rng_seed, cache_dir):
    with tempfile.TemporaryDirectory() as tmp:
        check_example(mutate(seed, mutations, random.Random(rng_seed)), Path(tmp), cache_dir=cache_dir)


def test_the_harness_catches_a_pass_that_breaks_the_model(tmp_path, cache_dir, monkeypatch):
    """The contract can fail: a pass whose output no longer loads is reported."""
    from graphopt.passes.cleanup import CleanupPass
    from graphopt.passes.base import PassResult

    def breaking(self, model, context):
        next(iter(model.graph)).op_type = "NoSuchOp"
        return PassResult(model, modified=False)

    monkeypatch.setattr(CleanupPass, "apply", breaking)
    with pytest.raises(ContractViolation, match="cleanup"):
        check_example(SEEDS["mlp"]().SerializeToString(), tmp_path, cache_dir=cache_dir, passes=["cleanup"])


def test_the_harness_lets_a_foreign_exception_through(tmp_path, monkeypatch):
    """A loader raising anything but an InputError is a failure, not an accepted refusal."""
    import graphopt.io

    def crash(path):
        raise KeyError("not a graphopt error")

    monkeypatch.setattr(graphopt.io, "load_model", crash)
    with pytest.raises(KeyError):
        check_example(b"anything", tmp_path, passes=[])
