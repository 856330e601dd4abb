"""Tests for raydistill.data: sources, splits, parquet round trips, sharding."""

import io
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raydistill import data


@pytest.fixture(scope="module")
def digits():
    return data.load_splits("digits", seed=0)


def _png_bytes(color, size=(10, 12)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_digits_shapes_sizes_and_train_normalization(digits):
    assert digits.shape == (1, 8, 8) and digits.num_classes == 10 and digits.name == "digits"
    n = len(digits.train) + len(digits.val) + len(digits.test)
    assert n == 1797
    assert len(digits.test) == round(0.2 * n) and len(digits.val) == round(0.1 * n)
    assert digits.train.x.dtype == np.float32 and digits.train.x.shape[1:] == (1, 8, 8)
    assert digits.train.y.dtype == np.int64 and digits.train.ids.dtype == np.int64
    assert abs(float(digits.train.x.mean())) < 1e-4
    assert float(digits.train.x.std()) == pytest.approx(1.0, abs=1e-3)
    # val/test are standardized with the train split's statistics, not their own
    from sklearn.datasets import load_digits

    raw = load_digits().images.astype(np.float32) / 16.0
    mean, std = raw[digits.train.ids].mean(), raw[digits.train.ids].std()
    expected = (raw[digits.test.ids] - mean) / std
    np.testing.assert_allclose(digits.test.x[:, 0], expected, atol=1e-5)


def test_digits_splits_are_disjoint_stratified_and_deterministic(digits):
    ids = [digits.train.ids, digits.val.ids, digits.test.ids]
    all_ids = np.concatenate(ids)
    assert len(np.unique(all_ids)) == len(all_ids) == 1797
    assert np.bincount(digits.test.y, minlength=10).min() >= 35  # stratified: ~36 per class

    again = data.load_splits("digits", seed=0)
    other = data.load_splits("digits", seed=1)
    for a, b in zip(ids, [again.train.ids, again.val.ids, again.test.ids]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(digits.test.ids, other.test.ids)
    assert data.fingerprint(digits) == data.fingerprint(again) != data.fingerprint(other)


def test_limit_and_image_size(digits):
    small = data.load_splits("digits", limit=5, image_size=16)
    np.testing.assert_array_equal(small.train.ids, digits.train.ids[:5])  # same split, cut
    assert [len(s) for s in (small.train, small.val, small.test)] == [5, 5, 5]
    assert small.train.x.shape == (5, 1, 16, 16) and small.shape == (1, 16, 16)


def test_bad_fractions_and_source():
    with pytest.raises(ValueError, match="unknown data source 'mnist'"):
        data.load_splits("mnist")
    with pytest.raises(ValueError, match="test_fraction must be in"):
        data.load_splits("digits", test_fraction=1.5)


def test_parquet_round_trip_flat_features(digits, tmp_path):
    path = tmp_path / "train.parquet"
    data.write_parquet(digits.train, path)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # tmp file moved away

    loaded = data.load_splits("parquet", path=str(path), shape=[1, 8, 8], val_fraction=0.1)
    assert loaded.shape == (1, 8, 8) and loaded.num_classes == 10
    by_id = {int(i): k for k, i in enumerate(digits.train.ids)}
    for split in (loaded.train, loaded.val, loaded.test):
        rows = [by_id[int(i)] for i in split.ids]
        np.testing.assert_array_equal(split.x, digits.train.x[rows])  # features taken as-is
        np.testing.assert_array_equal(split.y, digits.train.y[rows])
    assert len(loaded.train) + len(loaded.val) + len(loaded.test) == len(digits.train)


def test_parquet_folder_and_glob_use_stored_shape(digits, tmp_path):
    files = data.write_parquet(digits.test, tmp_path / "parts", rows_per_file=100)
    assert len(files) == 4
    from_dir = data.load_splits("parquet", path=tmp_path / "parts")
    from_glob = data.load_splits("parquet", path=str(tmp_path / "parts" / "part-*.parquet"))
    assert from_dir.shape == (1, 8, 8)  # from schema metadata, no shape given
    np.testing.assert_array_equal(from_dir.test.ids, from_glob.test.ids)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        data.write_parquet(digits.test, tmp_path / "parts", rows_per_file=100)


def test_parquet_with_encoded_png_images(tmp_path):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    labels = [i % 3 for i in range(12)]
    table = pa.table(
        {
            "img": [_png_bytes(colors[c]) for c in labels],
            "target": labels,
            "id": list(range(100, 112)),
        }
    )
    pq.write_table(table, tmp_path / "imgs.parquet")
    splits = data.load_splits(
        "parquet",
        path=tmp_path / "imgs.parquet",
        image_column="img",
        label_column="target",
        image_size=6,
        val_fraction=0.25,
        test_fraction=0.25,
    )
    assert splits.shape == (3, 6, 6) and splits.num_classes == 3
    assert sorted(np.concatenate([splits.train.ids, splits.val.ids, splits.test.ids])) == list(
        range(100, 112)
    )
    # a red image has its highest (standardized) value in channel 0
    red = splits.train.x[splits.train.y == 0]
    assert np.all(red[:, 0].mean(axis=(1, 2)) > red[:, 1].mean(axis=(1, 2)))


def _png_of(pixels):  # (3, H, W) uint8 -> PNG bytes
    buffer = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_uint8_lists_of_an_image_shape_are_read_as_the_8bit_images_they_are(tmp_path):
    """A feature column of uint8 lists for (C, H, W) -- flat, fixed-size or nested one level per dimension -- gives
    bit for bit what the same pixels give as PNG images (scaled to [0, 1], standardized per channel with the
    training data's statistics), in memory and streamed; uint8 lists of another shape stay numbers 0..255."""
    from raydistill import config
    from raydistill.stream import iter_split, plan_stream

    rng = np.random.default_rng(0)
    n, shape = 60, (3, 6, 10)
    pixels = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels, ids = np.arange(n) % 3, np.arange(n) + 500
    flat = pixels.reshape(n, -1)
    columns = {
        "png": (pa.array([_png_of(p) for p in pixels]), {"image_column": "png", "image_size": [6, 10]}),
        "flat": (pa.array(list(flat), pa.list_(pa.uint8())), {"shape": list(shape)}),
        "fixed": (pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1]), {"shape": list(shape)}),
        "nested": (pa.array(pixels.tolist(), pa.list_(pa.list_(pa.list_(pa.uint8())))), {"shape": list(shape)}),
    }
    loaded, streamed = {}, {}
    for name, (column, settings) in columns.items():
        folder = tmp_path / name
        folder.mkdir()
        pq.write_table(pa.table({"id": ids, "label": labels, "features" if name != "png" else "png": column}),
                       folder / "part-0.parquet")
        loaded[name] = data.load_splits("parquet", path=folder, val_fraction=0.2, test_fraction=0.2, seed=3,
                                        **settings)
        stream = plan_stream(config.load(None, {"data.source": "parquet", "data.path": str(folder),
                                                **{f"data.{k}": v for k, v in settings.items()}}).data)
        streamed[name] = (stream.channel_stats, [np.concatenate([x for x, _, _ in iter_split(stream, split)])
                                                 for split in ("train", "val", "test")])
    for name in ("flat", "fixed", "nested"):
        assert loaded[name].channel_stats == loaded["png"].channel_stats, name
        for split in ("train", "val", "test"):
            a, b = getattr(loaded[name], split), getattr(loaded["png"], split)
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_array_equal(a.x, b.x)  # bit for bit
        # the first training rows' statistics (summed in another order: decoded PNGs are channel-last in memory)
        np.testing.assert_allclose(streamed[name][0], streamed["png"][0], rtol=1e-12)
        for a, b in zip(streamed[name][1], streamed["png"][1]):
            np.testing.assert_array_equal(a, b)
    assert abs(float(loaded["flat"].train.x.mean())) < 1e-5  # standardized, not 0..255
    # another shape: the same bytes are numbers, taken as they are
    folder = tmp_path / "vector"
    folder.mkdir()
    pq.write_table(pa.table({"id": ids, "label": labels, "features": columns["flat"][0]}), folder / "part-0.parquet")
    vectors = data.load_splits("parquet", path=folder, shape=[flat.shape[1]], val_fraction=0.2, test_fraction=0.2)
    assert vectors.train.x.dtype == np.float32 and vectors.train.x.max() == 255.0


def test_parquet_missing_label_column_lists_columns(digits, tmp_path):
    path = tmp_path / "d.parquet"
    data.write_parquet(digits.val, path)
    with pytest.raises(ValueError, match="'class'.*available columns: id, label, features"):
        data.load_splits("parquet", path=path, label_column="class")


def test_parquet_wrong_feature_length_names_both_numbers(digits, tmp_path):
    path = tmp_path / "d.parquet"  # a file with no shape in its metadata: data.shape is all there is to go by
    pq.write_table(pa.table({"label": digits.val.y, "features": list(digits.val.x.reshape(len(digits.val.y), -1))}),
                   path)
    with pytest.raises(ValueError, match=r"length 64 per row but data.shape \[3, 8, 8\] needs 192"):
        data.load_splits("parquet", path=path, shape=[3, 8, 8])


def test_data_shape_must_match_the_shape_the_files_were_written_with(digits, tmp_path):
    """write_parquet records (1, 8, 8); data.shape [1, 8, 8] agrees; [8, 8] or [1, 4, 16] would read the same 64
    floats in another layout, scrambled: a one-line error naming both shapes."""
    path = tmp_path / "d.parquet"
    data.write_parquet(digits.val, path)
    assert data.load_splits("parquet", path=path, shape=[1, 8, 8]).train.shape == (1, 8, 8)
    for wrong in ([8, 8], [1, 4, 16], [3, 8, 8]):
        with pytest.raises(ValueError, match=re.escape(f"data.shape {wrong} differs from the shape [1, 8, 8]")):
            data.load_splits("parquet", path=path, shape=wrong)


def test_parquet_empty_and_missing(tmp_path):
    empty = tmp_path / "empty.parquet"
    columns = {
        "label": pa.array([], pa.int64()),
        "features": pa.array([], pa.list_(pa.float32())),
    }
    pq.write_table(pa.table(columns), empty)
    with pytest.raises(ValueError, match="no rows"):
        data.load_splits("parquet", path=empty, shape=[1, 1, 1])
    with pytest.raises(ValueError, match="not found"):
        data.load_splits("parquet", path=tmp_path / "absent.parquet", shape=[1, 1, 1])


def _write_imagefolder(root, per_class=4):
    for label, color in (("cat", (200, 10, 10)), ("dog", (10, 10, 200))):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (9, 7), color).save(root / label / f"{i}.png")


def test_imagefolder_loads_classes_as_rgb(tmp_path):
    _write_imagefolder(tmp_path)
    splits = data.load_splits(
        "imagefolder", root=tmp_path, image_size=5, val_fraction=0.25, test_fraction=0.25
    )
    assert splits.shape == (3, 5, 5) and splits.num_classes == 2
    assert [len(s) for s in (splits.train, splits.val, splits.test)] == [4, 2, 2]
    assert set(splits.test.y) == {0, 1}  # stratified


def test_imagefolder_resized_to_height_and_width(tmp_path):
    """data.image_size takes [height, width] (torchvision's Resize((h, w))): non-square images keep their aspect
    instead of being squashed into a square; an int is still a square; anything else is a one-line error."""
    root = tmp_path / "imgs"
    for label, color in (("cat", (200, 10, 10)), ("dog", (10, 10, 200))):
        (root / label).mkdir(parents=True)
        for i in range(4):  # 12 wide, 6 high, the left half darker: where the pixels land is checked
            pixels = np.zeros((6, 12, 3), dtype=np.uint8)
            pixels[:, :, :] = color
            pixels[:, :6, :] //= 4
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    splits = data.load_splits("imagefolder", root=root, image_size=[6, 12], val_fraction=0.25, test_fraction=0.25)
    assert splits.shape == (3, 6, 12)
    x = splits.train.x  # standardized per channel: the darker left half stays below the right half in every row
    assert (x[:, :, :, :6].mean(axis=3) < x[:, :, :, 6:].mean(axis=3) + 1e-6).all()
    assert data.load_splits("imagefolder", root=root, image_size=5).shape == (3, 5, 5)
    assert data.load_splits("digits", image_size=[8, 12], limit=3).shape == (1, 8, 12)
    for bad in ([6], [6, 0], [6, 12, 3], "6x12", 0, True):
        with pytest.raises(ValueError, match=r"image_size must be a positive integer \(a square\) or \[height, "
                                             r"width\]") as info:
            data.load_splits("imagefolder", root=root, image_size=bad)
        assert "\n" not in str(info.value)


def test_imagefolder_with_train_val_test_folders_declares_its_splits(tmp_path):
    """DIR/train/<class>/, DIR/val/<class>/, DIR/test/<class>/ (ImageNet's layout): the folders are the splits, used
    as is, with the training folder's class labels. Read as one image folder, `train`, `val` and `test` would be
    the classes and each image's split its label."""
    _write_imagefolder(tmp_path / "train", per_class=6)
    _write_imagefolder(tmp_path / "val", per_class=2)
    (tmp_path / "test" / "dog").mkdir(parents=True)  # a split may lack a class; its labels stay the training ones
    Image.new("RGB", (9, 7), (10, 10, 200)).save(tmp_path / "test" / "dog" / "0.png")
    splits = data.load_splits("imagefolder", root=tmp_path, image_size=5)
    assert splits.num_classes == 2 and [len(s) for s in (splits.train, splits.val, splits.test)] == [12, 4, 1]
    assert list(splits.test.y) == [1] and sorted(splits.val.y) == [0, 0, 1, 1]
    ids = [set(s.ids.tolist()) for s in (splits.train, splits.val, splits.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert splits.origin["val"] == f"declared: the image folder {tmp_path / 'val'}"
    assert splits.origin["train"] == f"the image folder {tmp_path / 'train'}"  # nothing carved from it
    # only train/ and val/: the test split is carved from train/, seeded
    (tmp_path / "test" / "dog" / "0.png").unlink()
    (tmp_path / "test" / "dog").rmdir()
    (tmp_path / "test").rmdir()
    splits = data.load_splits("imagefolder", root=tmp_path, image_size=5, test_fraction=0.25)
    assert [len(s) for s in (splits.train, splits.val, splits.test)] == [9, 4, 3]
    assert splits.origin["test"].startswith(f"carved at random from the image folder {tmp_path / 'train'}")
    # a class folder the training folder has not is refused, naming it
    (tmp_path / "val" / "fox").mkdir()
    Image.new("RGB", (9, 7), (10, 200, 10)).save(tmp_path / "val" / "fox" / "0.png")
    with pytest.raises(ValueError, match="class folder.*fox.*training folder"):
        data.load_splits("imagefolder", root=tmp_path)
    # a plain image folder whose classes happen to be called train and val is read as before
    plain = tmp_path / "plain"
    for label in ("train", "val"):
        (plain / label).mkdir(parents=True)
        Image.new("RGB", (9, 7), (200, 10, 10)).save(plain / label / "0.png")
        Image.new("RGB", (9, 7), (200, 10, 10)).save(plain / label / "1.png")
    assert data.load_splits("imagefolder", root=plain, val_fraction=0.25, test_fraction=0.25).num_classes == 2


def test_imagefolder_corrupt_file_is_named(tmp_path):
    _write_imagefolder(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="broken.png"):
        data.load_splits("imagefolder", root=tmp_path)


def test_imagefolder_missing_root(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        data.load_splits("imagefolder", root=tmp_path / "nothing")


def test_cifar10_missing_root_explains_download(tmp_path):
    with pytest.raises(ValueError, match="CIFAR-10 not found under .*raydistill never downloads"):
        data.load_splits("cifar10", root=tmp_path)


def test_labels_must_be_non_negative_integers(tmp_path):
    path = tmp_path / "neg.parquet"
    pq.write_table(pa.table({"label": [0, -1], "features": [[0.0], [1.0]]}), path)
    with pytest.raises(ValueError, match="shift labels to start at 0"):
        data.load_splits("parquet", path=path, shape=[1, 1, 1])


def test_random_shards_are_disjoint_and_equal_sized():
    y = np.arange(103) % 10
    shards = [data.shard_indices(y, 4, rank, mode="random", seed=3) for rank in range(4)]
    assert [len(s) for s in shards] == [25] * 4  # 3 left-over samples dropped
    joined = np.concatenate(shards)
    assert len(np.unique(joined)) == 100
    np.testing.assert_array_equal(shards[1], data.shard_indices(y, 4, 1, seed=3))


def test_classwise_shards_hold_only_their_classes_and_equal_sizes():
    y = np.repeat(np.arange(4), [30, 20, 25, 40])  # shard 0: classes 0-1 (50), 1: 2-3 (65)
    shards = [data.shard_indices(y, 2, rank, mode="classwise") for rank in range(2)]
    assert set(y[shards[0]]) <= {0, 1} and set(y[shards[1]]) <= {2, 3}
    assert len(shards[0]) == len(shards[1]) == 50
    assert not set(shards[0]) & set(shards[1])
    with pytest.raises(ValueError, match="leaves a shard empty"):
        data.shard_indices(y, 5, 0, mode="classwise")
    with pytest.raises(ValueError, match="unknown shard mode"):
        data.shard_indices(y, 2, 0, mode="iid")


def test_splits_and_digits_are_scikit_learns_without_importing_it():
    """``_split_off`` draws what scikit-learn's ``train_test_split(..., shuffle=True, stratify=...)`` draws, seed
    for seed, stratified and not, ties between classes included; ``_load_digits`` reads the same digits as
    ``load_digits``. (data.py writes both out with numpy: importing scikit-learn costs a command ~1.2 CPU-s.)"""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(0)
    # (pool size, classes, n_out): digits' test and val carving, a --set data.limit run, few rows per class,
    # a class with one row (not stratified), n_out too small or too large to hold every class (not stratified)
    cases = [(1797, 10, 360), (1437, 10, 180), (200, 10, 40), (13, 3, 3), (41, 4, 5), (7, 7, 2), (30, 3, 2),
             (30, 3, 28)]
    for n, classes, n_out in cases:
        for seed in (0, 1, 7, 123456):
            labels = rng.integers(0, classes, n + 20)  # y of a pool, indexed by position
            index = rng.permutation(n + 20)[:n]  # the positions being split, in some order
            rest, out = data._split_off(index, labels, n_out, seed)
            counts = np.bincount(labels[index])
            counts = counts[counts > 0]
            stratify = labels[index] if counts.min() >= 2 and min(n_out, n - n_out) >= len(counts) else None
            want_rest, want_out = train_test_split(index, test_size=n_out, random_state=seed, shuffle=True,
                                                   stratify=stratify)
            np.testing.assert_array_equal(rest, want_rest, err_msg=f"{(n, classes, n_out, seed)}")
            np.testing.assert_array_equal(out, want_out, err_msg=f"{(n, classes, n_out, seed)}")
    x, y, ids = data._load_digits(None)
    bunch = load_digits()
    np.testing.assert_array_equal(x[:, 0], bunch.images.astype(np.float32) / 16.0)
    np.testing.assert_array_equal(y, bunch.target)
    assert x.dtype == np.float32 and y.dtype == np.int64 and (ids == np.arange(1797)).all()
