"""Samples of any shape (F,), (C, L), (C, H, W) with H != W, and splits a source declares (issue 13)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raydistill import data
from raydistill.checkpoints import build_from_spec, model_spec
from raydistill.core.metrics import count_macs
from raydistill.errors import DataError, ModelError
from raydistill.models import build_model


def _write(path, ids, labels, features, feature_type=pa.float32()):
    table = pa.table({"id": pa.array(ids, pa.int64()), "label": pa.array(labels, pa.int64()),
                      "features": pa.array([list(map(float, f)) for f in features], pa.list_(feature_type))})
    pq.write_table(table, path)
    return str(path)


@pytest.fixture
def signal_files(tmp_path):
    """A (2, 20) signal set: train ids 0..59 (4 classes), test ids 1000..1019."""
    rng = np.random.default_rng(0)
    train = _write(tmp_path / "train.parquet", np.arange(60), np.arange(60) % 4, rng.standard_normal((60, 40)))
    test = _write(tmp_path / "test.parquet", np.arange(1000, 1020), np.arange(20) % 4, rng.standard_normal((20, 40)))
    return tmp_path, train, test


def test_declared_test_split_is_used_as_is_and_val_carved_from_train(signal_files):
    _, train, test = signal_files
    s = data.load_splits("parquet", train=train, test=test, shape=[2, 20], val_fraction=0.25, seed=1)
    assert s.shape == (2, 20) and s.train.x.shape[1:] == (2, 20)
    np.testing.assert_array_equal(s.test.ids, np.arange(1000, 1020))  # the declared file's ids, in order
    assert len(s.val) == 15 and len(s.train) == 45
    assert set(s.train.ids) | set(s.val.ids) == set(range(60))
    assert s.origin["test"] == f"declared: data.test={test}"
    assert s.origin["val"].startswith("carved at random from") and "data.val_fraction=0.25" in s.origin["val"]
    described = s.describe()
    assert described["test"]["size"] == 20 and described["train"]["size"] == 45
    # the same seed carves the same val; another seed another one, the test split never moves
    again = data.load_splits("parquet", train=train, test=test, shape=[2, 20], val_fraction=0.25, seed=1)
    np.testing.assert_array_equal(again.val.ids, s.val.ids)
    other = data.load_splits("parquet", train=train, test=test, shape=[2, 20], val_fraction=0.25, seed=2)
    assert set(other.val.ids) != set(s.val.ids)
    np.testing.assert_array_equal(other.test.ids, s.test.ids)


def test_split_column_declares_every_split(tmp_path):
    rng = np.random.default_rng(0)
    split = np.array(["train"] * 30 + ["val"] * 10 + ["test"] * 10)
    rng.shuffle(split)
    table = pa.table({"id": np.arange(50), "label": np.arange(50) % 5, "features": list(rng.standard_normal((50, 6))),
                      "part": split})
    pq.write_table(table, tmp_path / "all.parquet")
    s = data.load_splits("parquet", path=str(tmp_path / "all.parquet"), shape=[6], split_column="part")
    assert s.shape == (6,)
    for name in ("train", "val", "test"):
        assert sorted(getattr(s, name).ids) == sorted(np.flatnonzero(split == name)), name
    with pytest.raises(DataError, match="its values must be train, val, test"):
        pq.write_table(table.set_column(3, "part", pa.array(["training"] * 50)), tmp_path / "bad.parquet")
        data.load_splits("parquet", path=str(tmp_path / "bad.parquet"), shape=[6], split_column="part")


def test_declared_split_errors(signal_files):
    d, train, _ = signal_files
    rng = np.random.default_rng(1)
    overlap = _write(d / "overlap.parquet", np.arange(50, 70), np.arange(20) % 4, rng.standard_normal((20, 40)))
    with pytest.raises(DataError, match=r"10 sample ids are in both the train and the test split"):
        data.load_splits("parquet", train=train, test=overlap, shape=[2, 20], val_fraction=0.0)
    labels = _write(d / "labels.parquet", np.arange(100, 120), np.arange(20) % 9, rng.standard_normal((20, 40)))
    with pytest.raises(DataError, match=r"declared test split has label 8 but the training data has classes 0\.\.3"):
        data.load_splits("parquet", train=train, test=labels, shape=[2, 20])
    schema = _write(d / "schema.parquet", np.arange(100, 120), np.arange(20) % 4, rng.standard_normal((20, 40)),
                    feature_type=pa.float64())
    with pytest.raises(DataError, match=r"different schema: column 'features' is list<element: double>"):
        data.load_splits("parquet", train=train, val=schema, shape=[2, 20])
    short = _write(d / "short.parquet", np.arange(100, 120), np.arange(20) % 4, rng.standard_normal((20, 39)))
    with pytest.raises(DataError, match=r"short.parquet has length 39 per row but data.shape \[2, 20\] needs 40"):
        data.load_splits("parquet", train=train, test=short, shape=[2, 20])
    with pytest.raises(DataError, match="not both"):
        data.load_splits("parquet", train=train, test=short, split_column="split", shape=[2, 20])
    with pytest.raises(DataError, match="need the training data"):
        data.load_splits("parquet", test=short, shape=[2, 20])
    with pytest.raises(DataError, match=r"data.shape must be 1 to 3 positive integers"):
        data.load_splits("parquet", train=train, shape=[1, 2, 4, 5])
    (d / "corrupt.parquet").write_bytes(b"PAR1" + b"\0" * 64)
    with pytest.raises(DataError, match="corrupt.parquet"):
        data.load_splits("parquet", train=train, test=str(d / "corrupt.parquet"), shape=[2, 20])


@pytest.mark.parametrize("shape", [(12,), (2, 20), (3, 6, 10)])
def test_mlp_builds_counts_and_prunes_on_any_shape(shape):
    spec = model_spec("mlp", {"hidden": [16]}, 4, shape)
    model = build_from_spec(spec)
    x = torch.zeros(3, *shape)
    assert model(x).shape == (3, 4)
    assert count_macs(model, x[:1]) == int(np.prod(shape)) * 16 + 16 * 4


def test_cnn_takes_non_square_images_and_refuses_other_shapes():
    model = build_model("cnn", 5, input_shape=(3, 24, 40), widths=(8, 16), hidden=32)
    assert model(torch.zeros(2, 3, 24, 40)).shape == (2, 5)
    with pytest.raises(ModelError, match=r"takes images \(C, H, W\) but the samples have shape \(2, 20\)"):
        build_model("cnn", 5, input_shape=(2, 20))
    with pytest.raises(ModelError, match="takes images"):
        build_model("resnet18", 5, input_shape=(40,))
    # a checkpoint spec written before input_shape existed still rebuilds (square image)
    old = {"name": "cnn", "kwargs": {}, "num_classes": 10, "in_channels": 1, "image_size": 8, "plan": []}
    assert build_from_spec(old)(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
