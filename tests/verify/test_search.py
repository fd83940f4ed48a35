"""verify.search: the bisections every pass's search uses."""

from __future__ import annotations

import pytest

from graphopt.verify.search import most_rungs, retreat


@pytest.mark.parametrize("limit", [0, 1, 7, 12, 63, 64])
def test_most_rungs_finds_the_last_that_fits_trying_the_top_first(limit):
    probes = []

    def fits(rungs: int) -> bool:
        probes.append(rungs)
        return rungs <= limit

    assert most_rungs(fits, 0, 64) == limit
    assert probes[0] == 64 and len(probes) <= 1 + 6  # the top, then log2(64) halvings at most
    assert 0 not in probes  # rung 0 is taken to fit (measured by the caller)


def test_a_retreat_halves_the_rungs_left():
    assert retreat(10, 30, 0) == 10
    assert retreat(10, 30, 1) == 20
    assert retreat(10, 30, 2) == 25
