"""Prepared Parquet shards read back through Ray Data (the shared local Ray)."""

import numpy as np
import pytest

from raydistill import data
from raydistill.prepare import prepare, read_parquet_ray


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "digits"
    summary = prepare("digits", str(out), rows_per_file=500)
    return out, summary


@pytest.mark.ray
def test_read_parquet_ray_reads_prepared_shards(ray_local, digits_shards, tmp_path):
    out, _ = digits_shards
    dataset = read_parquet_ray(str(out))
    assert dataset.count() == 1797
    assert set(dataset.schema().names) == {"id", "label", "features", "split"}  # split: the source's own splits
    rows = dataset.to_pandas().sort_values("id")
    np.testing.assert_array_equal(rows["id"].to_numpy(), np.arange(1797))
    expected = data.load_splits("digits")
    labels, features = np.empty(1797, dtype=np.int64), np.empty((1797, 64), dtype=np.float32)
    for part in (expected.train, expected.val, expected.test):
        labels[part.ids], features[part.ids] = part.y, part.x.reshape(len(part), -1)
    np.testing.assert_array_equal(rows["label"].to_numpy(), labels)
    # each row's float32 values as its bytes (data.write_parquet): numpy.frombuffer gives them back
    np.testing.assert_array_equal(np.stack([np.frombuffer(b, "<f4") for b in rows["features"]]), features)

    uri_out = (tmp_path / "uri").as_uri()
    prepare("digits", uri_out, rows_per_file=600)
    assert read_parquet_ray(uri_out, columns=["id"]).count() == 1797
    with pytest.raises(ValueError, match="run `raydistill data prepare` first"):
        read_parquet_ray(str(tmp_path / "missing"))


@pytest.mark.ray
def test_8bit_pixel_shards_through_ray_data_give_the_sources_floats(ray_local, tmp_path):
    """An image folder prepared as uint8 pixels, read by Ray Data in pyarrow batches (as the training stream and
    the cache builder read them) and turned into arrays by the stream's reader: the very floats the folder gives."""
    from PIL import Image

    from raydistill import config
    from raydistill.stream import plan_stream, to_arrays

    rng = np.random.default_rng(1)
    for label in range(3):
        (tmp_path / "imgs" / f"c{label}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, size=(9, 7, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / f"c{label}" / f"{i}.png")
    out = tmp_path / "pixels"
    assert prepare("imagefolder", str(out), root=str(tmp_path / "imgs"), image_size=8)["features"] == "8-bit pixels"
    streamed = plan_stream(config.load(None, {"data.source": "parquet", "data.path": str(out)}).data)
    x, _, ids = (np.concatenate(a) for a in zip(*(
        to_arrays(streamed, batch, "rows")
        for batch in read_parquet_ray(str(out)).iter_batches(batch_size=5, batch_format="pyarrow"))))
    source = data.load_splits("imagefolder", root=str(tmp_path / "imgs"), image_size=8)
    expected = np.empty_like(x)
    for part in (source.train, source.val, source.test):
        expected[np.searchsorted(np.sort(ids), part.ids)] = part.x
    np.testing.assert_array_equal(x[np.argsort(ids)], expected)
