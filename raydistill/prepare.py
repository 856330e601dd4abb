"""``raydistill data prepare``: convert a data source to Parquet shards with stable ids.

    raydistill data prepare digits|cifar10|imagefolder|parquet [--root DIR] --out DIR_OR_URI
                            [--rows-per-file N] [--image-size N|HxW] [--seed S]
                            [--val-fraction F] [--test-fraction F]
                            [--image-column C | --feature-column C --shape N ...] [--label-column C]
                            [--id-column C] [--split-column C] [--stream]  (parquet: how its rows are read)

``parquet`` reads a Parquet set (file, folder, glob or URI at ``--root``) as a run with those ``data.*`` settings
reads it in memory (the whole set: it must fit in memory, as every other source here), and writes it again in this
layout: its encoded images (decoded once, not every epoch) and uint8 image lists as 8-bit pixels, float lists as
float32 bytes (below); its ids, and its split column when it has one. With ``--stream`` it is read as a streamed
run reads it, file by file in batches, and written a file at a time (``prepare_streamed``: for a set larger than
memory; rows keep their file order within each split).

Layout: OUT is one folder of ``part-NNNNN.parquet`` files holding every sample of the source,
grouped by split (the train files first, then val, then test; each file rows of one split, sorted
by id), with columns ``id`` (int64, the source's own
sample id), ``label`` (int64), ``features`` (each row's float32 values, or its 8-bit pixels, as one fixed-size binary
value: below) and ``split``
(train | val | test: the split the source gave with ``--seed``, ``--val-fraction``, ``--test-fraction``);
the shape, the class count and the name of the split column are in the Parquet schema metadata.
Point a run at it with

    --set data.source=parquet --set data.path=OUT

The loader keeps the written splits (the schema names the split column), so a run on OUT trains,
validates and tests on exactly the samples (and arrays) the source itself gives; CIFAR-10 keeps its
official test batch. The features are stored already standardized, with the statistics of that
train split only (flat parquet features are model-ready and not re-normalized on load), each row's float32
values (little-endian, C order) as one fixed-size binary value marked ``raydistill.tensor: float32`` in the
metadata (``data.write_parquet`` says why not a list of floats). 8-bit images
(CIFAR-10 at its own size, image folders, Parquet images: every value k / 255) are stored instead as their
uint8 pixels, each row's C x H x W bytes as one fixed-size binary value (a quarter of float32's size;
``data.write_parquet`` says why not a list), with those statistics in the metadata (``raydistill.pixels``); every reader
(``data.standardize_pixels``) gives back bit for bit the standardized floats.

OUT may be a local folder or any pyarrow filesystem URI (``s3://``, ``gs://``, ``hdfs://``,
``file://``); it must not exist or be empty. Shards are written locally first (atomically,
by ``raydistill.data.write_parquet``) and then copied to a URI. Every worker on every node can
read them through Ray Data with ``read_parquet_ray``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np

from raydistill.data import Arrays, Splits, image_hw, load_splits, to_pixels, write_parquet
from raydistill.errors import DataError
from raydistill.locks import folder_problem

PREPARE_SOURCES = ("digits", "cifar10", "imagefolder", "parquet")
DEFAULT_ROWS_PER_FILE = 4096


def _is_uri(path: str) -> bool:
    """True for ``scheme://...`` locations (handled by a pyarrow filesystem)."""
    return "://" in path


def _check_args(source: str, root, out, rows_per_file, image_size, val_fraction, test_fraction) -> None:
    """Raise a one-line DataError for any argument a user can get wrong."""
    if source not in PREPARE_SOURCES:
        raise DataError(f"unknown data source {source!r} for prepare; use one of: {', '.join(PREPARE_SOURCES)}")
    if source in ("cifar10", "imagefolder", "parquet") and not root:
        raise DataError(f"{source} needs --root DIR (the folder holding the data); pass --root")
    if not out:
        raise DataError("--out is empty; pass a new folder or a URI such as s3://bucket/prefix")
    if not isinstance(rows_per_file, int) or isinstance(rows_per_file, bool) or rows_per_file < 1:
        raise DataError(f"--rows-per-file must be a positive integer, got {rows_per_file!r}; pass e.g. 4096")
    if image_size is not None:
        try:
            image_hw(image_size)
        except DataError:
            raise DataError(f"--image-size must be N (N x N) or HxW, positive integers, got {image_size!r}; "
                            "pass e.g. 32 or 24x40") from None
    for name, value in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise DataError(f"{name} must be in (0, 1), got {value!r}; use the same value as the run's data config")


def pool_of(splits: Splits) -> tuple[Arrays, np.ndarray]:
    """All samples of ``splits`` in one ``Arrays``, grouped by split (train, val, test) and sorted by id within
    each, and each row's split name (N,).

    Grouped, not interleaved: ``write_parquet`` then gives each split files of its own, and a streamed run reads
    only a split's own files for it (an epoch over interleaved files decoded the val and test rows too, ~25 % of
    CIFAR-10, to drop them)."""
    parts = (splits.train, splits.val, splits.test)
    ids = np.concatenate([p.ids for p in parts])
    rank = np.concatenate([np.full(len(p), i) for i, p in enumerate(parts)])
    order = np.lexsort((ids, rank))
    x = np.concatenate([p.x for p in parts])[order]
    y = np.concatenate([p.y for p in parts])[order]
    names = np.concatenate([np.full(len(p), name, dtype=object) for name, p in zip(("train", "val", "test"), parts)])
    return Arrays(x, y, ids[order], splits.num_classes, splits.shape), names[order]


def _check_empty_local(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise DataError(f"output {out} already exists and is not an empty folder; pass a new --out or delete it")
    problem = folder_problem(Path(out))
    if problem:
        raise DataError(f"output {out}: {problem}; pass an --out folder this user can create and write")


def _remote_target(out: str):
    """(filesystem, path) of a URI that must not hold data yet; DataError otherwise."""
    import pyarrow.fs as pafs

    try:
        filesystem, base = pafs.FileSystem.from_uri(out)
    except Exception as error:  # pyarrow raises ArrowInvalid/OSError/... for bad or unsupported URIs
        raise DataError(f"cannot open output URI {out!r} ({error}); pass a local folder or a valid URI") from None
    info = filesystem.get_file_info(base)
    if info.type == pafs.FileType.File or (
        info.type == pafs.FileType.Directory
        and filesystem.get_file_info(pafs.FileSelector(base, recursive=False))
    ):
        raise DataError(f"output {out} already exists and is not empty; pass a new --out or delete it")
    return filesystem, base


def write_shards(pool: Arrays, out: str, rows_per_file: int, split: np.ndarray | None = None,
                 pixel_stats: tuple | None = None) -> list[str]:
    """Write ``pool`` as ``part-NNNNN.parquet`` shards under ``out`` (folder or URI); returns
    the files written (as URIs when ``out`` is one). ``pixel_stats``: ``pool.x`` is uint8 pixels
    (``data.write_parquet``)."""
    out = os.fspath(out)
    if not _is_uri(out):
        _check_empty_local(out)
        return write_parquet(pool, out, rows_per_file=rows_per_file, split=split, pixel_stats=pixel_stats)

    filesystem, base = _remote_target(out)
    staging = tempfile.mkdtemp(prefix="raydistill-prepare-")
    try:
        local = os.path.join(staging, "shards")
        files = write_parquet(pool, local, rows_per_file=rows_per_file, split=split, pixel_stats=pixel_stats)
        return _upload(local, out, filesystem, base, [os.path.basename(f) for f in files])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _upload(folder: str, out: str, filesystem, base: str, names: list[str]) -> list[str]:
    """Copy the shards ``names`` written in the local ``folder`` to the URI ``out`` (``filesystem`` and ``base``
    from ``_remote_target``); returns their URIs."""
    import pyarrow.fs as pafs

    filesystem.create_dir(base, recursive=True)
    pafs.copy_files(folder, base, destination_filesystem=filesystem)
    return [out.rstrip("/") + "/" + name for name in names]


def prepare(
    source: str,
    out: str,
    *,
    root: str | None = None,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    image_size: int | tuple[int, int] | list[int] | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    columns: dict | None = None,
    stream: bool = False,
) -> dict:
    """Convert ``source`` to Parquet shards under ``out``; returns a summary dict with the
    files, row count, shape, class count and split sizes (see the module docstring). ``columns``: for
    ``parquet``, ``data.load_splits``' reading options (``label_column``, ``feature_column``, ``image_column``,
    ``id_column``, ``shape``, ``split_column``). ``stream`` (parquet only): read and write batch by batch
    (``prepare_streamed``), for a set larger than memory."""
    source = str(source).strip().lower()
    _check_args(source, root, out, rows_per_file, image_size, val_fraction, test_fraction)
    if columns and source != "parquet":
        raise DataError(f"--{next(iter(columns)).replace('_', '-')} is for the parquet source; drop it for {source}")
    if stream and source != "parquet":
        raise DataError(f"--stream is for the parquet source; drop it for {source} (it is read in memory)")
    if not _is_uri(os.fspath(out)):
        _check_empty_local(os.fspath(out))  # fail before the (possibly slow) load
    if stream:
        return prepare_streamed(out, root=root, rows_per_file=rows_per_file, image_size=image_size, seed=seed,
                                val_fraction=val_fraction, test_fraction=test_fraction, columns=columns)
    if source == "parquet":  # a Parquet set as a run reads it (its declared split column, if any, is kept)
        splits = load_splits(source, path=root, image_size=image_size, seed=seed, val_fraction=val_fraction,
                             test_fraction=test_fraction, **(columns or {}))
    else:
        splits = load_splits(source, root=root, image_size=image_size, seed=seed,
                             val_fraction=val_fraction, test_fraction=test_fraction)
    pool, split = pool_of(splits)
    # 8-bit images (CIFAR-10 at its own size, image folders) are stored as their uint8 pixels when those give back
    # exactly the standardized floats: a quarter of float32's bytes on disk and through every streamed epoch
    stats = splits.channel_stats if len(splits.shape) == 3 else None
    pixels = to_pixels(pool.x, stats) if stats is not None else None
    if pixels is not None:
        pool = Arrays(pixels, pool.y, pool.ids, pool.num_classes, pool.shape)
    files = write_shards(pool, os.fspath(out), rows_per_file, split, stats if pixels is not None else None)
    return {
        "source": source,
        "out": os.fspath(out),
        "files": files,
        "rows": len(pool),
        "shape": list(splits.shape),
        "num_classes": splits.num_classes,
        "features": "8-bit pixels" if pixels is not None else "float32",
        "split": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test),
                  "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction},
    }


def read_parquet_ray(path: str, columns: list[str] | None = None):
    """A ``ray.data.Dataset`` over prepared shards (a folder, file, glob-free list or any
    pyarrow filesystem URI), with columns ``id``, ``label``, ``features`` (or ``columns``).
    ``features`` are the stored values as bytes: each row's float32 values (``numpy.frombuffer(row, "<f4")``)
    or, for 8-bit images, its uint8 pixels, which ``stream.to_arrays`` (or ``numpy.frombuffer`` and
    ``data.standardize_pixels`` with the metadata's statistics) turns into model inputs.

    On a multi-node cluster ``path`` must be readable from every node: shared storage
    (NFS) or an object store URI (``s3://``, ``gs://``)."""
    import ray.data

    from raydistill.stream import parquet_datasource_v1

    if not path:
        raise DataError("read_parquet_ray needs a path; pass the --out folder or URI of `raydistill data prepare`")
    try:
        with parquet_datasource_v1():  # plain read tasks, not a pool of actors started for every pass over it
            dataset = ray.data.read_parquet(os.fspath(path))
    except FileNotFoundError as error:
        raise DataError(f"no prepared shards at {path!r} ({error}); run `raydistill data prepare` first") from None
    return dataset.select_columns(columns) if columns else dataset


def prepare_streamed(out: str, *, root: str, rows_per_file: int = DEFAULT_ROWS_PER_FILE,
                     image_size=None, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2,
                     columns: dict | None = None) -> dict:
    """``prepare("parquet", ..., stream=True)``: the set at ``root`` read as a *streamed* run reads it
    (``stream.plan_stream``: its ids, labels and split column first, then the samples file by file in batches with
    pyarrow, ``stream.iter_split``) and written in the prepared layout ``rows_per_file`` rows at a time, so no
    process holds more than a file's rows (and every row's id and label) whatever the set's size. What differs from
    the in-memory ``prepare``, and why: within a split the rows keep the source's file order (sorting them by id
    would need them all at once); a set with no declared splits is carved as a streamed run carves it, row by row by
    a hash of (seed, id), so the split sizes are near the fractions, not exactly them (the in-memory carving is a
    stratified draw of exact sizes, which needs every label at once); 8-bit samples (encoded images, uint8 image
    lists) are written as their pixels with the per-channel statistics a streamed run of the source uses (its
    first 2,048 training rows, ``stream.channel_stats``), so a run on the output gives bit for bit the floats a
    streamed run on the source gives. Writes are atomic: the files go to a hidden folder beside ``out`` (or a
    local staging folder for a URI) and appear together."""
    from raydistill import config
    from raydistill.data import SPLIT_NAMES
    from raydistill.stream import iter_split, plan_stream

    settings = {"data.source": "parquet", "data.path": root, "data.seed": seed, "data.val_fraction": val_fraction,
                "data.test_fraction": test_fraction, "data.stream": True,
                **{f"data.{key}": value for key, value in (columns or {}).items()}}
    if image_size is not None:
        settings["data.image_size"] = list(image_size) if isinstance(image_size, (tuple, list)) else image_size
    data = plan_stream(config.load(None, settings).data)
    stats = data.channel_stats  # 8-bit samples: their statistics (None: floats, taken as they are)
    out = os.fspath(out)
    uri = _is_uri(out)
    if uri:
        filesystem, base = _remote_target(out)
        staging = tempfile.mkdtemp(prefix="raydistill-prepare-")
        folder = os.path.join(staging, "shards")
    else:
        parent, name = os.path.split(os.path.abspath(out))
        os.makedirs(parent, exist_ok=True)
        staging, folder = None, os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    os.makedirs(folder)
    names: list[str] = []
    counts = dict.fromkeys(SPLIT_NAMES, 0)

    def write_file(pending: list, rows: int, split: str) -> list:
        """The first ``rows`` of the batches ``pending`` as the next file; returns the rows left over."""
        x, y, ids = (np.concatenate(a) for a in zip(*pending))
        name = f"part-{len(names):05d}.parquet"
        write_parquet(Arrays(x[:rows], y[:rows], ids[:rows], data.num_classes, data.shape),
                      os.path.join(folder, name), split=np.full(rows, split, dtype=object), pixel_stats=stats)
        names.append(name)
        return [(x[rows:], y[rows:], ids[rows:])] if rows < len(y) else []

    try:
        for split in SPLIT_NAMES:  # grouped by split, train files first, as ``pool_of`` orders them
            pending, held = [], 0
            for batch in iter_split(data, split, batch_size=min(1024, rows_per_file), pixels=stats is not None):
                pending.append(batch)
                held += len(batch[1])
                counts[split] += len(batch[1])
                while held >= rows_per_file:
                    pending, held = write_file(pending, rows_per_file, split), held - rows_per_file
            if held:
                write_file(pending, held, split)
        if uri:
            files = _upload(folder, out, filesystem, base, names)
        else:
            _check_empty_local(out)  # nothing appeared there meanwhile
            os.replace(folder, out)  # POSIX: a folder may replace an empty folder (as write_parquet's)
            files = [os.path.join(os.path.abspath(out), name) for name in names]
    finally:
        shutil.rmtree(staging or folder, ignore_errors=True)
    return {
        "source": "parquet",
        "out": out,
        "files": files,
        "rows": sum(counts.values()),
        "shape": list(data.shape),
        "num_classes": data.num_classes,
        "features": "8-bit pixels" if stats is not None else "float32",
        "split": {**counts, "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction},
        "streamed": True,
    }


def _image_size_arg(text: str) -> int | tuple[int, int] | str:
    """``--image-size``: ``N`` or ``HxW``; anything else is passed on as given, for ``_check_args`` to name."""
    parts = text.lower().split("x")
    if all(p.strip().isdigit() for p in parts) and len(parts) in (1, 2):
        values = tuple(int(p) for p in parts)
        return values[0] if len(values) == 1 else values
    return text


def cmd_prepare(args: argparse.Namespace) -> int:
    """``raydistill data prepare``: run ``prepare`` and print one summary line."""
    columns = {key: getattr(args, key) for key in PARQUET_OPTIONS if getattr(args, key) is not None}
    summary = prepare(args.source, args.out, root=args.root, rows_per_file=args.rows_per_file,
                      image_size=args.image_size, seed=args.seed, val_fraction=args.val_fraction,
                      test_fraction=args.test_fraction, columns=columns, stream=args.stream)
    split = summary["split"]
    print(f"wrote {summary['rows']} rows of {summary['source']} (shape {summary['shape']} as "
          f"{summary['features']}, {summary['num_classes']} classes) in {len(summary['files'])} file(s) to "
          f"{summary['out']}; "
          f"use --set data.source=parquet --set data.path={summary['out']} "
          f"(its split column keeps the splits {split['train']}/{split['val']}/{split['test']} of --seed "
          f"{split['seed']})")
    return 0


# The parquet source's reading options, as a run's data.<key> settings (docs/config.md)
PARQUET_OPTIONS = {
    "image_column": "parquet: a column of encoded images (PNG/JPEG bytes, or Hugging Face's image struct)",
    "feature_column": "parquet: the feature column (default features): float lists, or uint8 lists of images",
    "shape": "parquet: a feature column's sample shape, e.g. --shape 3 32 32 (= data.shape)",
    "label_column": "parquet: the label column (default label)",
    "id_column": "parquet: the id column (default id; the row number without one)",
    "split_column": "parquet: a column whose values train / val / test declare the splits",
}


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``data prepare ...`` on the CLI's subparsers; returns the ``data`` parser."""
    data = subparsers.add_parser("data", help="data tools: convert a source to Parquet shards")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser(
        "prepare", help="convert digits / cifar10 / imagefolder / a Parquet set to Parquet shards with ids",
        description="Convert a data source to Parquet shards (columns id, label, features) that "
                    "data.source=parquet and Ray Data read; see raydistill/prepare.py for the layout.")
    prep.add_argument("source", help="digits | cifar10 | imagefolder | parquet")
    prep.add_argument("--root", help="cifar10: folder holding cifar-10-batches-py; imagefolder: DIR/<class>/<image>; "
                                     "parquet: its file, folder, glob or URI")
    prep.add_argument("--out", required=True, help="new folder or pyarrow URI (s3://, gs://, ...) for the shards")
    prep.add_argument("--rows-per-file", type=int, default=DEFAULT_ROWS_PER_FILE, metavar="N",
                      help=f"rows per Parquet file (default {DEFAULT_ROWS_PER_FILE})")
    prep.add_argument("--image-size", type=_image_size_arg, metavar="N|HxW",
                      help="resize images to N x N, or to H x W (e.g. 24x40) (default: native; 32 for imagefolder)")
    prep.add_argument("--seed", type=int, default=0,
                      help="split seed whose train split gives the normalization (= data.seed)")
    prep.add_argument("--val-fraction", type=float, default=0.1, help="= data.val_fraction (default 0.1)")
    prep.add_argument("--test-fraction", type=float, default=0.2, help="= data.test_fraction (default 0.2)")
    for key, help_text in PARQUET_OPTIONS.items():  # the parquet source: how its rows are read (= data.<key>)
        if key == "shape":
            prep.add_argument("--shape", type=int, nargs="+", metavar="N", help=help_text)
        else:
            prep.add_argument(f"--{key.replace('_', '-')}", metavar="COLUMN", help=help_text)
    prep.add_argument("--stream", action="store_true",
                      help="parquet: read and write batch by batch, for a set larger than memory (rows keep their "
                           "file order; 8-bit statistics of the first 2,048 training rows, as a streamed run's)")
    prep.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    prep.set_defaults(func=cmd_prepare)
    return data
