"""stream.py without Ray: planning streamed splits from the id/label columns, and reading them batch by batch."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill import config
from raydistill.errors import DataError
from raydistill.prepare import prepare
from raydistill.stream import ShuffleBuffer, iter_split, plan_stream, streams


def _folder(path, rows=400, files=4, width=6, seed=0):
    path.mkdir()
    rng = np.random.default_rng(seed)
    for part in range(files):
        ids = np.arange(part * rows // files, (part + 1) * rows // files)
        features = list(rng.standard_normal((len(ids), width)))
        pq.write_table(pa.table({"id": ids, "label": ids % 5, "features": features}), path / f"part-{part}.parquet")
    return str(path)


def _data(**sets):
    return config.load(None, {"data.source": "parquet", **sets}).data


def test_carved_splits_are_disjoint_cover_the_rows_and_follow_the_seed(tmp_path):
    d = _data(**{"data.path": _folder(tmp_path / "a"), "data.shape": [6], "data.val_fraction": 0.2,
                 "data.test_fraction": 0.25})
    assert streams(d) and not streams(_data(**{"data.path": "x", "data.stream": False}))
    s = plan_stream(d)
    ids = {name: np.concatenate([b[2] for b in iter_split(s, name, batch_size=37)])
           for name in ("train", "val", "test")}
    assert sorted(np.concatenate(list(ids.values()))) == list(range(400))  # every row in exactly one split
    assert {name: len(v) for name, v in ids.items()} == {name: s.rows(name) for name in ids}
    assert 60 < len(ids["test"]) < 140 and 40 < len(ids["val"]) < 120  # ~25% and ~20% by the id hash
    assert s.origin["test"].startswith("carved from") and "data.seed=0" in s.origin["test"]
    x, y, _ = next(iter_split(s, "train", batch_size=8))
    assert x.shape[1:] == (6,) and 0 < len(x) <= 8 and x.dtype == np.float32 and y.dtype == np.int64
    again, other = plan_stream(d), plan_stream(_data(**{"data.path": d.path, "data.shape": [6], "data.seed": 1}))
    assert again.fingerprint == s.fingerprint and other.fingerprint != s.fingerprint
    other_test = np.concatenate([b[2] for b in iter_split(other, "test")])
    assert set(other_test) != set(ids["test"])


def test_prepared_split_column_is_kept_and_the_limit_applies(tmp_path):
    prepare("digits", str(tmp_path / "digits"), rows_per_file=500)
    s = plan_stream(_data(**{"data.path": str(tmp_path / "digits")}))
    assert (s.rows("train"), s.rows("val"), s.rows("test"), s.shape, s.num_classes) == (1258, 180, 359, (1, 8, 8), 10)
    from raydistill.data import load_splits

    in_memory = load_splits("parquet", path=str(tmp_path / "digits"))
    streamed_test = np.concatenate([b[2] for b in iter_split(s, "test")])
    assert sorted(streamed_test) == sorted(in_memory.test.ids)
    limited = plan_stream(_data(**{"data.path": str(tmp_path / "digits"), "data.limit": 50}))
    assert limited.rows("train") == 50 and sum(len(b[1]) for b in iter_split(limited, "train", 16)) == 50


def test_stream_errors_are_one_line_data_errors(tmp_path):
    folder = _folder(tmp_path / "b")
    with pytest.raises(DataError, match="needs data.shape"):
        plan_stream(_data(**{"data.path": folder}))
    (tmp_path / "b" / "part-9.parquet").write_bytes(b"PAR1" + b"\0" * 40 + b"PAR1")
    with pytest.raises(DataError, match=r"cannot read parquet data .*part-9.parquet"):
        plan_stream(_data(**{"data.path": folder, "data.shape": [6]}))
    noid = tmp_path / "noid.parquet"
    pq.write_table(pa.table({"label": [0, 1], "features": [[0.0] * 6] * 2}), noid)
    with pytest.raises(DataError, match="needs an id column"):
        plan_stream(_data(**{"data.path": str(noid), "data.shape": [6]}))
    with pytest.raises(DataError, match=r"part-0.parquet has length 6 per row but data.shape \[2, 4\] needs 8"):
        plan_stream(_data(**{"data.path": _folder(tmp_path / "c"), "data.shape": [2, 4]}))  # before any training


def test_fixed_size_list_features_load_in_memory_and_streamed_and_a_wrong_size_is_one_line(tmp_path):
    """A feature column of Arrow's fixed_size_list type (what benchmarks/data_scale.py writes): its rows' length is
    the type's, checked without counting them."""
    from raydistill.data import load_splits

    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 8)).astype(np.float32)
    path = tmp_path / "fixed.parquet"
    pq.write_table(pa.table({"id": np.arange(120), "label": np.arange(120) % 3,
                             "features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 8)}), path)
    s = plan_stream(_data(**{"data.path": str(path), "data.shape": [2, 4]}))
    got = {int(i): row for xs, _, ids in iter_split(s, "train", batch_size=7) for i, row in zip(ids, xs)}
    assert got and all(np.array_equal(row, x[i].reshape(2, 4)) for i, row in got.items())
    in_memory = load_splits("parquet", path=str(path), shape=(2, 4), seed=0)
    assert np.array_equal(in_memory.test.x, x[in_memory.test.ids].reshape(-1, 2, 4))
    with pytest.raises(DataError, match=r"fixed.parquet has length 8 per row but data.shape \[3, 3\] needs 9"):
        plan_stream(_data(**{"data.path": str(path), "data.shape": [3, 3]}))


@pytest.mark.parametrize("fixed", [False, True], ids=["lists", "fixed_size_lists"])
def test_nested_list_features_load_as_their_shape_and_a_wrong_nesting_is_one_line(fixed, tmp_path):
    """(C, H, W) samples stored as nested lists, one level per dimension (``x.tolist()``, HF datasets' Array3D):
    in memory, streamed, and as a whole table (as the cache builder maps it), the same arrays as the flat layout.
    Another nesting of the same floats, or ragged rows, is a one-line error, never a reshape."""
    from raydistill.data import load_splits
    from raydistill.stream import to_arrays

    rng = np.random.default_rng(0)
    x = rng.standard_normal((90, 2, 3, 4)).astype(np.float32)
    if fixed:
        column = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(
            pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4), 3), 2)
    else:
        column = pa.array(x.tolist(), pa.list_(pa.list_(pa.list_(pa.float32()))))
    path = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"id": np.arange(90), "label": np.arange(90) % 3, "features": column}), path)
    s = plan_stream(_data(**{"data.path": str(path), "data.shape": [2, 3, 4]}))
    got = {int(i): row for xs, _, ids in iter_split(s, "train", batch_size=7) for i, row in zip(ids, xs)}
    assert got and all(np.array_equal(row, x[i]) for i, row in got.items())
    in_memory = load_splits("parquet", path=str(path), shape=(2, 3, 4), seed=0)
    assert np.array_equal(in_memory.test.x, x[in_memory.test.ids])
    table = pq.read_table(path)
    assert np.array_equal(to_arrays(s, table, "rows")[0], x)
    for wrong in ([3, 2, 4], [2, 12], [24]):
        with pytest.raises(DataError, match=rf"nested.parquet holds nested lists of shape \[2, 3, 4\] per row but "
                                            rf"data.shape is \[{', '.join(map(str, wrong))}\]"):
            load_splits("parquet", path=str(path), shape=wrong, seed=0)
    ragged = tmp_path / "ragged.parquet"
    rows = x[:4].tolist()
    rows[2][1] = rows[2][1][:2]  # one row's second channel has 2 rows, not 3
    pq.write_table(pa.table({"id": np.arange(4), "label": [0, 1, 2, 0], "features": rows}), ragged)
    with pytest.raises(DataError, match=r"ragged.parquet holds nested lists of different lengths \(2, 3\) at "
                                        r"nesting level 2"):
        load_splits("parquet", path=str(ragged), shape=(2, 3, 4), seed=0)


def _interleaved_digits(folder) -> str:
    """Digits with a split column, all splits in every file (sorted by id), as data from elsewhere may come."""
    from raydistill.data import Arrays, load_splits, write_parquet

    splits = load_splits("digits")
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    ids = np.concatenate([p.ids for p in parts.values()])
    order = np.argsort(ids)
    x, y = (np.concatenate([getattr(p, a) for p in parts.values()])[order] for a in ("x", "y"))
    names = np.concatenate([[name] * len(p) for name, p in parts.items()])[order]
    write_parquet(Arrays(x, y, ids[order], 10, splits.shape), folder, rows_per_file=500, split=names)
    return str(folder)


def test_a_split_in_files_of_its_own_reads_only_them_with_no_filter(tmp_path):
    """Prepared data (each split in files of its own) and the same rows interleaved in every file: the same rows,
    order and arrays per split; prepared, each split's plan names only its files and filters nothing, so a
    training epoch decodes no val or test row, and no split needs writing aside."""
    from raydistill.stream import needs_aside

    prepare("digits", str(tmp_path / "grouped"), rows_per_file=500)
    grouped = plan_stream(_data(**{"data.path": str(tmp_path / "grouped")}))
    mixed = plan_stream(_data(**{"data.path": _interleaved_digits(tmp_path / "mixed")}))
    files = sorted(str(f) for f in (tmp_path / "grouped").glob("*.parquet"))
    assert (grouped.train.files, grouped.val.files, grouped.test.files) == (tuple(files[:3]), (files[3],),
                                                                           (files[4],))
    assert len(mixed.train.files) == len(mixed.test.files) == 4 and mixed.train.split_column == "split"
    for split in ("train", "val", "test"):
        plan = grouped.plan(split)
        assert plan.split_column is None and plan.carve is None and not needs_aside(plan), split
        a, b = _read(grouped, split), _read(mixed, split)
        assert np.array_equal(a[2], b[2]) and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), split
        assert grouped.rows(split) == mixed.rows(split) == len(a[1])


def _read(data, split, batch_size=64):
    parts = list(iter_split(data, split, batch_size=batch_size))
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


@pytest.mark.parametrize("source", ["carved", "split_column", "carved_limit"])
def test_filtered_val_and_test_are_written_aside_once_with_the_same_rows(source, tmp_path):
    from raydistill.stream import write_aside

    if source == "split_column":  # digits with its split column, the splits interleaved in every file
        d = _data(**{"data.path": _interleaved_digits(tmp_path / "d")})
    else:
        d = _data(**{"data.path": _folder(tmp_path / "d"), "data.shape": [6], "data.val_fraction": 0.2,
                     **({"data.limit": 30} if source == "carved_limit" else {})})
    s = plan_stream(d)
    aside, done = write_aside(s, tmp_path / "run" / "splits")
    assert done["action"] == "written" and done["splits"] == {"val": s.rows("val"), "test": s.rows("test")}
    for split in ("val", "test"):
        assert aside.plan(split).files != s.plan(split).files and len(aside.plan(split).files) == 1
        assert aside.plan(split).carve is None and aside.plan(split).split_column is None
        before, after = _read(s, split), _read(aside, split)
        assert all(np.array_equal(a, b) for a, b in zip(before, after)), split  # the same rows, order and arrays
        assert aside.rows(split) == s.rows(split) == len(after[1])
    assert aside.train == s.train and aside.fingerprint == s.fingerprint and aside.describe() == s.describe()
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "splits").rglob("*.parquet")}
    again, done = write_aside(plan_stream(d), tmp_path / "run" / "splits")  # a rerun on the same data: reused
    assert done["action"] == "reused" and again == aside
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "splits").rglob("*.parquet")} == written
    assert not [p for p in (tmp_path / "run" / "splits").iterdir() if p.name.startswith(".")]  # no temporary left


def test_declared_splits_are_not_written_aside_and_an_unreadable_file_is_named(tmp_path):
    from raydistill.stream import write_aside

    train = _folder(tmp_path / "train")
    val, test = _folder(tmp_path / "val", rows=40, files=1), _folder(tmp_path / "test", rows=40, files=1)
    for start, folder in ((1000, val), (2000, test)):  # ids apart from the training rows' and each other's
        for f in Path(folder).iterdir():
            pq.write_table(pq.read_table(f).set_column(0, "id", pa.array(np.arange(start, start + 40))), f)
    s = plan_stream(_data(**{"data.train": train, "data.val": val, "data.test": test, "data.shape": [6]}))
    assert write_aside(s, tmp_path / "splits") == (s, {})  # declared files are read where they are
    assert not (tmp_path / "splits").exists()
    s = plan_stream(_data(**{"data.path": _folder(tmp_path / "c"), "data.shape": [6]}))
    (tmp_path / "c" / "part-2.parquet").write_bytes(b"PAR1 not a parquet file PAR1")
    with pytest.raises(DataError, match=r"cannot read parquet file .*part-2\.parquet .*replace or remove") as err:
        write_aside(s, tmp_path / "splits")
    assert "\n" not in str(err.value)
    assert not [p for p in (tmp_path / "splits").iterdir()]  # nothing half-written left behind


def _shuffled(size: int, seed: int, blocks: list[int], batch_size: int) -> list[np.ndarray]:
    """The ids of each batch a ShuffleBuffer gives for rows 0.. added in blocks of the given sizes."""
    rows, out, start = ShuffleBuffer(size, seed), [], 0
    for m in blocks:
        ids = np.arange(start, start + m)
        rows.add(np.repeat(ids[:, None].astype(np.float32), 3, axis=1), ids)  # x (m, 3) says which row it is
        start += m
        out += [(x, i) for x, i in rows.batches(batch_size)]
        assert rows.n < max(size, batch_size)  # a batch comes out once the buffer holds `size` rows, not later
    out += [(x, i) for x, i in rows.drain(batch_size)]
    assert all(np.array_equal(x[:, 0], i) and x.flags.writeable for x, i in out)  # rows stay whole, fresh arrays
    return [i for _, i in out]


def test_the_shuffle_buffer_gives_every_row_once_in_a_seeded_order_within_its_reach():
    blocks = [50, 7, 120, 1, 64, 300, 33]  # blocks of any size, some larger than the buffer
    batches = _shuffled(100, seed=3, blocks=blocks, batch_size=16)
    ids = np.concatenate(batches)
    assert sorted(ids) == list(range(sum(blocks)))  # every row exactly once
    assert [len(b) for b in batches[:-1]] == [16] * (len(batches) - 1) and 0 < len(batches[-1]) <= 16
    assert np.array_equal(ids, np.concatenate(_shuffled(100, seed=3, blocks=blocks, batch_size=16)))  # seeded
    other = np.concatenate(_shuffled(100, seed=4, blocks=blocks, batch_size=16))
    assert not np.array_equal(ids, other) and not np.array_equal(ids, np.sort(ids))
    # a local shuffle, not a full one: the p-th row out was among the first p + 100 (the buffer) + a block's rows
    # in; and rows are mixed across blocks, not only within their own
    assert np.all(ids - np.arange(len(ids)) < 100 + max(blocks))
    assert np.mean(np.abs(ids - np.arange(len(ids)))) > 30
    # a restarted buffer (the next epoch) keeps its arrays and starts empty; an empty block (every row filtered
    # out) is nothing, first or later
    rows = ShuffleBuffer(10, seed=0)
    rows.add(np.zeros((0, 2), np.float32), np.arange(0))
    rows.add(np.zeros((25, 2), np.float32), np.arange(25))
    kept = rows.columns[0]
    rows.restart(1)
    assert rows.n == 0 and list(rows.drain(4)) == []
    rows.add(np.ones((25, 2), np.float32), np.arange(25))
    rows.add(np.ones((0, 2), np.float32), np.arange(0))
    assert rows.columns[0] is kept and sorted(np.concatenate([i for _, i in rows.drain(4)])) == list(range(25))



def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_encoded_images_stream_decoded_as_the_in_memory_loader_decodes_them(tmp_path):
    """Parquet of encoded images (here Hugging Face's {"bytes", "path"} struct; plain bytes too) with ids streams: the
    samples are decoded to (3, H, W) at data.image_size where they are read and standardized per channel with the
    first training rows' statistics, which for a training split that small are the whole split's: the arrays equal
    the in-memory loader's. A row that is not an image is a one-line error naming the file."""
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for name, ids in (("train", range(0, 40)), ("val", range(50, 58)), ("test", range(100, 112))):
        images = [{"bytes": _png(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)), "path": f"{i}.png"} for i in ids]
        pq.write_table(pa.table({"id": list(ids), "label": [i % 3 for i in ids], "img": images}),
                       tmp_path / "imgs" / f"{name}.parquet")
    folder = tmp_path / "imgs"
    sets = {"data.train": str(folder / "train.parquet"), "data.val": str(folder / "val.parquet"),
            "data.test": str(folder / "test.parquet"), "data.image_column": "img", "data.image_size": [6, 10]}
    d = _data(**sets)
    assert streams(d)
    s = plan_stream(d)
    assert s.shape == (3, 6, 10) and s.rows("test") == 12 and s.channel_stats is not None
    from raydistill.data import load_splits

    in_memory = load_splits("parquet", train=d.train, val=d.val, test=d.test, image_column="img", image_size=[6, 10])
    x, y, ids = (np.concatenate(a) for a in zip(*iter_split(s, "test", batch_size=5)))
    assert list(ids) == list(in_memory.test.ids) and list(y) == list(in_memory.test.y)
    np.testing.assert_allclose(x, in_memory.test.x, rtol=1e-5, atol=1e-5)
    other = plan_stream(_data(**{**sets, "data.image_size": 8}))
    assert other.shape == (3, 8, 8) and other.fingerprint != s.fingerprint  # the decoded size is part of the data
    # forgot data.image_column: the error names the column that holds images, streamed and in memory
    plain = {k: v for k, v in sets.items() if k not in ("data.image_column", "data.image_size")}
    with pytest.raises(DataError, match=r"column 'features' not in parquet .*'img' looks like encoded images: set "
                                        r"data.image_column=img$"):
        plan_stream(_data(**plain))
    with pytest.raises(DataError, match="set data.image_column=img$"):
        load_splits("parquet", train=d.train, test=d.test)
    # not an image: named before any training, in one line
    pq.write_table(pa.table({"id": [7], "label": [0], "img": [{"bytes": b"not a png", "path": "7.png"}]}),
                   tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"cannot decode image in row 0 of file .*bad.parquet") as info:
        plan_stream(_data(**{**sets, "data.test": str(tmp_path / "bad.parquet")}))
    assert "\n" not in str(info.value)
    # a bad image further in is named by its sample id where it is read (here: the first rows' statistics)
    good = pq.read_table(folder / "train.parquet").to_pylist()[:3]
    good[2]["img"] = {"bytes": b"not a png", "path": "2.png"}
    pq.write_table(pa.Table.from_pylist(good), tmp_path / "late.parquet")
    with pytest.raises(DataError, match=r"cannot decode image with id 2 in .*late.parquet \(UnidentifiedImageError: "
                                        r"cannot identify image file\); remove or replace that file$"):
        plan_stream(_data(**{**sets, "data.train": str(tmp_path / "late.parquet")}))


# ---- a worker's local copy of its rows ----------------------------------------------------------------------
def _open_fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_local_copy_gives_every_row_once_an_epoch_in_a_seeded_order_and_leaves_no_file(tmp_path, dtype):
    from raydistill.stream import LocalCopy

    rng = np.random.default_rng(0)
    n, shape = 530, (3, 4, 5)
    x = (rng.standard_normal((n, *shape)) * 50).astype(dtype)
    y, ids = rng.integers(0, 7, n), rng.permutation(n) + 1000  # ids in no particular order
    fds = _open_fds()
    copy = LocalCopy(shape, folder=str(tmp_path))
    assert not list(tmp_path.iterdir())  # unlinked at once: nothing to leave behind, even if the process dies
    for start in range(0, n, 100):  # blocks of the stream's sizes
        assert copy.add(x[start:start + 100], y[start:start + 100], ids[start:start + 100])
    assert not copy.done and copy.finish() and copy.done
    by_id = {i: k for k, i in enumerate(ids)}
    orders = []
    for seed in (1, 2, 1):
        batches = list(copy.batches(64, seed))
        assert [len(b[0]) for b in batches] == [64] * 8 + [18]
        got = np.concatenate([b[2] for b in batches])
        assert sorted(got) == sorted(ids)  # every row once
        for bx, by, bids in batches:  # each row's sample and label with its id, as added
            rows = [by_id[i] for i in bids]
            assert bx.dtype == np.dtype(dtype) and np.array_equal(bx, x[rows]) and np.array_equal(by, y[rows])
        orders.append(got)
    assert np.array_equal(orders[0], orders[2]) and not np.array_equal(orders[0], orders[1])
    # the order depends on the rows held, not on the order they were added in
    again = LocalCopy(shape, folder=str(tmp_path))
    back = np.argsort(-ids)
    again.add(x[back], y[back], ids[back])
    again.finish()
    assert np.array_equal(np.concatenate([b[2] for b in again.batches(64, 1)]), orders[0])
    copy.close()
    again.close()
    assert _open_fds() == fds


def test_local_copy_drops_itself_on_a_failed_write_or_a_changed_dtype(tmp_path):
    """A real write failure (the file-size limit, EFBIG) and a block of another sample dtype: ``add`` says False,
    the copy is closed, ``finish`` says False: the epochs go on streaming."""
    from raydistill.stream import LocalCopy

    script = textwrap.dedent("""
        import resource, signal, sys
        import numpy as np
        from raydistill.stream import LocalCopy
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024, 8 * 1024))
        copy = LocalCopy((256,), folder=sys.argv[1])
        block = np.zeros((4, 256), np.float32)  # 4 KiB
        print(copy.add(block, np.zeros(4), np.arange(4)), copy.add(block, np.zeros(4), np.arange(4, 8)),
              copy.add(block, np.zeros(4), np.arange(8, 12)), copy.finish(), copy.fd)
    """)
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "True", "False", "False", "None"]

    copy = LocalCopy((2,), folder=str(tmp_path))
    assert copy.add(np.zeros((3, 2), np.uint8), np.zeros(3), np.arange(3))
    assert not copy.add(np.zeros((3, 2), np.float32), np.zeros(3), np.arange(3, 6))
    assert copy.fd is None and not copy.finish()


def test_local_copy_holds_no_reference_to_the_blocks_it_was_given(tmp_path):
    """Labels and ids are copied as they come: a view kept until the epoch's end would pin its Ray Data block (the
    samples too) in the object store for the whole epoch."""
    import weakref

    from raydistill.stream import LocalCopy

    copy = LocalCopy((4,), folder=str(tmp_path))
    buffer = np.arange(10 * 6, dtype=np.int64)  # one buffer holding the rows' columns, as an Arrow block's
    alive = weakref.ref(buffer)  # numpy views point at the array that owns the memory
    block = buffer.reshape(10, 6)
    assert copy.add(block[:, :4].astype(np.float32), block[:, 4], block[:, 5])
    del buffer, block
    assert alive() is None
    assert copy.finish() and list(copy.ids) == list(range(5, 60, 6))
    copy.close()
