"""A reduced run of benchmarks/bench_distill.py's digits protocol: one fold, few epochs."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")


@pytest.mark.slow
def test_one_digits_fold_distills_a_4x_smaller_student():
    from sklearn.model_selection import StratifiedKFold

    from benchmarks.distill_digits import digits_arrays, digits_fold

    x, y = digits_arrays()
    train, test = next(StratifiedKFold(n_splits=5, shuffle=True, random_state=0).split(x, y))
    result = digits_fold(x, y, train, test, epochs=8, seed=0, grid=((2.0, 0.5),))
    assert result["teacher_params"] >= 4 * result["student_params"]
    assert result["teacher"] > 0.93
    (student,) = result["students"]
    assert student["test"] > 0.93 and student["val_accuracy"] > 0.9
    assert student["test"] >= result["teacher"] - 0.03
