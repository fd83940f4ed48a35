"""benchmarks/distill_minilm.py: the extra text never holds a corpus sentence; fresh batches each epoch."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")


def test_fresh_each_epoch_keeps_the_fixed_part_and_cycles_through_the_pool():
    from benchmarks.distill_minilm import FreshEachEpoch

    pool = {"input_ids": np.arange(10)[:, None].repeat(4, 1), "attention_mask": np.ones((10, 4), np.int64)}
    fixed = ["a", "b"]
    mix = FreshEachEpoch(fixed, pool, per_epoch=4, batch_size=2, seed=0)
    assert len(mix) == 4
    seen = []
    for _ in range(3):
        items = list(mix)
        assert sorted(i for i in items if isinstance(i, str)) == fixed
        rows = [int(r) for i in items if not isinstance(i, str) for r in i["input_ids"][:, 0]]
        assert len(rows) == 4 and len(set(rows)) == 4
        seen += rows
    assert set(seen[:10]) == set(range(10))  # every pool sentence once before any repeats
    assert mix.seen == 10


def test_extra_text_reads_docstrings_without_importing_and_excludes_what_it_is_told_to(monkeypatch, tmp_path):
    from benchmarks import distill_minilm

    source = tmp_path / "never_imported.py"
    source.write_text('''raise SystemExit("imported")


def documented():
    """Returns the number of widgets that fit into the given box.

    A second paragraph explains how the widgets are counted by the box.
    """


class Thing:
    """This class holds the state of one widget between calls."""
''')
    monkeypatch.setattr(distill_minilm, "EXTRA_TEXT_MODULES", ("json.decoder",))
    monkeypatch.setattr(distill_minilm, "_extra_source_files", lambda corpus: [source])
    found = distill_minilm.extra_sentences(set())
    assert found == sorted(set(found))
    for sentence in ("Returns the number of widgets that fit into the given box.",
                     "This class holds the state of one widget between calls."):
        assert sentence in found
    assert any("JSON" in s for s in found)  # json.decoder's public docstrings, imported
    some = set(found[::2])
    assert not some & set(distill_minilm.extra_sentences(some))
