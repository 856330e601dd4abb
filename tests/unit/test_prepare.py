"""Tests for raydistill.prepare: `raydistill data prepare` to Parquet shards and back."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raydistill import data
from raydistill.prepare import prepare

REPO = Path(__file__).resolve().parents[2]


def _assert_same_splits(a: data.Splits, b: data.Splits) -> None:
    """Same samples (ids, labels, arrays) in every split; prepared shards hold each split in id order."""
    assert a.shape == b.shape and a.num_classes == b.num_classes
    for part in ("train", "val", "test"):
        x, y = getattr(a, part), getattr(b, part)
        ox, oy = np.argsort(x.ids), np.argsort(y.ids)
        np.testing.assert_array_equal(x.ids[ox], y.ids[oy])
        np.testing.assert_array_equal(x.y[ox], y.y[oy])
        np.testing.assert_array_equal(x.x[ox], y.x[oy])


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "digits"
    summary = prepare("digits", str(out), rows_per_file=500)
    return out, summary


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of small PNGs with distinct colours and sizes."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for label, name in enumerate(("cat", "dog")):
        (root / name).mkdir()
        for i in range(7):
            pixels = rng.integers(0, 256, size=(10 + i, 12, 3), dtype=np.uint8)
            pixels[..., label] = 200  # a class-dependent channel
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_digits_roundtrip_same_arrays_and_ids(digits_shards):
    out, summary = digits_shards
    files = sorted(out.glob("*.parquet"))
    # grouped by split, 500 rows a file: train 1,258 rows in 3 files, val 180 in 1, test 359 in 1
    assert [f.name for f in files] == [f"part-{i:05d}.parquet" for i in range(5)]
    assert [set(pq.read_table(f)["split"].to_pylist()) for f in files] == [{"train"}] * 3 + [{"val"}, {"test"}]
    assert summary["rows"] == 1797 and summary["shape"] == [1, 8, 8] and summary["num_classes"] == 10
    table = pq.read_table(out)
    assert table.column_names == ["id", "label", "features", "split"]
    np.testing.assert_array_equal(np.sort(table["id"].to_numpy()), np.arange(1797))  # every id once
    for name in ("train", "val", "test"):  # sorted by id within a split
        ids = table.filter(pc.equal(table["split"], name))["id"].to_numpy()
        assert (np.diff(ids) > 0).all(), name
    loaded = data.load_splits("parquet", path=str(out))
    _assert_same_splits(loaded, data.load_splits("digits"))
    assert loaded.origin["test"].startswith("declared: rows with split == 'test'")
    # the written splits are declared: another split seed keeps them as they are
    _assert_same_splits(data.load_splits("parquet", path=str(out), seed=3), loaded)


def test_imagefolder_roundtrip(image_folder, tmp_path):
    out = tmp_path / "imgs"
    summary = prepare("imagefolder", str(out), root=str(image_folder), image_size=16, rows_per_file=5)
    per_split = summary["split"]
    assert summary["rows"] == 14 and summary["shape"] == [3, 16, 16]
    assert len(summary["files"]) == sum(-(-per_split[n] // 5) for n in ("train", "val", "test"))  # per split
    loaded = data.load_splits("parquet", path=str(out))
    _assert_same_splits(loaded, data.load_splits("imagefolder", root=str(image_folder), image_size=16))
    assert loaded.num_classes == 2


def test_uri_output_roundtrip(tmp_path):
    uri = (tmp_path / "remote").as_uri()  # file:///... goes through the pyarrow filesystem path
    summary = prepare("digits", uri, rows_per_file=1000, image_size=4)
    # train 1,258 rows in 2 files, val 180 and test 359 in one each
    assert summary["files"] == [f"{uri}/part-{i:05d}.parquet" for i in range(4)]
    assert not list(tmp_path.glob("**/.*"))  # no staging leftovers
    _assert_same_splits(data.load_splits("parquet", path=uri), data.load_splits("digits", image_size=4))
    with pytest.raises(ValueError, match="not empty"):
        prepare("digits", uri)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"source": "mnist"}, "unknown data source 'mnist'"),
        ({"source": "imagefolder"}, "needs --root"),
        ({"source": "digits", "rows_per_file": 0}, "--rows-per-file must be a positive integer"),
        ({"source": "digits", "image_size": 0}, r"--image-size must be N \(N x N\) or HxW"),
        ({"source": "digits", "image_size": (8, 0)}, r"--image-size must be N \(N x N\) or HxW"),
        ({"source": "digits", "test_fraction": 1.5}, "--test-fraction must be in"),
        ({"source": "imagefolder", "root": "/nonexistent/imgs"}, "image folder"),
    ],
)
def test_bad_input_is_a_one_line_value_error(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        prepare(out=str(tmp_path / "o"), **kwargs)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()


def test_refuses_non_empty_output(digits_shards):
    out, _ = digits_shards
    with pytest.raises(ValueError, match="already exists"):
        prepare("digits", str(out))


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "raydistill.cli", "data", "prepare", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def _cli_in_process(capsys, *args) -> tuple[int, str]:
    """`raydistill data prepare ARGS` through cli.main in this process: (exit status, stderr)."""
    from raydistill import cli

    try:
        code = cli.main(["data", "prepare", *args])
    except SystemExit as e:  # argparse's usage errors exit from parse_args
        code = e.code
    return code, capsys.readouterr().err


def test_cli_prepare_and_errors(image_folder, tmp_path, capsys):
    out = tmp_path / "cli"
    # the real command once, in its own process
    done = _cli("imagefolder", "--root", str(image_folder), "--out", str(out), "--rows-per-file", "4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"data.path={out}" in done.stdout and "14 rows" in done.stdout
    splits = data.load_splits("parquet", path=str(out))
    assert len(list(out.glob("part-*.parquet"))) == sum(-(-len(p) // 4) for p in (splits.train, splits.val,
                                                                                  splits.test))
    assert len(data.load_splits("parquet", path=str(out)).test) == round(0.2 * 14)

    # the errors through the same entry point in this process (no interpreter start-up each)
    code, err = _cli_in_process(capsys, "imagefolder", "--root", str(image_folder), "--out", str(out))
    assert code == 2
    assert err.strip().startswith("raydistill: error: output") and len(err.strip().splitlines()) == 1
    code, err = _cli_in_process(capsys, "cifar10", "--out", str(tmp_path / "c"))
    assert code == 2 and "cifar10 needs --root" in err
    code, err = _cli_in_process(capsys, "digits", "--rows-per-file", "many", "--out", str(tmp_path / "d"))
    assert code == 2 and "invalid int value" in err
    code, err = _cli_in_process(capsys, "digits", "--image-size", "8x", "--out", str(tmp_path / "d"))
    assert code == 2 and "--image-size must be N (N x N) or HxW" in err and "'8x'" in err
    # non-square images: --image-size HxW keeps height and width apart
    code, err = _cli_in_process(capsys, "imagefolder", "--root", str(image_folder), "--image-size", "6x10",
                                "--out", str(tmp_path / "wide"))
    assert code == 0, err
    wide = data.load_splits("parquet", path=str(tmp_path / "wide"))
    assert wide.shape == (3, 6, 10)
    _assert_same_splits(wide, data.load_splits("imagefolder", root=str(image_folder), image_size=[6, 10]))
    # a Parquet set, read with its own columns: the prepared wide set as uint8 image lists named otherwise
    import pyarrow as pa

    table = pq.read_table(tmp_path / "wide")
    lists = pa.array(list(np.frombuffer(table["features"].combine_chunks().buffers()[1], np.uint8).reshape(-1, 180)),
                     pa.list_(pa.uint8()))
    pq.write_table(pa.table({"key": table["id"], "target": table["label"], "rgb": lists}), tmp_path / "own.parquet")
    code, err = _cli_in_process(capsys, "parquet", "--root", str(tmp_path / "own.parquet"), "--feature-column", "rgb",
                                "--label-column", "target", "--id-column", "key", "--shape", "3", "6", "10",
                                "--out", str(tmp_path / "own"))
    assert code == 0, err
    assert pq.read_schema(next((tmp_path / "own").glob("*.parquet"))).field("features").type == pa.binary(180)
    code, err = _cli_in_process(capsys, "digits", "--shape", "3", "--out", str(tmp_path / "d"))
    assert code == 2 and "--shape is for the parquet source; drop it for digits" in err


def test_8bit_images_are_stored_as_their_pixels_and_read_back_bit_for_bit(image_folder, tmp_path):
    """An image folder's samples are 8-bit: prepare stores them as their uint8 pixels (one fixed-size binary value a
    row, a quarter of float32's bytes) with the train split's statistics in the metadata, and every reader (in
    memory, the streamed batches) gives back exactly the floats the run from the folder gives."""
    import json

    import pyarrow as pa

    from raydistill import config
    from raydistill.stream import iter_split, plan_stream

    out = tmp_path / "pixels"
    assert prepare("imagefolder", str(out), root=str(image_folder), image_size=[6, 10], rows_per_file=4
                   )["features"] == "8-bit pixels"
    table = pq.read_table(out)
    assert table.schema.field("features").type == pa.binary(3 * 6 * 10)
    stats = json.loads(table.schema.metadata[b"raydistill.pixels"])
    source = data.load_splits("imagefolder", root=str(image_folder), image_size=[6, 10])
    assert (tuple(stats["mean"]), tuple(stats["std"])) == source.channel_stats
    loaded = data.load_splits("parquet", path=str(out))
    _assert_same_splits(loaded, source)
    streamed = plan_stream(config.load(None, {"data.source": "parquet", "data.path": str(out)}).data)
    assert streamed.channel_stats == source.channel_stats
    for part in ("train", "val", "test"):
        x, y, ids = (np.concatenate(a) for a in zip(*iter_split(streamed, part, batch_size=3)))  # sliced batches
        in_memory = getattr(loaded, part)
        row = {i: r for r, i in enumerate(in_memory.ids.tolist())}
        np.testing.assert_array_equal(x, in_memory.x[[row[i] for i in ids.tolist()]])


    # one line each, naming the fix: pixel metadata on a column that is not the pixels' bytes; bytes with no metadata
    bad = tmp_path / "bad.parquet"
    floats = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(len(table) * 180, np.float32)), 180)
    pq.write_table(table.set_column(2, "features", floats).replace_schema_metadata(table.schema.metadata), bad)
    unmarked = tmp_path / "unmarked.parquet"
    pq.write_table(table.replace_schema_metadata({k: v for k, v in table.schema.metadata.items()
                                                  if k != b"raydistill.pixels"}), unmarked)
    for path, match in ((bad, r"marked as 8-bit pixels of 3 channels .* its feature column is "
                              r"fixed_size_list<element: float>\[180\] for shape \[3, 6, 10\]; rewrite it with "
                              r"raydistill data prepare"),
                        (unmarked, r"holds bytes \(fixed_size_binary\[180\]\) with no raydistill.pixels or "
                                   r"raydistill.tensor metadata")):
        for read in (lambda: data.load_splits("parquet", path=str(path)),
                     lambda: plan_stream(config.load(None, {"data.source": "parquet", "data.path": str(path)}).data)):
            with pytest.raises(data.DataError, match=match) as info:
                read()
            assert "\n" not in str(info.value)


def test_float_samples_are_stored_as_float32_bytes_and_read_back_bit_for_bit(digits_shards, tmp_path):
    """Samples that are not 8-bit (digits' k / 16, standardized) are stored as each row's float32 values in one
    fixed-size binary value, marked ``raydistill.tensor: float32``; in memory and in streamed batches of every size
    (slices at any offset) they are the source's floats bit for bit. Bytes of another width than the shape needs
    are a one-line error naming the fix."""
    import pyarrow as pa

    from raydistill import config
    from raydistill.stream import iter_split, plan_stream

    digits_shards, summary = digits_shards
    assert summary["features"] == "float32"
    schema = pq.read_schema(next(digits_shards.glob("*.parquet")))
    assert schema.field("features").type == pa.binary(4 * 64)
    assert schema.metadata[b"raydistill.tensor"] == b"float32" and b"raydistill.pixels" not in schema.metadata
    source = data.load_splits("digits")
    _assert_same_splits(data.load_splits("parquet", path=str(digits_shards)), source)
    streamed = plan_stream(config.load(None, {"data.source": "parquet", "data.path": str(digits_shards)}).data)
    for part, batch_size in (("train", 7), ("val", 64), ("test", 1000)):
        x, y, ids = (np.concatenate(a) for a in zip(*iter_split(streamed, part, batch_size=batch_size)))
        assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8)
        want = getattr(source, part)
        row = {i: r for r, i in enumerate(want.ids.tolist())}
        np.testing.assert_array_equal(x, want.x[[row[i] for i in ids.tolist()]])
        np.testing.assert_array_equal(y, want.y[[row[i] for i in ids.tolist()]])

    table = pq.read_table(next(digits_shards.glob("*.parquet")))
    short = pa.FixedSizeBinaryArray.from_buffers(pa.binary(252), len(table), [None, pa.py_buffer(
        np.zeros(len(table) * 252, np.uint8))])
    bad = tmp_path / "bad.parquet"
    pq.write_table(table.set_column(2, "features", short).replace_schema_metadata(table.schema.metadata), bad)
    match = (r"marked as float32 samples \(its raydistill.tensor metadata\) but its feature column is "
             r"fixed_size_binary\[252\] for shape \[1, 8, 8\] \(which needs fixed_size_binary\[256\]\); fix data.shape")
    for read in (lambda: data.load_splits("parquet", path=str(bad)),
                 lambda: plan_stream(config.load(None, {"data.source": "parquet", "data.path": str(bad)}).data)):
        with pytest.raises(data.DataError, match=match) as info:
            read()
        assert "\n" not in str(info.value)


def test_a_parquet_set_of_encoded_images_or_uint8_lists_is_prepared_as_8bit_pixels(tmp_path):
    """`data prepare parquet`: a Parquet set as a run reads it -- encoded images in Hugging Face's struct with its
    own label and id columns and a split column, or uint8 image lists -- is written as `data prepare` writes images
    (pixel bytes with the statistics, a split column, the source's ids), giving bit for bit the arrays the run on the
    source gets; float lists stay float32, as they are; the parquet-only options are refused for other sources."""
    import io

    import pyarrow as pa

    rng = np.random.default_rng(1)
    n = 48
    pixels = rng.integers(0, 256, (n, 9, 11, 3), dtype=np.uint8)
    encoded = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    split = np.where(np.arange(n) < 36, "train", np.where(np.arange(n) < 40, "val", "test"))
    pq.write_table(pa.table({"sample_id": np.arange(n) * 3 + 5, "y": np.arange(n) % 4, "image": encoded,
                             "part": split}), tmp_path / "hf.parquet")
    read = dict(image_column="image", label_column="y", id_column="sample_id", split_column="part")
    out = tmp_path / "hf_prepared"
    summary = prepare("parquet", str(out), root=str(tmp_path / "hf.parquet"), image_size=[8, 10], columns=read)
    assert summary["features"] == "8-bit pixels" and summary["split"]["test"] == 8  # its declared split, kept
    assert pq.read_schema(next(out.glob("*.parquet"))).field("features").type == pa.binary(3 * 8 * 10)
    source = data.load_splits("parquet", path=str(tmp_path / "hf.parquet"), image_size=[8, 10], **read)
    _assert_same_splits(data.load_splits("parquet", path=str(out)), source)

    flat = pa.array(list(pixels.transpose(0, 3, 1, 2).reshape(n, -1)), pa.list_(pa.uint8()))
    pq.write_table(pa.table({"id": np.arange(n), "label": np.arange(n) % 4, "features": flat}), tmp_path / "u8.parquet")
    lists = prepare("parquet", str(tmp_path / "u8_prepared"), root=str(tmp_path / "u8.parquet"), seed=2,
                    columns={"shape": [3, 9, 11]})
    assert lists["features"] == "8-bit pixels" and lists["shape"] == [3, 9, 11]
    _assert_same_splits(data.load_splits("parquet", path=str(tmp_path / "u8_prepared")),
                        data.load_splits("parquet", path=str(tmp_path / "u8.parquet"), shape=[3, 9, 11], seed=2))

    floats = pa.array(list(rng.standard_normal((n, 5)).astype(np.float32)), pa.list_(pa.float32()))
    pq.write_table(pa.table({"id": np.arange(n), "label": np.arange(n) % 4, "features": floats}),
                   tmp_path / "f.parquet")
    assert prepare("parquet", str(tmp_path / "f_prepared"), root=str(tmp_path / "f.parquet"),
                   columns={"shape": [5]})["features"] == "float32"
    _assert_same_splits(data.load_splits("parquet", path=str(tmp_path / "f_prepared")),
                        data.load_splits("parquet", path=str(tmp_path / "f.parquet"), shape=[5]))
    with pytest.raises(data.DataError, match="--image-column is for the parquet source; drop it for digits"):
        prepare("digits", str(tmp_path / "d"), columns={"image_column": "png"})
    with pytest.raises(data.DataError, match="parquet needs --root"):
        prepare("parquet", str(tmp_path / "p"))


def _streamed_by_id(path, **settings) -> dict:
    """{split: {id: (x, y)}} of a Parquet set read as a streamed run reads it (``stream.plan_stream`` and
    ``stream.iter_split``: pyarrow batches, 8-bit samples standardized with the stream's statistics)."""
    from raydistill import config
    from raydistill.stream import iter_split, plan_stream

    streamed = plan_stream(config.load(None, {"data.source": "parquet", "data.path": str(path), "data.stream": True,
                                              **{f"data.{k}": v for k, v in settings.items()}}).data)
    return {part: {int(i): (xi, int(yi)) for x, y, ids in iter_split(streamed, part, batch_size=4)
                   for xi, yi, i in zip(x, y, ids)} for part in ("train", "val", "test")}


def test_streamed_prepare_writes_a_file_at_a_time_and_a_streamed_run_reads_the_sources_samples(tmp_path, capsys,
                                                                                                 monkeypatch):
    """`data prepare parquet --stream`: a set larger than memory is read as a streamed run reads it (files of 13
    rows in batches) and written 5 rows a file, each file one split, in the prepared layout (uint8 image lists as
    pixel bytes with the stream's statistics, float lists as float32 bytes); reading the output, streamed or in
    memory, gives every split's samples, labels and ids exactly as a streamed run on the source gets them. A source
    that fails mid-way leaves no output and no temporary folder; --stream is refused for other sources."""
    import pyarrow as pa

    rng = np.random.default_rng(3)
    n = 52
    source = tmp_path / "u8"
    source.mkdir()
    pixels = rng.integers(0, 256, (n, 3, 4, 6), dtype=np.uint8)
    split = np.where(np.arange(n) % 10 < 7, "train", np.where(np.arange(n) % 10 < 8, "val", "test"))
    for k, start in enumerate(range(0, n, 13)):
        rows = slice(start, start + 13)
        pq.write_table(pa.table({"key": np.arange(n)[rows] * 2 + 1, "label": np.arange(n)[rows] % 3,
                                 "rgb": pa.array(list(pixels[rows].reshape(-1, 72)), pa.list_(pa.uint8())),
                                 "part": split[rows]}), source / f"f{k}.parquet")
    read = {"feature_column": "rgb", "id_column": "key", "split_column": "part", "shape": [3, 4, 6]}
    out = tmp_path / "u8_prepared"
    code, err = _cli_in_process(capsys, "parquet", "--root", str(source), "--feature-column", "rgb", "--id-column",
                                "key", "--split-column", "part", "--shape", "3", "4", "6", "--rows-per-file", "5",
                                "--stream", "--out", str(out))
    assert code == 0, err
    files = sorted(out.glob("*.parquet"))
    tables = [pq.read_table(f) for f in files]
    assert all(t.num_rows <= 5 and len(set(t["split"].to_pylist())) == 1 for t in tables)
    assert [t["split"][0].as_py() for t in tables] == sorted((t["split"][0].as_py() for t in tables),
                                                             key=("train", "val", "test").index)  # grouped
    assert tables[0].schema.field("features").type == pa.binary(72)
    assert b"raydistill.pixels" in tables[0].schema.metadata
    want = _streamed_by_id(source, **read)
    assert {k: len(v) for k, v in want.items()} == {"train": 37, "val": 5, "test": 10}
    got = _streamed_by_id(out)
    in_memory = data.load_splits("parquet", path=str(out))
    for part in ("train", "val", "test"):
        assert sorted(got[part]) == sorted(want[part])
        for i, (x, y) in want[part].items():
            np.testing.assert_array_equal(got[part][i][0], x)
            assert got[part][i][1] == y
        arrays = getattr(in_memory, part)
        np.testing.assert_array_equal(arrays.x, np.stack([want[part][int(i)][0] for i in arrays.ids]))

    floats = tmp_path / "f.parquet"
    pq.write_table(pa.table({"id": np.arange(n), "label": np.arange(n) % 4, "features": pa.array(
        list(rng.standard_normal((n, 5)).astype(np.float32)), pa.list_(pa.float32()))}), floats)
    summary = prepare("parquet", str(tmp_path / "f_prepared"), root=str(floats), columns={"shape": [5]},
                      rows_per_file=8, stream=True, seed=4)
    assert summary["features"] == "float32" and summary["rows"] == n and summary["streamed"]
    want, got = _streamed_by_id(floats, shape=[5], seed=4), _streamed_by_id(tmp_path / "f_prepared")
    assert {part: sorted(v) for part, v in got.items()} == {part: sorted(v) for part, v in want.items()}
    assert all(np.array_equal(got[p][i][0], want[p][i][0]) for p in want for i in want[p])

    # a row of the wrong length in a second file, beyond the first rows a plan checks, found after files were
    # written: one line naming that file; nothing left behind
    broken = tmp_path / "broken_source"
    broken.mkdir()
    (broken / "a.parquet").write_bytes(floats.read_bytes())
    rows = [list(r) for r in rng.standard_normal((80, 5)).astype(np.float32)]
    rows[-1] = rows[-1][:4]
    pq.write_table(pa.table({"id": np.arange(1000, 1080), "label": np.arange(80) % 4,
                             "features": pa.array(rows, pa.list_(pa.float32()))}), broken / "b.parquet")
    from raydistill import prepare as prepare_module

    written = []
    monkeypatch.setattr(prepare_module, "write_parquet",
                        lambda *a, **k: written.append(a[1]) or data.write_parquet(*a, **k))  # counts the files
    with pytest.raises(data.DataError, match="b.parquet has length 4, 5 per row") as info:
        prepare("parquet", str(tmp_path / "broken"), root=str(broken), columns={"shape": [5]}, rows_per_file=8,
                stream=True)
    assert "\n" not in str(info.value)
    assert len(written) >= 5  # it failed after files were written
    assert not (tmp_path / "broken").exists() and not list(tmp_path.glob(".broken*"))
    with pytest.raises(data.DataError, match="--stream is for the parquet source; drop it for digits"):
        prepare("digits", str(tmp_path / "d"), stream=True)
