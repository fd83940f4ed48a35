"""Safe loading (the hostile corpus) and atomic saving."""

from __future__ import annotations


import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.errors import InvalidModelError, UnsafeModelError, UsageError
from graphopt.io import load_model, save_model, staged_save
from tests.conftest import linear_model, make_model, run, save, tensor
from tests.hostile.corpus import build_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("hostile") / "corpus")


def test_every_hostile_model_is_refused_with_a_named_reason(corpus):
    for case in corpus:
        if case.loads:
            continue  # a legal model, refused when run (tests/test_cli.py)
        expected = UnsafeModelError if case.unsafe else InvalidModelError
        with pytest.raises(expected) as info:
            load_model(case.model)
        message = str(info.value).lower()
        assert "\n" not in message, case.name
        assert any(word in message for word in case.expect), (case.name, message)


def test_unsafe_cases_are_refused_before_anything_is_read(corpus, monkeypatch):
    """The external-data check runs on the bare protobuf: no tensor is deserialized."""
    import graphopt.io as io_module

    def no_deserialize(*args, **kwargs):
        raise AssertionError("deserialized an unsafe model")

    monkeypatch.setattr(io_module.ir.serde, "deserialize_model", no_deserialize)
    for case in (c for c in corpus if c.unsafe):
        with pytest.raises(UnsafeModelError):
            load_model(case.model)


def test_valid_external_data_inside_the_folder_loads(tmp_path, rng):
    model = linear_model(rng)
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data",
              size_threshold=0, all_tensors_to_one_file=True)
    loaded = load_model(tmp_path / "m.onnx")
    assert loaded.has_external_data
    assert [f.name for f in loaded.files] == ["m.onnx", "m.onnx.data"]
    assert loaded.file_bytes == sum(f.stat().st_size for f in tmp_path.iterdir())


def test_nan_in_a_constant_node_is_refused(tmp_path):
    value = np.array([1.0, np.nan], dtype=np.float32)
    model = make_model(
        [helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(value, "cval")),
         helper.make_node("Add", ["X", "c"], ["Y"])],
        [tensor("X", [2])], [tensor("Y", [2])],
    )
    with pytest.raises(InvalidModelError, match="contains NaN"):
        load_model(save(model, tmp_path / "m.onnx"))


def test_save_round_trips_and_leaves_no_staging_folder(tmp_path, rng):
    source = save(linear_model(rng), tmp_path / "in.onnx")
    loaded = load_model(source)
    save_model(loaded.model, tmp_path / "out.onnx", protected=loaded.files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx"]
    x = rng.standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(source, {"X": x})[0], run(tmp_path / "out.onnx", {"X": x})[0])


@pytest.mark.parametrize("error", [RuntimeError("verification failed"), KeyboardInterrupt()])
def test_failure_inside_the_staged_block_writes_nothing(tmp_path, rng, error):
    loaded = load_model(save(linear_model(rng), tmp_path / "in.onnx"))
    with pytest.raises(type(error)):
        with staged_save(loaded.model, tmp_path / "out.onnx") as staged:
            assert staged.model_path.exists()
            raise error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_existing_output_survives_a_failed_write(tmp_path, rng):
    loaded = load_model(save(linear_model(rng), tmp_path / "in.onnx"))
    (tmp_path / "out.onnx").write_bytes(b"previous result")
    with pytest.raises(RuntimeError):
        with staged_save(loaded.model, tmp_path / "out.onnx"):
            raise RuntimeError("boom")
    assert (tmp_path / "out.onnx").read_bytes() == b"previous result"


def test_output_equal_to_input_is_refused_and_input_is_unchanged(tmp_path, rng):
    source = save(linear_model(rng), tmp_path / "in.onnx")
    before = source.read_bytes()
    loaded = load_model(source)
    with pytest.raises(UsageError, match="overwrite the input"):
        save_model(loaded.model, tmp_path / "." / "in.onnx", protected=loaded.files)
    assert source.read_bytes() == before


def test_output_that_would_replace_the_inputs_data_file_is_refused(tmp_path, rng):
    onnx.save(linear_model(rng), tmp_path / "in.onnx", save_as_external_data=True,
              location="out.onnx.data", size_threshold=0)
    loaded = load_model(tmp_path / "in.onnx")
    with pytest.raises(UsageError, match="out.onnx.data"):
        save_model(loaded.model, tmp_path / "out.onnx", external_data=True, protected=loaded.files)


def test_external_data_output_is_complete_and_loads(tmp_path, rng):
    source = save(linear_model(rng, k=64, n=32), tmp_path / "in.onnx")
    loaded = load_model(source)
    save_model(loaded.model, tmp_path / "out.onnx", external_data=True)
    assert (tmp_path / "out.onnx.data").stat().st_size > 0
    reloaded = load_model(tmp_path / "out.onnx")
    assert reloaded.has_external_data
    x = rng.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_array_equal(run(source, {"X": x})[0], run(tmp_path / "out.onnx", {"X": x})[0])


def test_missing_output_folder_is_a_usage_error(tmp_path, rng):
    loaded = load_model(save(linear_model(rng), tmp_path / "in.onnx"))
    with pytest.raises(UsageError, match="does not exist"):
        save_model(loaded.model, tmp_path / "nowhere" / "out.onnx")
