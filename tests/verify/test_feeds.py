"""graphopt.verify.feeds: every data format graphopt accepts, random feeds, and the errors
that must name the offending input and say what the model expects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import DataError
from graphopt.verify.feeds import (
    DEFAULT_DYNAMIC_DIM,
    load_feeds,
    parse_shape_overrides,
    random_feeds,
)

from .models import identity_model, linear_model, make_model, specs_of, two_input_model

LINEAR_SIGNATURE = "X: float32[N,4]"


def _samples(count: int, width: int = 4) -> np.ndarray:
    return np.arange(count * width, dtype=np.float32).reshape(count, width)


# -- stacked .npz ---------------------------------------------------------------------------


def test_stacked_npz_is_cut_into_batches_with_a_partial_last_one(tmp_path: Path) -> None:
    # X float[N,4] → MatMul → Add → Y; 5 samples at --batch-size 2 → batches of 2, 2, 1.
    x = _samples(5)
    np.savez(tmp_path / "data.npz", X=x)

    feeds = load_feeds(tmp_path / "data.npz", specs_of(linear_model()), batch_size=2)

    assert [feed["X"].shape for feed in feeds.feeds] == [(2, 4), (2, 4), (1, 4)]
    np.testing.assert_array_equal(np.concatenate([feed["X"] for feed in feeds.feeds]), x)
    assert feeds.samples == 5
    assert not feeds.synthetic
    assert feeds.source == str(tmp_path / "data.npz")
    assert feeds.describe()["evidence"] == "data"


def test_stacked_npz_feeds_every_input_of_a_two_input_model(tmp_path: Path) -> None:
    # X float[N,4], ids int64[N,4] → Add → Y; both inputs are sliced at the same rows.
    x, ids = _samples(3), np.arange(12, dtype=np.int64).reshape(3, 4)
    np.savez(tmp_path / "data.npz", X=x, ids=ids)

    feeds = load_feeds(tmp_path / "data.npz", specs_of(two_input_model()), batch_size=2)

    assert [sorted(feed) for feed in feeds.feeds] == [["X", "ids"], ["X", "ids"]]
    np.testing.assert_array_equal(feeds.feeds[1]["ids"], ids[2:])
    assert feeds.feeds[1]["ids"].dtype == np.int64


def test_fixed_batch_model_takes_only_its_batch_size(tmp_path: Path) -> None:
    # X float[2,4] → MatMul → Add → Y: the model's static batch of 2 wins over --batch-size 1,
    # and the fifth sample, which cannot fill a batch, is left out.
    x = _samples(5)
    np.savez(tmp_path / "data.npz", X=x)

    feeds = load_feeds(tmp_path / "data.npz", specs_of(linear_model(batch=2)), batch_size=1)

    assert [feed["X"].shape for feed in feeds.feeds] == [(2, 4), (2, 4)]
    np.testing.assert_array_equal(np.concatenate([feed["X"] for feed in feeds.feeds]), x[:4])
    assert feeds.samples == 4


def test_fixed_batch_model_refuses_fewer_samples_than_its_batch(tmp_path: Path) -> None:
    # X float[2,4] → … ; one sample cannot make a batch of 2.
    np.savez(tmp_path / "data.npz", X=_samples(1))

    with pytest.raises(DataError, match="fewer samples than the model's fixed batch size 2"):
        load_feeds(tmp_path / "data.npz", specs_of(linear_model(batch=2)))


def test_extra_keys_such_as_labels_are_not_fed(tmp_path: Path) -> None:
    # X float[N,4] → … ; the .npz also carries labels, which are not an input of the model.
    np.savez(tmp_path / "data.npz", X=_samples(2), labels=np.array([0, 1]))

    feeds = load_feeds(tmp_path / "data.npz", specs_of(linear_model()), batch_size=2, extra_keys=["labels"])

    assert list(feeds.feeds[0]) == ["X"]


def test_batch_size_below_one_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "data.npz", X=_samples(2))

    with pytest.raises(DataError, match="batch size must be >= 1, got 0"):
        load_feeds(tmp_path / "data.npz", specs_of(linear_model()), batch_size=0)


# -- folder of .npz -------------------------------------------------------------------------


def test_folder_of_npz_gives_one_complete_feed_per_file(tmp_path: Path) -> None:
    # X float[N,4] → … ; each file is fed as it is, whatever its batch, in file-name order.
    folder = tmp_path / "feeds"
    folder.mkdir()
    np.savez(folder / "b.npz", X=_samples(3))
    np.savez(folder / "a.npz", X=_samples(1) + 100)

    feeds = load_feeds(folder, specs_of(linear_model()), batch_size=2)

    assert [feed["X"].shape for feed in feeds.feeds] == [(1, 4), (3, 4)]
    np.testing.assert_array_equal(feeds.feeds[0]["X"], _samples(1) + 100)
    assert feeds.samples == 4
    assert feeds.source == str(folder)


def test_folder_of_npz_checks_the_batch_axis_too(tmp_path: Path) -> None:
    # X float[2,4] → … ; a complete feed of 3 rows does not fit the static batch of 2.
    folder = tmp_path / "feeds"
    folder.mkdir()
    np.savez(folder / "one.npz", X=_samples(3))

    with pytest.raises(DataError) as caught:
        load_feeds(folder, specs_of(linear_model(batch=2)))

    assert "one.npz" in str(caught.value)
    assert "'X' has shape [3, 4]" in str(caught.value)
    assert "X: float32[2,4]" in str(caught.value)


def test_folder_without_data_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()

    with pytest.raises(DataError, match="neither .npz files nor test_data_set_"):
        load_feeds(tmp_path / "empty", specs_of(linear_model()))


# -- ONNX test-data folders -----------------------------------------------------------------


def _write_test_data_set(folder: Path, x: np.ndarray, ids: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for index, (name, array) in enumerate([("X", x), ("ids", ids)]):
        tensor = numpy_helper.from_array(array, name)
        (folder / f"input_{index}.pb").write_bytes(tensor.SerializeToString())


@pytest.fixture
def test_data_root(tmp_path: Path) -> Path:
    """Two test_data_set_* folders for the two-input model (X float[N,4], ids int64[N,4])."""
    root = tmp_path / "model_tests"
    _write_test_data_set(root / "test_data_set_0", _samples(1), np.ones((1, 4), np.int64))
    _write_test_data_set(root / "test_data_set_1", _samples(2) - 5, np.zeros((2, 4), np.int64))
    return root


def test_test_data_parent_folder_gives_one_feed_per_set(test_data_root: Path) -> None:
    feeds = load_feeds(test_data_root, specs_of(two_input_model()))

    assert len(feeds.feeds) == 2
    np.testing.assert_array_equal(feeds.feeds[0]["X"], _samples(1))
    np.testing.assert_array_equal(feeds.feeds[0]["ids"], np.ones((1, 4), np.int64))
    np.testing.assert_array_equal(feeds.feeds[1]["X"], _samples(2) - 5)
    assert feeds.feeds[1]["ids"].dtype == np.int64
    assert feeds.samples == 3
    assert not feeds.synthetic


def test_one_test_data_set_folder_gives_its_one_feed(test_data_root: Path) -> None:
    feeds = load_feeds(test_data_root / "test_data_set_1", specs_of(two_input_model()))

    assert len(feeds.feeds) == 1
    np.testing.assert_array_equal(feeds.feeds[0]["X"], _samples(2) - 5)


def test_test_data_set_with_too_few_inputs_lists_the_signature(test_data_root: Path) -> None:
    (test_data_root / "test_data_set_1" / "input_1.pb").unlink()

    with pytest.raises(DataError) as caught:
        load_feeds(test_data_root, specs_of(two_input_model()))

    message = str(caught.value)
    assert "test_data_set_1" in message and "1 input_*.pb files" in message
    assert "X: float32[N,4]" in message and "ids: int64[N,4]" in message


def test_test_data_set_with_a_wrong_dtype_names_the_input(test_data_root: Path) -> None:
    tensor = numpy_helper.from_array(np.ones((1, 4), np.int32), "ids")
    (test_data_root / "test_data_set_0" / "input_1.pb").write_bytes(tensor.SerializeToString())

    with pytest.raises(DataError) as caught:
        load_feeds(test_data_root / "test_data_set_0", specs_of(two_input_model()))

    assert "'ids' is int32" in str(caught.value)
    assert "ids: int64[N,4]" in str(caught.value)


def test_test_data_set_with_garbage_pb_is_refused(test_data_root: Path) -> None:
    (test_data_root / "test_data_set_0" / "input_0.pb").write_bytes(b"\xff\xff\xff not protobuf")

    with pytest.raises(DataError, match=r"input_0\.pb: not a TensorProto"):
        load_feeds(test_data_root, specs_of(two_input_model()))


# -- random feeds ---------------------------------------------------------------------------


def test_random_feeds_respect_each_input_dtype() -> None:
    # X float[N,4], ids int64[N,4] → Add → Y: batch 1, float normal, integers in {0, 1}.
    feeds = load_feeds(None, specs_of(two_input_model()), random_samples=3)

    assert feeds.synthetic and feeds.describe()["evidence"] == "weak (random inputs)"
    assert len(feeds.feeds) == 3 and feeds.samples == 3
    for feed in feeds.feeds:
        assert feed["X"].dtype == np.float32 and feed["X"].shape == (1, 4)
        assert feed["ids"].dtype == np.int64 and feed["ids"].shape == (1, 4)
        assert set(np.unique(feed["ids"])) <= {0, 1}
    assert np.std(np.concatenate([f["X"] for f in feeds.feeds])) > 0


def test_random_bool_input_gets_booleans() -> None:
    # mask bool[N,4] → Identity → Y
    feeds = load_feeds(None, specs_of(identity_model(["N", 4], TensorProto.BOOL)), random_samples=1)

    assert feeds.feeds[0]["X"].dtype == np.bool_


def test_random_dynamic_dims_are_batch_1_and_64_elsewhere() -> None:
    # X float[N,T,4] → Identity → Y: N is the batch (1), T gets the default 64.
    feeds = load_feeds(None, specs_of(identity_model(["N", "T", 4])), random_samples=1)

    assert feeds.feeds[0]["X"].shape == (1, DEFAULT_DYNAMIC_DIM, 4)
    assert "X=[1, 64, 4]" in feeds.source


def test_random_unnamed_dynamic_dims_are_treated_like_named_ones() -> None:
    # X float[?,?,4] → Identity → Y, dims without a name.
    feeds = load_feeds(None, specs_of(identity_model([None, None, 4])), random_samples=1)

    assert feeds.feeds[0]["X"].shape == (1, DEFAULT_DYNAMIC_DIM, 4)


def test_shape_override_sets_dynamic_dims() -> None:
    # X float[N,T,4] → Identity → Y, with --shape X=3,7,4.
    shapes = parse_shape_overrides(["X=3,7,4"])

    feeds = load_feeds(None, specs_of(identity_model(["N", "T", 4])), shapes=shapes, random_samples=2)

    assert [feed["X"].shape for feed in feeds.feeds] == [(3, 7, 4), (3, 7, 4)]
    assert feeds.samples == 6


def test_shape_override_conflicting_with_a_static_dim_is_refused() -> None:
    with pytest.raises(DataError) as caught:
        load_feeds(None, specs_of(identity_model(["N", "T", 4])), shapes={"X": (1, 7, 5)})

    assert "--shape X=[1, 7, 5] conflicts with X: float32[N,T,4]" in str(caught.value)


def test_shape_override_with_the_wrong_rank_is_refused() -> None:
    with pytest.raises(DataError) as caught:
        load_feeds(None, specs_of(identity_model(["N", "T", 4])), shapes={"X": (1, 7)})

    assert "--shape X: 2 dims given" in str(caught.value)
    assert "X: float32[N,T,4]" in str(caught.value)


def test_random_feeds_are_deterministic_for_a_seed() -> None:
    specs = specs_of(two_input_model())

    first = random_feeds(specs, shapes={}, seed=7, count=2)
    again = random_feeds(specs, shapes={}, seed=7, count=2)
    other = random_feeds(specs, shapes={}, seed=8, count=2)

    for a, b in zip(first.feeds, again.feeds):
        np.testing.assert_array_equal(a["X"], b["X"])
        np.testing.assert_array_equal(a["ids"], b["ids"])
    assert not np.array_equal(first.feeds[0]["X"], other.feeds[0]["X"])
    assert "seed 7" in first.source


def test_absurd_declared_shape_is_refused_before_allocating() -> None:
    # X float[100000,100000,4] → Identity → Y: 149 GiB per feed.
    with pytest.raises(DataError) as caught:
        load_feeds(None, specs_of(identity_model([100_000, 100_000, 4])))

    message = str(caught.value)
    assert "input 'X' declares shape [100000, 100000, 4]" in message
    assert "149.0 GiB" in message and "--shape" in message


def test_absurd_shape_override_is_refused() -> None:
    with pytest.raises(DataError, match=r"input 'X' declares shape \[1, 1000000000, 4\]"):
        load_feeds(None, specs_of(identity_model(["N", "T", 4])), shapes={"X": (1, 10**9, 4)})


def test_negative_shape_override_is_refused() -> None:
    with pytest.raises(DataError, match=r"input 'X' declares shape \[-1, 7, 4\]"):
        load_feeds(None, specs_of(identity_model(["N", "T", 4])), shapes={"X": (-1, 7, 4)})


def test_shape_for_an_unknown_input_names_it_and_the_inputs() -> None:
    with pytest.raises(DataError) as caught:
        load_feeds(None, specs_of(two_input_model()), shapes={"Z": (1, 4)})

    assert "--shape names unknown input Z" in str(caught.value)
    assert "the model expects X: float32[N,4]; ids: int64[N,4]" in str(caught.value)


def test_shape_for_an_unknown_input_lists_the_signature() -> None:
    with pytest.raises(DataError) as caught:
        load_feeds(None, specs_of(two_input_model()), shapes={"Z": (1, 4)})

    assert "X: float32[N,4]" in str(caught.value)


# -- --shape syntax -------------------------------------------------------------------------


def test_parse_shape_overrides() -> None:
    assert parse_shape_overrides(["x=1,3,320,320", "ids=2"]) == {"x": (1, 3, 320, 320), "ids": (2,)}
    assert parse_shape_overrides([]) == {}


@pytest.mark.parametrize("item", ["x", "x=", "=1,2", "x=1,,2", "x=1,a", "x=1.5"])
def test_bad_shape_syntax_is_refused_naming_the_item(item: str) -> None:
    with pytest.raises(DataError) as caught:
        parse_shape_overrides([item])

    assert str(caught.value) == f"--shape '{item}': expected NAME=D1,D2,... with integer dimensions"


# -- data that does not match the model -----------------------------------------------------


def _npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def test_missing_input_is_named_with_the_signature(tmp_path: Path) -> None:
    # X float[N,4], ids int64[N,4] → Add → Y; the data has no ids.
    path = _npz(tmp_path, X=_samples(2))

    with pytest.raises(DataError) as caught:
        load_feeds(path, specs_of(two_input_model()))

    message = str(caught.value)
    assert message.startswith(f"{path}: missing ids;")
    assert "the model expects X: float32[N,4]; ids: int64[N,4]" in message


def test_unknown_extra_array_is_named_with_the_signature(tmp_path: Path) -> None:
    # X float[N,4] → … ; the data also has Z.
    path = _npz(tmp_path, X=_samples(2), Z=_samples(2))

    with pytest.raises(DataError) as caught:
        load_feeds(path, specs_of(linear_model()))

    assert "unknown Z" in str(caught.value)
    assert LINEAR_SIGNATURE in str(caught.value)


def test_wrongly_named_array_is_both_missing_and_unknown(tmp_path: Path) -> None:
    path = _npz(tmp_path, input=_samples(2))

    with pytest.raises(DataError) as caught:
        load_feeds(path, specs_of(linear_model()))

    assert "missing X and unknown input" in str(caught.value)
    assert LINEAR_SIGNATURE in str(caught.value)


def test_float64_for_a_float32_input_is_refused(tmp_path: Path) -> None:
    path = _npz(tmp_path, X=_samples(2).astype(np.float64))

    with pytest.raises(DataError) as caught:
        load_feeds(path, specs_of(linear_model()))

    assert "input 'X' is float64" in str(caught.value)
    assert LINEAR_SIGNATURE in str(caught.value)


def test_wrong_rank_is_refused(tmp_path: Path) -> None:
    path = _npz(tmp_path, X=_samples(2).reshape(2, 4, 1))

    with pytest.raises(DataError) as caught:
        load_feeds(path, specs_of(linear_model()))

    assert "input 'X' has shape [2, 4, 1]" in str(caught.value)
    assert LINEAR_SIGNATURE in str(caught.value)


def test_wrong_static_dim_is_refused(tmp_path: Path) -> None:
    path = _npz(tmp_path, X=_samples(2, width=3))

    with pytest.raises(DataError) as caught:
        load_feeds(path, specs_of(linear_model()))

    assert "input 'X' has shape [2, 3]" in str(caught.value)
    assert LINEAR_SIGNATURE in str(caught.value)


def test_different_sample_counts_are_refused(tmp_path: Path) -> None:
    # X float[N,4], ids int64[N,4]: 3 rows of X but 2 of ids.
    path = _npz(tmp_path, X=_samples(3), ids=np.zeros((2, 4), np.int64))

    with pytest.raises(DataError) as caught:
        load_feeds(path, specs_of(two_input_model()))

    assert "different sample counts {'X': 3, 'ids': 2}" in str(caught.value)


def test_different_sample_counts_list_the_signature(tmp_path: Path) -> None:
    path = _npz(tmp_path, X=_samples(3), ids=np.zeros((2, 4), np.int64))

    with pytest.raises(DataError) as caught:
        load_feeds(path, specs_of(two_input_model()))

    assert "ids: int64[N,4]" in str(caught.value)


def test_empty_npz_lists_every_missing_input(tmp_path: Path) -> None:
    path = _npz(tmp_path)

    with pytest.raises(DataError) as caught:
        load_feeds(path, specs_of(two_input_model()))

    assert "missing X, ids" in str(caught.value)
    assert "X: float32[N,4]; ids: int64[N,4]" in str(caught.value)


def test_npz_with_zero_samples_is_refused(tmp_path: Path) -> None:
    path = _npz(tmp_path, X=np.zeros((0, 4), np.float32))

    with pytest.raises(DataError, match="holds no samples"):
        load_feeds(path, specs_of(linear_model()))


@pytest.mark.parametrize("content", [b"", b"X,Y\n1,2\n", b"PK\x03\x04 truncated zip"])
def test_file_that_is_not_an_npz_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "data.npz"
    path.write_bytes(content)

    with pytest.raises(DataError) as caught:
        load_feeds(path, specs_of(linear_model()))

    assert str(caught.value).startswith(f"{path}: not a readable .npz file")


def test_npy_file_is_refused_as_data(tmp_path: Path) -> None:
    path = tmp_path / "data.npy"
    np.save(path, _samples(2))

    with pytest.raises(DataError, match="a single array, not a .npz archive"):
        load_feeds(path, specs_of(linear_model()))


def test_stacked_npz_with_a_scalar_input_is_refused(tmp_path: Path) -> None:
    # X float[N,4], t float[] → Mul → Y: a stacked .npz cannot carry the scalar t.
    model = make_model(
        [helper.make_node("Mul", ["X", "t"], ["Y"])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])],
    )
    path = _npz(tmp_path, X=_samples(3), t=np.float32(2.0))

    with pytest.raises(DataError, match="input t holds a single value"):
        load_feeds(path, specs_of(model))


def test_nonexistent_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_feeds(tmp_path / "nowhere.npz", specs_of(linear_model()))

    assert str(caught.value) == f"{tmp_path / 'nowhere.npz'}: no such file or folder"


def test_input_listed_as_initializer_is_not_required(tmp_path: Path) -> None:
    # X float[N,4] → MatMul W → Add b → Y, where W is also a graph input with a default:
    # only X must be fed.
    model = linear_model()
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3]))
    onnx.checker.check_model(model)

    assert [spec.name for spec in specs_of(model)] == ["X"]
