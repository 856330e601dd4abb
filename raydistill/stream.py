"""Parquet data that is streamed, never loaded: Ray Data into the Train workers, pyarrow batches elsewhere.

``data.stream`` (auto: on for a Parquet source with an id column, its samples a flat feature column or encoded
images; digits, CIFAR-10 and image folders stay in memory, or go through ``raydistill data prepare`` first)
describes the data as a
``StreamData``: per split the Parquet files and a row filter, plus the sample shape, the class count,
the split sizes and a fingerprint. Building it reads only the id, label and split columns (8–20 bytes
a row); the features are read batch by batch where they are used:

* training: ``stream.train_dataset`` is a Ray Data ``read_parquet`` over the train split's files (file
  order shuffled every epoch from ``seed`` with ``FileShuffleConfig(seed, reseed_after_execution=True)``),
  handed to ``TorchTrainer(datasets={"train": ...})``; each worker reads its ``get_dataset_shard`` block by
  block (``iter_batches(batch_size=None)``) into a ``ShuffleBuffer`` seeded by (seed, epoch): a shuffled
  file order plus a local shuffle buffer, not a full shuffle (benchmarks/data_scale.py: over 3 seeds it cost no
  accuracy against the in-memory path's full per-epoch permutation). Rows keep a deterministic order
  (``preserve_order``), so a run is reproducible. ``worker.StreamedTrain`` reads ahead into the next epoch, and
  (``data.local_copy_mb``) keeps the rows of its first epoch in a ``LocalCopy`` on local disk, from which every
  later epoch reads a seeded full permutation of them instead of the stream.
* validation, test, calibration and the example input: ``iter_split`` yields pyarrow record batches of
  one split as numpy (x, y, ids), so the driver and rank 0 never hold a whole split either. A val or test split
  that is a filter over the training files (carved, or a split column) is first written once per run to files of
  its own (``write_aside``, under ``<out>/splits/``), so each of those reads decodes only its own rows.

Splits: declared files (``data.train/val/test``) or a split column are used as they are; with a split column,
each split reads only the files that hold its rows, and filters nothing when they hold no other split's rows
(``raydistill data prepare`` writes them so). A split that is
not declared is carved from the training files by a hash of (``data.seed``, sample id) into 10,000
buckets, test first, then val (``data.test_fraction``, ``data.val_fraction``): deterministic for a
seed and decidable row by row while streaming (not stratified by class, unlike the in-memory carving).

Written here, not taken from Ray Data: the carving rule (Ray Data's ``train_test_split`` needs the
whole dataset materialized, ``split_proportionately`` is by position, not by id) and the fingerprint
(a cheap one over file sizes, row counts and each file's head and footer bytes, not every byte).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from raydistill.errors import DataError
from raydistill.hashing import hash_ints

CARVE_BUCKETS = 10_000
_CARVE_SALT = 0x5EED_5B17  # the carving hash differs from the augmentation's (same splitmix64 family)
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class SplitPlan:
    """Where one split's rows are, without reading them: Parquet files and a row filter."""

    files: tuple[str, ...]  # paths on ``filesystem``
    split_column: str | None = None  # keep rows whose split column ...
    split_value: str | None = None  # ... equals this
    carve: tuple[int, int] | None = None  # keep rows whose id bucket is in [lo, hi) of CARVE_BUCKETS
    seed: int = 0
    rows: int = 0  # after ``limit``
    limit: int | None = None  # data.limit: only the first rows (in file order), for smoke runs
    # the pyarrow filesystem ``files`` are on (S3, GCS, HDFS, ... with the options its URI gave); None: local. Kept
    # with the plan because pyarrow lists a URI's files without their scheme ("bucket/prefix/part-0.parquet"),
    # which read as local paths would name nothing. Pickled with the plan to the workers and Ray Data's read tasks.
    filesystem: object | None = None


@dataclass(frozen=True)
class StreamData:
    """The data of a streamed run: what the driver, the workers and the cache builder need to read it."""

    name: str
    shape: tuple[int, ...]
    num_classes: int
    train: SplitPlan
    val: SplitPlan
    test: SplitPlan
    label_column: str
    feature_column: str
    id_column: str
    fingerprint: str
    origin: dict[str, str] = field(default_factory=dict)
    # encoded images (``data.image_column``: PNG/JPEG bytes, or Hugging Face's {"bytes", "path"} struct) instead
    # of a flat feature column: decoded to (3, H, W) of ``data.image_size`` where they are read, then standardized
    # per channel with ``channel_stats`` ((mean, std) per channel, from the first training rows: see plan_stream).
    # A flat feature column of 8-bit pixels (``raydistill.pixels`` metadata, as ``raydistill data prepare`` writes
    # images) is standardized with the ``channel_stats`` written there (``data.standardize_pixels``); lists of uint8
    # for an image shape (``data.is_pixel_list``) with those of the first training rows, as encoded images.
    image_column: str | None = None
    channel_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def sample_column(self) -> str:
        """The column holding the samples: the encoded images, else the flat features."""
        return self.image_column or self.feature_column

    def describe(self) -> dict[str, dict]:
        return {name: {"from": self.origin.get(name, "?"), "size": getattr(self, name).rows} for name in SPLIT_NAMES}

    def plan(self, split: str) -> SplitPlan:
        return getattr(self, split)

    def rows(self, split: str) -> int:
        return self.plan(split).rows

    def batches(self, split: str, batch_size: int = 1024):
        """(x, y, ids) numpy batches of ``split``, read from the files batch by batch."""
        return iter_split(self, split, batch_size)

    def head(self, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        return head(self, split, n)


def streams(d) -> bool:
    """Whether ``data`` (a config's DataConfig) is streamed: ``data.stream``, or auto: Parquet (a flat feature
    column or encoded images) with an id column (rows are joined to the cache and carved into splits by id; without
    ids, in memory)."""
    if d.source != "parquet":
        return False
    if d.stream is not None:
        return bool(d.stream)
    from raydistill.data import _parquet_dataset

    return d.id_column in _parquet_dataset(d.train or d.path).schema.names


def _local_or(filesystem):
    """None for the local filesystem (plain paths), else ``filesystem``."""
    import pyarrow.fs as pafs

    return None if isinstance(filesystem, pafs.LocalFileSystem) else filesystem


def _fs(filesystem):
    import pyarrow.fs as pafs

    return filesystem if filesystem is not None else pafs.LocalFileSystem()


def _bucket(ids: np.ndarray, seed: int) -> np.ndarray:
    return (hash_ints(seed, _CARVE_SALT, ids) % np.uint64(CARVE_BUCKETS)).astype(np.int64)


def _keep(plan: SplitPlan, batch, data: StreamData) -> np.ndarray:
    """(N,) bool: which rows of ``batch`` (a pyarrow Table or RecordBatch) belong to ``plan``'s split."""
    keep = np.ones(batch.num_rows, bool)
    if plan.split_column is not None:
        keep &= batch.column(plan.split_column).to_numpy(zero_copy_only=False) == plan.split_value
    if plan.carve is not None:
        b = _bucket(batch.column(data.id_column).to_numpy(zero_copy_only=False).astype(np.int64), plan.seed)
        keep &= (b >= plan.carve[0]) & (b < plan.carve[1])
    return keep


def _columns_of(files: tuple[str, ...], columns: list[str], location, filesystem=None) -> dict[str, np.ndarray]:
    """Only ``columns`` (ids, labels, the split column) of ``files`` (on ``filesystem``), as numpy."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    try:
        table = ds.dataset(list(files), filesystem=filesystem, format="parquet").to_table(columns=columns)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"cannot read parquet data at {location} ({str(error).splitlines()[0][:200]}); "
                        "replace or remove the unreadable file") from None
    return {c: np.asarray(table[c].to_pylist(), dtype=object) if pa.types.is_string(table[c].type)
            else table[c].to_numpy() for c in columns}


def _splits_per_file(dataset, split: np.ndarray) -> list[set] | None:
    """The split values each file of ``dataset`` holds, from ``split`` (the split column of all its rows, in file
    order); None when the files' row counts do not add up to it (then every split reads every file)."""
    counts = [fragment.metadata.num_rows for fragment in dataset.get_fragments()]
    if sum(counts) != len(split):
        return None
    edges = np.cumsum([0, *counts])
    return [set(split[a:b].tolist()) for a, b in zip(edges[:-1], edges[1:])]


def _check_row_length(path: str, feature_column: str, shape: tuple[int, ...], filesystem=None) -> None:
    """The first rows of a file must fit ``data.shape``: a file written for another shape fails here, before any
    training (a stray row further in fails where it is read, also as a DataError)."""
    from raydistill.data import _flat_features

    first = next(_batches_of(path, [feature_column], 64, filesystem), None)
    if first is not None and first.num_rows:
        _flat_features(first.column(0), shape, feature_column, path)


def _file_digest(path: str, filesystem=None) -> str:
    """Size, row count and the first and last 64 KiB of one Parquet file (its footer holds the statistics)."""
    import pyarrow.parquet as pq

    fs = _fs(filesystem)
    size = fs.get_file_info(path).size
    with fs.open_input_file(path) as f:
        head = f.read(65536)
        f.seek(max(0, size - 65536))
        tail = f.read()
        rows = pq.ParquetFile(f).metadata.num_rows
    return hashlib.sha256(f"{size}:{rows}:".encode() + head + tail).hexdigest()


def plan_stream(d, seed: int | None = None) -> StreamData:
    """``StreamData`` for a config's ``data`` section: files, filters, sizes, shape, classes, fingerprint.

    Reads the id, label and split columns and the schema, never the features."""
    from raydistill.data import (
        _META_NUM_CLASSES,
        _META_SPLIT_COLUMN,
        _labels,
        _parquet_dataset,
        check_image_column,
        flat_feature_shape,
        image_column_hint,
        image_hw,
        is_pixel_list,
        stored_pixel_stats,
    )
    from raydistill.data import sample_shape as check_shape

    seed = d.seed if seed is None else seed
    location = d.train or d.path
    if location is None:
        raise DataError("data.source is parquet but neither data.path nor data.train is set; set one")
    dataset = _parquet_dataset(location)
    meta = dataset.schema.metadata or {}
    names = dataset.schema.names
    split_column = d.split_column
    if split_column is None and not (d.val or d.test) and _META_SPLIT_COLUMN in meta:
        split_column = meta[_META_SPLIT_COLUMN].decode()
    sample_column = d.image_column or d.feature_column
    for column in [d.label_column, sample_column] + ([split_column] if split_column else []):
        if column not in names:
            hint = image_column_hint(dataset.schema) if column == d.feature_column and not d.image_column else ""
            raise DataError(f"column {column!r} not in parquet {location}; available columns: {', '.join(names)}"
                            + hint)
    if d.id_column not in names:
        raise DataError(f"streamed parquet data needs an id column ({d.id_column!r} is not in {location}); "
                        "add one (unique integers) or set data.stream: false")
    if d.image_column is not None:  # decoded to RGB at data.image_size (default 32), as the in-memory loader does
        check_image_column(dataset.schema, d.image_column, f"parquet {location}")
        shape = check_shape([3, *(image_hw(d.image_size) or (32, 32))])
        pixels = None
    else:
        shape = flat_feature_shape(d.shape, meta, location)
        pixels = stored_pixel_stats(meta, location, shape, dataset.schema.field(d.feature_column).type)
    # lists of uint8 for an image shape: 8-bit images (data.is_pixel_list), standardized with measured statistics
    pixel_lists = d.image_column is None and is_pixel_list(dataset.schema.field(d.feature_column).type, shape)
    hint = int(meta[_META_NUM_CLASSES]) if _META_NUM_CLASSES in meta else 0
    files, filesystem = tuple(dataset.files), _local_or(dataset.filesystem)

    wanted = [d.id_column, d.label_column] + ([split_column] if split_column else [])
    cols = _columns_of(files, wanted, location, filesystem)
    ids, labels = cols[d.id_column].astype(np.int64), _labels(cols[d.label_column], f"column {d.label_column!r}")
    split = cols.get(split_column) if split_column else None
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"id column {d.id_column!r} has duplicate ids in {location}; make ids unique")
    holds = _splits_per_file(dataset, split) if split_column else None

    def rows_of(value: str) -> dict:
        """The files and row filter of the rows whose split column is ``value``: only the files that hold such
        rows, and no filter when those files hold nothing else (``raydistill data prepare`` writes each split
        to files of its own, so a training epoch no longer decodes the val and test rows to drop them)."""
        if holds is None:
            return dict(files=files, split_column=split_column, split_value=value)
        mine = [h for h in holds if value in h]
        alone = all(h == {value} for h in mine)
        return dict(files=tuple(f for f, h in zip(files, holds) if value in h),
                    split_column=None if alone else split_column, split_value=None if alone else value)

    plans: dict[str, SplitPlan] = {}
    origin: dict[str, str] = {}
    kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if split_column:
        unknown = sorted({str(v) for v in set(split.tolist())} - set(SPLIT_NAMES))
        if unknown:
            raise DataError(f"split column {split_column!r} of {location} holds {', '.join(map(repr, unknown[:3]))}; "
                            f"its values must be {', '.join(SPLIT_NAMES)}")
    declared = {name: loc for name, loc in (("val", d.val), ("test", d.test)) if loc}
    wanted_types = {c: str(dataset.schema.field(c).type) for c in (d.id_column, d.label_column, sample_column)}
    for name, loc in declared.items():
        declared_set = _parquet_dataset(loc)
        other, other_fs, schema = tuple(declared_set.files), _local_or(declared_set.filesystem), declared_set.schema
        if d.image_column is None:  # first: another sample shape is the likelier cause of another feature type
            flat_feature_shape(shape, schema.metadata or {}, loc, split=name)
        for column, kind in wanted_types.items():
            found = str(schema.field(column).type) if column in schema.names else "missing"
            if found != kind:
                raise DataError(f"declared {name} split {loc} has a different schema: column {column!r} is {found} "
                                f"there but {kind} in the training data; write every split with the same columns and "
                                "types")
        c = _columns_of(other, [d.id_column, d.label_column], loc, other_fs)
        plans[name] = SplitPlan(other, rows=len(c[d.id_column]), filesystem=other_fs)
        kept[name] = (c[d.id_column].astype(np.int64), _labels(c[d.label_column], f"column {d.label_column!r}"))
        origin[name] = f"declared: data.{name}={loc}"
    if split_column:
        for name in ("val", "test"):
            mask = split == name
            if mask.any():
                plans[name] = SplitPlan(**rows_of(name), rows=int(mask.sum()), filesystem=filesystem)
                kept[name] = (ids[mask], labels[mask])
                origin[name] = f"declared: rows with {split_column} == '{name}' in {location}"
    # the training pool, and what is carved from it by id bucket (test first, then val)
    base = dict(**(rows_of("train") if split_column else dict(files=files)), seed=seed, filesystem=filesystem)
    pool = split == "train" if split_column else np.ones(len(ids), bool)
    lo = 0
    bucket = _bucket(ids, seed)
    for name, fraction in (("test", d.test_fraction), ("val", d.val_fraction)):
        if name in plans:
            continue
        hi = lo + int(round(fraction * CARVE_BUCKETS))
        mask = pool & (bucket >= lo) & (bucket < hi)
        plans[name] = SplitPlan(**base, carve=(lo, hi), rows=int(mask.sum()))
        kept[name] = (ids[mask], labels[mask])
        origin[name] = f"carved from {location} by a hash of (data.seed={seed}, id) (data.{name}_fraction={fraction})"
        lo = hi
    mask = pool & (bucket >= lo) if lo else pool
    plans["train"] = SplitPlan(**base, carve=(lo, CARVE_BUCKETS) if lo else None, rows=int(mask.sum()))
    kept["train"] = (ids[mask], labels[mask])
    origin["train"] = f"{location}" + (" less the carved splits" if lo else "")
    if plans["train"].rows == 0:
        raise DataError(f"no training rows left in {location}; lower data.val_fraction / data.test_fraction")

    num_classes = max(int(labels[pool].max()) + 1, hint)
    for name in ("val", "test"):
        y = kept[name][1]
        if y.size and y.max() >= num_classes:
            raise DataError(f"the declared {name} split has label {int(y.max())} but the training data has classes "
                            f"0..{num_classes - 1}; fix the labels or the split files")
    on = {f: p.filesystem for p in plans.values() for f in p.files}  # (filesystems are not hashable)
    for file in sorted(on):
        if d.image_column is None:
            _check_row_length(file, d.feature_column, shape, on[file])
        else:
            _check_first_image(file, d.image_column, tuple(shape[1:]), on[file])
    from raydistill.data import _check_disjoint

    _check_disjoint({name: kept[name][0] for name in SPLIT_NAMES})
    if d.limit is not None:
        plans = {name: dataclasses.replace(p, rows=min(p.rows, d.limit), limit=d.limit) for name, p in plans.items()}
    digest = hashlib.sha256(f"stream-v1 {list(shape)} {num_classes} {sample_column}".encode()
                            + (b" encoded images" if d.image_column else b"")
                            + (b" 8-bit pixel lists" if pixel_lists else b""))
    for name in SPLIT_NAMES:
        p = plans[name]
        digest.update(f"{name} {p.split_column} {p.split_value} {p.carve} {p.seed} {p.rows}".encode())
        for f in p.files:
            digest.update(_file_digest(f, p.filesystem).encode())
    data = StreamData(name="parquet", shape=shape, num_classes=num_classes, train=plans["train"], val=plans["val"],
                      test=plans["test"], label_column=d.label_column, feature_column=d.feature_column,
                      id_column=d.id_column, fingerprint=digest.hexdigest(), origin=origin,
                      image_column=d.image_column, channel_stats=pixels)
    return dataclasses.replace(data, channel_stats=channel_stats(data)) if d.image_column or pixel_lists else data


STATS_ROWS = 2048  # training rows whose decoded pixels give the per-channel mean and std of streamed images


def channel_stats(data: StreamData) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the first ``STATS_ROWS`` training rows (in file order), decoded to [0, 1]
    (encoded images, or lists of 8-bit pixels: ``data.is_pixel_list``).

    The in-memory loader standardizes decoded images with the statistics of the whole training split; a streamed
    set is never held whole, and one pass decoding every image only for this would cost as much as an epoch.
    torchvision's recipes use fixed per-channel constants for the same reason (ImageNet's mean and std, measured
    once on a sample); here they are measured on the data's own first rows, the same for every run of it."""
    sums, squares, n = np.zeros(data.shape[0]), np.zeros(data.shape[0]), 0
    for x, _, _ in iter_split(data, "train", batch_size=min(256, STATS_ROWS), limit=STATS_ROWS):
        sums += x.sum(axis=(0, 2, 3), dtype=np.float64)
        squares += np.square(x, dtype=np.float64).sum(axis=(0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    mean = sums / max(n, 1)
    std = np.sqrt(np.maximum(squares / max(n, 1) - mean ** 2, 0.0))
    std[std == 0] = 1.0  # a constant channel stays constant instead of becoming NaN (as data._standardize)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _check_first_image(path: str, image_column: str, size: tuple[int, int], filesystem=None) -> None:
    """The first image of a file must decode: a column of something else fails here, before any training (a
    corrupt image further in fails where it is read, also as a DataError naming its row)."""
    first = next(_batches_of(path, [image_column], 1, filesystem), None)
    if first is not None and first.num_rows:
        _decode_images(first.column(0).to_pylist(), size, f"file {path}")


def _decode_images(items, size: tuple[int, int], where: str, ids=None, raw: bool = False) -> np.ndarray:
    """Encoded images (bytes, or {"bytes": ...} structs as Hugging Face datasets write them) -> (N, 3, H, W)
    float32 in [0, 1] (``data._decode_image``: PIL, RGB, bilinear resize to ``size``; ``raw``: uint8 pixels); an
    image that does not decode is named by its sample id (``ids``), else by its row in ``items``."""
    from raydistill.data import _decode_image

    if not len(items):
        return np.zeros((0, 3, *size), np.uint8 if raw else np.float32)
    return np.stack([_decode_image(item["bytes"] if isinstance(item, dict) else item, size,
                                   f"with id {ids[row]} in {where}" if ids is not None else f"in row {row} of {where}",
                                   raw=raw)
                     for row, item in enumerate(items)])


# The training stream's decoded images (``_decode_rows``): uint8 pixels (3 x H x W a row, as a fixed-size list),
# a quarter of float32's bytes through the object store; the reader turns them into floats.
PIXELS_COLUMN = "__raydistill_pixels"


def _decode_rows(batch, data: StreamData, plan: SplitPlan, where: str):
    """Ray Data ``map_batches`` step of a stream of encoded images (pyarrow in and out): keep the split's rows (as
    ``_filter_rows``) and decode their images to uint8 pixels in ``PIXELS_COLUMN``. Why here and not in the
    training process: these steps run in Ray Data's read tasks, on any CPU of the cluster, in parallel with each
    other and with training (Ray Data's documented pattern for image decoding, ``map_batches`` after
    ``read_*``); decoding in a Train worker would cap each GPU at what one thread decodes (a 500 x 375 JPEG takes
    ~2-3 ms with PIL)."""
    import pyarrow as pa

    if plan.split_column is not None or plan.carve is not None:
        batch = _filter_rows(batch, data, plan)
    ids = batch.column(data.id_column).to_numpy(zero_copy_only=False)
    pixels = _decode_images(batch.column(data.image_column).to_pylist(), tuple(data.shape[1:]), where, ids, raw=True)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1), pa.uint8()), math.prod(data.shape))
    return pa.table({data.id_column: batch.column(data.id_column), data.label_column: batch.column(data.label_column),
                     PIXELS_COLUMN: flat})


def to_arrays(data: StreamData, batch, where: str, writable: bool = True, pixels: bool = False
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch as read (a pyarrow Table or RecordBatch: the training stream, the cache builder's ``map_batches``
    and ``iter_split``) -> x (B, *shape) float32, y (B,) int64, ids (B,) int64; ``where`` names the rows in
    errors. The feature column is checked row by row by the in-memory loader's ``data._flat_features``.
    ``writable=False`` leaves arrays that are views of Ray Data's read-only blocks as they are (for a caller that
    copies them anyway). ``pixels=True``: 8-bit samples (encoded images, a pixel feature column) come back as
    their uint8 pixels, for a caller that standardizes what it takes of them (``standardize``): the training
    stream's shuffle buffer then holds and copies a quarter of the bytes."""
    from raydistill.data import _flat_features

    columns = {c: batch.column(c).to_numpy(zero_copy_only=False) for c in (data.label_column, data.id_column)}
    if data.image_column is not None:  # images: their uint8 pixels, decoded by Ray Data or here
        if PIXELS_COLUMN in batch.column_names:  # decoded by Ray Data (``_decode_rows``)
            column = batch.column(PIXELS_COLUMN)
            column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
            x = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), *data.shape)
        else:  # encoded, as read with pyarrow (evaluation, the statistics)
            x = _decode_images(batch.column(data.image_column).to_pylist(), tuple(data.shape[1:]), where,
                               columns[data.id_column], raw=True)
    else:  # float32, or uint8 for a pixel feature column (``plan_stream``)
        x = _flat_features(batch.column(data.feature_column), data.shape, data.feature_column, where, copy=writable)
    if x.dtype == np.uint8 and not pixels:
        x = standardize(data, x)
    arrays = x, np.asarray(columns[data.label_column], np.int64), np.asarray(columns[data.id_column], np.int64)
    # writable: Ray Data hands out read-only views of its blocks, which torch.from_numpy warns about (a copy only
    # when the batch is such a view)
    return tuple(np.require(a, requirements="W") for a in arrays) if writable else arrays


def standardize(data: StreamData, pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (B, *shape) -> the model's float32 input: per channel with ``data.channel_stats``
    (``data.standardize_pixels``), or only scaled to [0, 1] while ``plan_stream`` measures those statistics."""
    from raydistill.data import pixels_to_float, standardize_pixels

    if data.channel_stats is None:
        return pixels_to_float(pixels)
    return standardize_pixels(pixels, data.channel_stats)


class ShuffleBuffer:
    """A seeded local shuffle buffer over numpy rows: each batch is drawn uniformly at random from the rows it
    holds, and batches are given out only while it holds at least ``size`` rows (then, at the end, until it is
    empty). Rows go in by blocks (``add``) and come out as batches of ``batch_size`` (``batches``; every batch full
    but the last one of ``drain``). Holds at most ``size`` rows plus one block, whatever the data's size.

    Why not Ray Data's ``iter_batches(local_shuffle_buffer_size=...)``: its buffer concatenates Arrow blocks and
    ``take``s rows out of them, which for a list column of features costs more than decoding them. py-spy on a
    reading process (CIFAR-sized rows as ``raydistill data prepare`` writes them, batches of 256, buffer 4,096):
    the shuffle buffer's ``take``, its re-``take`` of carried rows and its ``combine_chunks`` were 45 % of the
    process's CPU; ``pyarrow.Table.take`` of 1,000 such rows costs 23 CPU-ms on a list column (7 on a fixed-size
    list), several times what copying them with numpy costs (docs/benchmarks.md, "Streaming: where a streamed
    epoch's CPU goes"). Here each row is copied twice: into a free slot of the buffer, and out in its batch; only
    the slot numbers move."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.columns = max(1, int(size)), None
        self.restart(seed)

    def restart(self, seed: int) -> None:
        """Empty, with a new seed (a new epoch); keeps its arrays, whose pages are then already mapped."""
        self.rng = np.random.default_rng(seed)
        self.live = np.zeros(0, np.int64)  # the slots holding rows not yet given out, in the order they came
        self.free = np.arange(0 if self.columns is None else len(self.columns[0]), dtype=np.int64)

    @property
    def n(self) -> int:
        return len(self.live)

    def add(self, *columns: np.ndarray) -> None:
        """Put a block of rows in: arrays of equal length (x, y, ids, ...)."""
        m = len(columns[0])
        if m == 0:  # a block whose rows the split's filter all dropped
            return
        if m > len(self.free):  # room for a full buffer and two blocks of this size (so it rarely grows again)
            had = 0 if self.columns is None else len(self.columns[0])
            grown = [np.empty((max(had + m, self.size + 2 * m), *c.shape[1:]), c.dtype) for c in columns]
            for new, old in zip(grown, self.columns or ()):
                new[:had] = old
            self.columns, self.free = grown, np.concatenate([self.free, np.arange(had, len(grown[0]))])
        self.free.sort()  # the lowest free slots first: the buffer touches only as many rows' pages as it holds
        slots, self.free = self.free[:m], self.free[m:]
        for buf, c in zip(self.columns, columns):
            buf[slots] = c
        self.live = np.concatenate([self.live, slots])

    def _take(self, k: int) -> tuple[np.ndarray, ...]:
        chosen = self.rng.choice(len(self.live), size=k, replace=False)
        slots = self.live[chosen]
        self.live, self.free = np.delete(self.live, chosen), np.concatenate([self.free, slots])
        return tuple(buf[slots] for buf in self.columns)

    def batches(self, batch_size: int):
        """Batches of ``batch_size`` while the buffer holds at least ``size`` rows (and a batch's worth)."""
        while self.n >= max(self.size, batch_size):
            yield self._take(batch_size)

    def drain(self, batch_size: int):
        """The rows left, in random batches: the input has ended."""
        while self.n:
            yield self._take(min(batch_size, self.n))


class LocalCopy:
    """One worker's rows of a streamed training split, written to a local file as its first epoch reads them from
    the stream, so that later epochs read them back from there (``batches``: a seeded full permutation of the rows,
    each batch read row by row with ``os.preadv``) instead of decoding Parquet through Ray Data again.

    Why: on a machine whose cores all train (2 Train workers on 2 cores), every streamed epoch paid the Parquet
    decode and Ray Data's per-block work on the training cores, ~0.7 CPU-s an epoch of CIFAR-sized rows against
    ~1.25 s of training (docs/benchmarks.md, "Streaming: where a streamed epoch's CPU goes"). tf.data's
    ``cache(filename)`` and FFCV's local files do the same; Ray Data has no per-worker equivalent
    (``Dataset.materialize`` keeps the blocks in the object store, that is, in memory).

    Memory: the rows go to the file with ``write`` and come back with ``preadv`` into each batch's own array, never
    through a memory map, so the file's pages are the kernel's page cache, not this process's resident memory; the
    labels and ids (16 bytes a row) stay in memory. The file is unlinked as soon as it is created: it disappears
    with its descriptor, when the worker closes it or dies in any way (SIGKILL too), and leaves nothing in the temp
    folder. A write that fails (disk full) drops the copy and the epochs go on streaming.

    The order a later epoch draws from is the rows sorted by id, so it depends on which rows the worker holds, not
    on the order its first epoch read them: a stage resumed at epoch k reads epoch k from the stream and copies it,
    and in local mode (one worker, every row) its epochs after k are then the batches of a run never interrupted.
    With several Train workers each keeps the rows Ray Data gave it in its first epoch (an equal share): later
    epochs shuffle within each worker's share, as a sharded loader does, not across workers."""

    def __init__(self, shape: tuple[int, ...], folder: str | None = None):
        import tempfile

        fd, path = tempfile.mkstemp(prefix="raydistill-rows-", dir=folder)
        os.unlink(path)
        self.fd, self.shape, self.dtype, self.rows = fd, tuple(shape), None, 0
        self._y: list[np.ndarray] = []
        self._ids: list[np.ndarray] = []
        self.y = self.ids = self.order = None  # set by ``finish``

    @property
    def done(self) -> bool:
        return self.order is not None

    def add(self, x: np.ndarray, y: np.ndarray, ids: np.ndarray) -> bool:
        """Append a block of rows; False (and the copy closed) when it cannot take them: a write failed, or the
        block's sample dtype is not the first block's."""
        if self.fd is None:
            return False
        if self.dtype is None:
            self.dtype = x.dtype
        if x.dtype != self.dtype:
            self.close()
            return False
        view = memoryview(np.ascontiguousarray(x)).cast("B")
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError:  # ENOSPC, EIO: a copy is an optimization, never a reason to fail the run
            self.close()
            return False
        # copies: a view would keep the Ray Data block it points into pinned in the object store for the whole
        # epoch (measured: every worker then had all of the 16x set's store pages mapped, 413 MB against 200-278)
        self._y.append(np.array(y, np.int64))
        self._ids.append(np.array(ids, np.int64))
        self.rows += len(x)
        return True

    def finish(self) -> bool:
        """The epoch read every row: later epochs may read them from here. False if the copy was dropped."""
        if self.fd is None or self.dtype is None:
            return False
        self.y, self.ids = np.concatenate(self._y), np.concatenate(self._ids)
        self._y = self._ids = []
        self.order = np.argsort(self.ids, kind="stable")  # file positions in id order
        return True

    def batches(self, batch_size: int, seed: int):
        """The rows in a permutation seeded by ``seed``, as (x, y, ids) batches of ``batch_size`` (the last one
        shorter); x is a fresh array of the stored dtype."""
        perm = self.order[np.random.default_rng(seed).permutation(self.rows)]
        row_bytes = self.dtype.itemsize * math.prod(self.shape)
        for i in range(0, self.rows, batch_size):
            chosen = perm[i:i + batch_size]
            x = np.empty((len(chosen), *self.shape), self.dtype)
            flat = x.reshape(len(chosen), -1).view(np.uint8)
            for j in np.argsort(chosen, kind="stable"):  # in file order: the reads move forward through the file
                got = os.preadv(self.fd, [flat[j]], int(chosen[j]) * row_bytes)
                if got != row_bytes:  # the file is ours and unlinked: a short read is a bug, not bad input
                    raise OSError(f"local copy: read {got} of {row_bytes} bytes of row {chosen[j]}")
            yield x, self.y[chosen], self.ids[chosen]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _read_columns(data: StreamData, plan: SplitPlan) -> list[str]:
    return [data.id_column, data.label_column, data.sample_column] + ([plan.split_column] if plan.split_column
                                                                      else [])


def iter_split(data: StreamData, split: str, batch_size: int = 1024, limit: int | None = None,
               pixels: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The rows of ``split`` in file order as (x, y, ids) numpy batches, read with pyarrow batch by batch
    (``pixels``: 8-bit samples as their uint8 pixels, ``to_arrays``)."""
    import pyarrow as pa

    plan = data.plan(split)
    columns = _read_columns(data, plan)
    left = min(x for x in (limit, plan.limit, plan.rows) if x is not None)
    for file in plan.files:
        for record in _batches_of(file, columns, batch_size, plan.filesystem):
            keep = _keep(plan, record, data)
            x, y, ids = to_arrays(data, record if keep.all() else record.filter(pa.array(keep)), file,
                                  pixels=pixels)
            x, y, ids = x[:left], y[:left], ids[:left]
            left -= len(y)
            if len(y):
                yield x, y, ids
            if left <= 0:
                return


def head(data: StreamData, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` rows of ``split`` (x, y): an example input, calibration samples."""
    parts = list(iter_split(data, split, batch_size=max(1, n), limit=n))
    if not parts:
        return np.zeros((0, *data.shape), np.float32), np.zeros(0, np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _filter_rows(batch, data: StreamData, plan: SplitPlan):
    """Ray Data ``map_batches`` step on a pyarrow Table: keep a split's rows (split column / id bucket) and the
    three columns training reads. Arrow, not numpy: a list feature column would become an array of per-row arrays
    and back (several times slower than the read itself)."""
    import pyarrow as pa

    keep = _keep(plan, batch, data)
    return batch.select([data.id_column, data.label_column, data.sample_column]).filter(pa.array(keep))


# Ray Data's blocks on the training stream: ~8 MB (~680 CIFAR-sized rows) instead of its default 128 MB, so a
# worker's first batch of an epoch waits for ~680 rows to be read, not for a whole file. Tried 2, 8 and 32 MB on the
# 1x set of benchmarks/data_scale.py: no difference in samples/s beyond run-to-run noise (the reader thread in
# worker.StreamedTrain hides most of that wait anyway); kept at 8 for the shorter wait.
STREAM_BLOCK_BYTES = 8 * 2**20


def ingest_options(buffer_mb: int):
    """Ray Data execution options of the training stream: a reproducible row order (``preserve_order``) and at
    most ``buffer_mb`` of object store memory read ahead (``data.stream_buffer_mb``). Ray Train applies these
    to the workers' shards through ``TorchTrainer(dataset_config=ray.train.DataConfig(execution_options=...))``:
    it would otherwise copy them from the driver's global DataContext, which raydistill leaves alone."""
    from ray.data import ExecutionOptions, ExecutionResources

    return ExecutionOptions(preserve_order=True,
                            resource_limits=ExecutionResources.for_limits(object_store_memory=buffer_mb * 2**20))


def train_dataset(data: StreamData, seed: int, shuffle_files: bool = True, buffer_mb: int = 256):
    """The train split as a Ray Data ``Dataset`` (lazy): file order reshuffled every epoch from ``seed``; Ray Data
    reads ahead into at most ``buffer_mb`` of object store memory (``data.stream_buffer_mb``), so what a process
    maps while it trains is bounded by that, not by the data's size (by default Ray Data may fill a share of the
    whole object store, several GB, before backpressure holds the reads). Its settings live in the dataset's own
    DataContext (``ds.context``, which Ray Data copies when a dataset is made), not in the process's global one."""
    import ray.data
    from ray.data import FileShuffleConfig

    plan = data.train
    shuffle = FileShuffleConfig(seed=seed, reseed_after_execution=True) if shuffle_files else None
    with parquet_datasource_v1(block_bytes=STREAM_BLOCK_BYTES):
        # One read task per file (``override_num_blocks``): by default Ray Data asks for >= 200 blocks, and with
        # fewer files it splits each file's output after the read (SplitBlocks), which stops the row filter below
        # from being fused into the read: every small block then became a task of its own (76 tasks for 2 files),
        # and an epoch of 4,363 rows took 1.6 s instead of 0.2 s (docs/benchmarks.md, "Streaming: Ray Data's
        # per-epoch cost").
        ds = ray.data.read_parquet(list(plan.files), filesystem=plan.filesystem, columns=_read_columns(data, plan),
                                   shuffle=shuffle, override_num_blocks=len(plan.files))
    ds.context.execution_options = ingest_options(buffer_mb)
    # a DataError a step raises (an image that does not decode, in _decode_rows or the cache builder's to_arrays)
    # reaches the reader as itself, not as Ray Data's UserCodeException("UDF failed to process a data block."),
    # whose pickled copy has lost the chain to it: so it is a one-line error, not a bug's traceback (Ray Data's
    # documented DataContext switch)
    ds.context.raise_original_map_exception = True
    if data.image_column is not None:  # decoded (and filtered) in the read tasks
        ds = ds.map_batches(_decode_rows, fn_args=(data, plan, "the streamed training rows"), batch_format="pyarrow",
                            zero_copy_batch=True)
    elif plan.split_column is not None or plan.carve is not None:
        ds = ds.map_batches(_filter_rows, fn_args=(data, plan), batch_format="pyarrow", zero_copy_batch=True)
    return ds.limit(plan.limit) if plan.limit is not None else ds


@contextlib.contextmanager
def parquet_datasource_v1(block_bytes: int | None = None):
    """Inside the block, ``ray.data.read_parquet`` makes a dataset on Ray Data's Parquet datasource V1 (and, given
    ``block_bytes``, with that target block size).

    Why V1: Ray 2.60's Parquet datasource V2 lists files through a pool of FooterReader actors that it creates
    and kills on every execution, i.e. every epoch; on a 2-core machine that start-up costs ~8 s per epoch
    whatever the data's size (digits, 1,797 rows in 6 files: 8 s per epoch on V2, 0.5 s on V1;
    docs/benchmarks.md, "Streaming: Ray Data's per-epoch cost"). V1 reads with plain tasks. Both settings are
    read when the dataset is made (the reader's batch size comes from the block size), so they are set on the
    global context for that call only."""
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = context.use_datasource_v2, context.target_max_block_size
    context.use_datasource_v2 = False
    if block_bytes is not None:
        context.target_max_block_size = block_bytes
    try:
        yield
    finally:
        context.use_datasource_v2, context.target_max_block_size = saved


ASIDE_VERSION = 1  # bump when what write_aside writes changes: older folders are then written anew


def needs_aside(plan: SplitPlan) -> bool:
    """Whether a split is a filtered subset of shared files (carved by id, or rows of a split column): reading it
    means decoding every row of those files."""
    return plan.rows > 0 and (plan.carve is not None or plan.split_column is not None)


def write_aside(data: StreamData, folder) -> tuple[StreamData, dict]:
    """``data`` with its filtered val and test splits (``needs_aside``) read once and written to their own Parquet
    files under ``folder/<fingerprint>``; returns it and what was done ({split: rows}, "reused" or "written").

    Why: validation runs after every epoch of every stage and the test split is scored once per model; a carved or
    split-column split is a filter over the training files, so each of those passes decoded the whole data set to
    keep 10-30 % of it (measured on a 25,000-row CIFAR-shaped set: 0.5-0.8 CPU-s per validation pass for 2,573
    rows). Written aside, one pass over the data per run pays for all of them, and a pass reads only its own rows.
    The rows, their order (file order, ``data.limit`` applied) and their arrays are those the filter gives; only the
    cut into evaluation batches differs, which can move float sums in the last bits (the likely cause of one test
    sample of 1,210 scored differently in benchmarks/data_scale.py's seed 0). Written batch by batch (no process
    holds a split) into a temporary folder that is renamed into place; a folder written before for the same data
    (same fingerprint) is reused. Declared split files are read where they are. Written here, not with Ray Data: one
    sequential pass on the driver, with the rows in file order, which Ray Data's write_parquet does not promise."""
    import json
    import os
    import shutil
    import uuid
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    todo = {name: data.plan(name) for name in ("val", "test") if needs_aside(data.plan(name))}
    if not todo:
        return data, {}
    final = Path(folder) / data.fingerprint[:20]
    record = final / "splits.json"
    expect = {"version": ASIDE_VERSION, "fingerprint": data.fingerprint, "rows": {n: p.rows for n, p in todo.items()}}

    def replaced() -> StreamData:
        return dataclasses.replace(data, **{name: SplitPlan((str(final / f"{name}.parquet"),), rows=plan.rows)
                                            for name, plan in todo.items()})

    if record.is_file():
        try:
            if json.loads(record.read_text()) == expect:
                return replaced(), {"splits": expect["rows"], "action": "reused"}
        except ValueError:
            pass
        shutil.rmtree(final, ignore_errors=True)  # another version or a damaged record: write it anew
    tmp = Path(folder) / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    columns = [data.id_column, data.label_column, data.sample_column]
    split_columns = sorted({p.split_column for p in todo.values() if p.split_column})
    writers: dict[str, pq.ParquetWriter] = {}
    left = {name: plan.rows for name, plan in todo.items()}
    # the filtered splits share the training files (and their filesystem)
    files = list(dict.fromkeys(f for plan in todo.values() for f in plan.files))
    filesystem = next(iter(todo.values())).filesystem
    try:
        for file in files:
            mine = [name for name, plan in todo.items() if file in plan.files and left[name] > 0]
            for batch in _batches_of(file, columns + split_columns, filesystem=filesystem) if mine else ():
                for name in [name for name in mine if left[name] > 0]:
                    keep = _keep(todo[name], batch, data)
                    if not keep.any():
                        continue
                    rows = batch.select(columns).filter(pa.array(keep)).slice(0, left[name])
                    if name not in writers:
                        writers[name] = pq.ParquetWriter(tmp / f"{name}.parquet", rows.schema)
                    writers[name].write(rows.cast(writers[name].schema))
                    left[name] -= rows.num_rows
        for name in list(writers):
            writers.pop(name).close()
        short = {name: n for name, n in left.items() if n}
        if short:  # the files changed between planning and now
            raise DataError(f"the {', '.join(short)} split has fewer rows than when the run started (the Parquet "
                            "files changed since); rerun on data that stays put")
        (tmp / "splits.json").write_text(json.dumps(expect))
        try:
            os.replace(tmp, final)
        except OSError:  # another command on the same data put it there first (a non-empty folder is not replaced)
            if not (record.is_file() and json.loads(record.read_text()) == expect):
                raise
    finally:
        for writer in writers.values():
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return replaced(), {"splits": expect["rows"], "action": "written"}


def _batches_of(file: str, columns: list[str], batch_size: int = 1024, filesystem=None):
    """The record batches of one Parquet file (a path on ``filesystem``, local if None), read one at a time; an
    unreadable file is a one-line DataError naming it. Read with ``ParquetFile.iter_batches`` on one thread without
    pre-buffering, not a ``pyarrow.dataset`` scanner: on 4,096-row files of CIFAR-sized rows (one 48 MB row group
    each) a scanner per file peaked at +370-550 MB of private memory (its read-ahead) and took 2.8 CPU-s for 25
    files; this way +150 MB, flat with the number of files, and 1.5 CPU-s (a throwaway script on data_scale.py's
    16x set, 2026-12-02)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with _fs(filesystem).open_input_file(file) as f:
            yield from pq.ParquetFile(f, pre_buffer=False).iter_batches(batch_size=batch_size, columns=columns,
                                                                        use_threads=False)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"cannot read parquet file {file} ({str(error).splitlines()[0][:200]}); "
                        "replace or remove the unreadable file") from None
