"""Where a streamed epoch's CPU goes on CIFAR-sized rows: Parquet decoding, and Ray Data's batching by batch size.

    python benchmarks/stream_batches.py --rows 25000 --epochs 5    # writes benchmarks/results/stream_batches.json

No model: one epoch is one pass over the training split of benchmarks/data_scale.py's synthetic set (3 x 32 x 32
float32 features as a fixed-size list column, 4,096 rows a file, val and test carved out by id), in one process on
a local Ray (as Ray Train's local mode reads it), each batch turned into training arrays (``stream.to_arrays``):

* ``pyarrow``: the split read with pyarrow in this process by ``stream.iter_split`` (the reader of validation and
  test: batches of 1,024 rows, the carve filter applied): the floor (every streamed epoch decodes at least this);
* ``ray_data bs N``: ``stream.train_dataset`` read as ``worker.StreamedTrain`` reads it: ``iter_batches`` of N rows,
  pyarrow format, a local shuffle buffer of 4,096 rows (``data.shuffle_buffer``'s default), per-epoch file shuffle;
* ``ray_data bs 1024, no shuffle``: the same without the local shuffle buffer;
* ``worker: blocks + ShuffleBuffer, batches of 64``: ``worker.StreamedTrain`` itself, as a Train worker reads its
  shard: whole Ray Data blocks (``iter_batches(batch_size=None)``) through its numpy ``stream.ShuffleBuffer``
  (4,096 rows) into training batches of 64, on its reader thread;
* ``worker before: local shuffle, reads cut to 64``: what ``StreamedTrain`` did before it (until 2026-12-02, 14th
  session): Ray Data's local shuffle buffer asked for about 1,024 rows at a time, at most 3 MiB (256 CIFAR-sized
  rows, 1,024 rows of 40 floats), each cut into batches of 64; both worker rows are also run on the "own files"
  copy below, which holds the same float32 values as ``raydistill data prepare`` writes them since 2026-12-03
  (each row's values as one fixed-size binary value, ``data.write_parquet``; before, a list column), against
  ``write_data``'s fixed-size list of floats (a user's own file); ``pyarrow, float32 bytes`` is that copy's floor;
* ``one reader, whole blocks`` and ``split between 2 readers``: whole blocks with no shuffle, read by this process,
  and the same dataset split by ``streaming_split(2, equal=True)`` (what ``ray.train.get_dataset_shard`` gives 2
  Train workers) into two Ray actors that read their halves at once: the cost of splitting the stream between
  consumers (the readers' own CPU is then in "other processes");
* ``pyarrow, 8-bit pixels`` and ``worker: blocks + ShuffleBuffer, 8-bit pixels``: the same samples quantized to 8
  bits (``data_scale.py --encoding pixels``) and stored as ``raydistill data prepare`` stores images: uint8 pixels
  in a fixed-size binary column (a row's bytes), standardized by the reader (``data.standardize_pixels``); a quarter
  of the bytes; ``..., 8-bit pixel lists``: the same pixels as a user's own Parquet may hold them, one list of
  uint8 a row with no raydistill metadata (read as 8-bit images, ``data.is_pixel_list``); ``..., PNG images``: the
  same pixels as PNG images in a column (``data_scale.py --encoding png``), decoded in Ray Data's read tasks every
  epoch (what ``raydistill data prepare parquet`` turns into pixel bytes once);
* ``split column, interleaved`` and ``split column, own files``: the same rows with a split column naming the same
  train / val / test rows, read as ``ray_data bs 1024``: in files holding all three splits (sorted by id, 4,096 rows
  a file: the layout ``raydistill data prepare`` wrote before 2026-12-02, and what data from elsewhere may have) and
  in files of one split each (what it writes now: the training stream then reads the train files only, with no row
  filter). Their CPU is also given against each other.

Each variant is timed by wall clock and by **machine CPU** (busy time of every core from /proc/stat, so the read
tasks in Ray's worker processes count too), split into the reading process's own CPU (``time.process_time``: what a
Train worker pays in its own process: Ray Data's iterator, the local shuffle, the arrays) and everything else (Ray's
read tasks, its scheduler and services): run it on an otherwise idle machine. Two untimed epochs go first (Ray's
worker processes start and import Ray Data and pyarrow on their first read tasks: ~5 machine CPU-s in each of the
first two epochs after Ray starts, which the first variant timed used to absorb), then the variants take turns, an
epoch each, so that the machine's drift falls on all of them alike. Each variant's first epoch is left out; the table
gives the median of the others and each variant's CPU as a ratio of pyarrow's in the same run. Why it matters: on 2
cores a streamed run's reading takes its CPU from training (issue 13's throughput goal, docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
SHUFFLE_BUFFER = 4096


def machine_busy_s() -> float:
    """CPU seconds all cores have been busy since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def time_epochs(variants: dict, epochs: int) -> dict:
    """Every variant ``epochs`` times, taking turns an epoch each; per variant its walls, machine and own CPU."""
    runs = {name: {"walls": [], "cpus": [], "reader_cpus": [], "rows": 0} for name in variants}
    for epoch in range(epochs):
        for name, fn in variants.items():
            r = runs[name]
            wall, cpu, mine = time.perf_counter(), machine_busy_s(), time.process_time()
            r["rows"] = fn(epoch)
            r["walls"].append(time.perf_counter() - wall)
            r["cpus"].append(machine_busy_s() - cpu)
            r["reader_cpus"].append(time.process_time() - mine)
        print(f"epoch {epoch}: " + ", ".join(f"{name} {r['cpus'][-1]:.2f}" for name, r in runs.items())
              + " machine CPU-s", flush=True)
    later = slice(1, None) if epochs > 1 else slice(None)
    for r in runs.values():
        r.update(first_epoch_wall_s=r["walls"][0], wall_s=statistics.median(r["walls"][later]),
                 machine_cpu_s=statistics.median(r["cpus"][later]),
                 reader_cpu_s=statistics.median(r["reader_cpus"][later]))
    return runs


def split_column_copies(work: Path, data) -> dict[str, Path]:
    """The set's rows written again with a ``split`` column naming the same train / val / test rows as ``data``'s
    carving (``data_scale.write_with_split_column``): sorted by id in files of 4,096 rows holding every split
    ("interleaved"), and grouped by split into files of their own ("own files", as ``raydistill data prepare``
    writes)."""
    from data_scale import write_with_split_column

    folders = {"interleaved": work / "interleaved", "own files": work / "own_files"}
    for layout, folder in folders.items():
        write_with_split_column(data, folder, grouped=layout == "own files")
    return folders


def pixel_lists(src: Path, dst: Path) -> None:
    """The 8-bit pixel files written again as a user's own Parquet may hold the same images: one list of uint8 a
    row (as ``pa.array(list(pixels), pa.list_(pa.uint8()))`` writes it), no raydistill metadata; the reader takes
    them as 8-bit images (``data.is_pixel_list``), with statistics of the first training rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    dst.mkdir()
    for file in sorted(src.glob("*.parquet")):
        table = pq.read_table(file)
        column = table.column("features").combine_chunks()
        n, width = len(column), column.type.byte_width
        values = np.frombuffer(column.buffers()[1], np.uint8, count=n * width, offset=column.offset * width)
        lists = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * width), pa.array(values))
        pq.write_table(pa.table({"id": table["id"], "label": table["label"], "features": lists}), dst / file.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=25_000, help="rows written (70%% are the training split)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--shape", type=int, nargs="+", default=[3, 32, 32], help="sample shape (data.shape)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stream_batches.json"))
    args = ap.parse_args()

    import ray
    from data_scale import SHAPE, data_settings, write_data
    from throughput import machine

    from raydistill import config
    from raydistill.cluster import init_ray
    from raydistill.stream import iter_split, plan_stream, to_arrays, train_dataset
    from raydistill.worker import StreamedTrain

    work = Path(tempfile.mkdtemp(prefix="stream_batches_"))
    atexit.register(shutil.rmtree, work, True)  # scratch data and runs, removed at exit
    write_data(work / "data", args.rows, shape=tuple(args.shape))
    data = plan_stream(config.load(None, {"data.source": "parquet", "data.path": str(work / "data"),
                                          "data.shape": args.shape}).data)
    plan = data.train
    init_ray(None, quiet=True)  # the private Ray a command starts; also turns off Ray Data progress bars
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-execution INFO lines

    def pyarrow_epoch(epoch: int) -> int:  # the reader validation and test use (batches of 1,024 rows)
        return sum(len(y) for _, y, _ in iter_split(data, "train"))

    dataset = train_dataset(data, seed=0)

    def ray_data(batch_size: int, shuffle: bool, source=None):
        source = source or data
        stream = dataset if source is data else train_dataset(source, seed=0)

        def epoch_fn(epoch: int) -> int:
            n = 0
            for batch in stream.iter_batches(batch_size=batch_size, batch_format="pyarrow",
                                             local_shuffle_buffer_size=SHUFFLE_BUFFER if shuffle else None,
                                             local_shuffle_seed=epoch if shuffle else None):
                n += len(to_arrays(source, batch, "rows")[1])
            return n
        return epoch_fn

    def worker(source, stream):  # worker.StreamedTrain: blocks through its numpy shuffle buffer, batches of 64
        reader = StreamedTrain(stream, source, world=1, shuffle_buffer=SHUFFLE_BUFFER)
        return lambda epoch: sum(len(y) for _, y, _ in reader.batches(epoch, 64, 0))

    def worker_before(source, stream):  # StreamedTrain until the 14th session: Ray Data's shuffle, whole batches
        # of about 1,024 rows, at most 3 MiB (its read_rows: 256 CIFAR-sized rows, 1,024 rows of 40 floats)
        reads = 64 * max(1, min(1024, SHUFFLE_BUFFER, 3 * 2**20 // (4 * math.prod(args.shape))) // 64)

        def epoch_fn(epoch: int) -> int:
            n = 0
            for batch in stream.iter_batches(batch_size=reads, batch_format="pyarrow",
                                             local_shuffle_buffer_size=SHUFFLE_BUFFER, local_shuffle_seed=epoch):
                for i in range(0, batch.num_rows, 64):
                    n += len(to_arrays(source, batch.slice(i, 64), "rows")[1])
            return n
        return epoch_fn

    def read_blocks(stream) -> int:  # one epoch of whole blocks, no shuffle, each turned into arrays
        return sum(len(to_arrays(data, block, "rows", writable=False)[1])
                   for block in stream.iter_batches(batch_size=None, batch_format="pyarrow"))

    @ray.remote(num_cpus=0)
    class SplitReader:  # one consumer of a streaming_split, as a Train worker is
        def __init__(self, shard):
            self.shard = shard

        def epoch(self) -> int:
            return read_blocks(self.shard)

    def one_reader(epoch: int) -> int:
        return read_blocks(dataset)

    def split_between(k: int):
        readers = [SplitReader.remote(shard) for shard in train_dataset(data, seed=0).streaming_split(k, equal=True)]
        return lambda epoch: sum(ray.get([r.epoch.remote() for r in readers]))

    variants = {"pyarrow": pyarrow_epoch}
    variants.update({f"ray_data bs {bs}": ray_data(bs, True) for bs in args.batch_sizes})
    variants["ray_data bs 1024, no shuffle"] = ray_data(1024, False)
    variants["worker: blocks + ShuffleBuffer, batches of 64"] = worker(data, dataset)
    variants["worker before: local shuffle, reads cut to 64"] = worker_before(data, dataset)
    variants["one reader, whole blocks"] = one_reader
    variants["split between 2 readers"] = split_between(2)
    for layout, folder in split_column_copies(work, data).items():
        other = plan_stream(config.load(None, {"data.source": "parquet", "data.path": str(folder),
                                               "data.shape": args.shape}).data)
        assert other.train.rows == plan.rows, (layout, other.train.rows, plan.rows)  # the same training rows
        variants[f"split column, {layout}"] = ray_data(1024, True, other)
        if layout == "own files":  # float32 bytes, as data prepare writes floats
            variants["pyarrow, float32 bytes"] = lambda epoch, other=other: sum(
                len(y) for _, y, _ in iter_split(other, "train"))
            own = train_dataset(other, seed=0)
            variants["own files, worker: blocks + ShuffleBuffer"] = worker(other, own)
            variants["own files, worker before"] = worker_before(other, own)
    if len(args.shape) == 3:  # the same 8-bit samples as uint8 pixels, as `raydistill data prepare` stores images
        write_data(work / "pixels", args.rows, shape=tuple(args.shape), encoding="pixels")
        pixels = plan_stream(config.load(None, {"data.source": "parquet", "data.path": str(work / "pixels"),
                                                "data.shape": args.shape}).data)
        assert pixels.train.rows == plan.rows and pixels.channel_stats is not None
        variants["pyarrow, 8-bit pixels"] = lambda epoch: sum(len(y) for _, y, _ in iter_split(pixels, "train"))
        variants["worker: blocks + ShuffleBuffer, 8-bit pixels"] = worker(pixels, train_dataset(pixels, seed=0))
        pixel_lists(work / "pixels", work / "pixel_lists")
        lists = plan_stream(config.load(None, {"data.source": "parquet", "data.path": str(work / "pixel_lists"),
                                               "data.shape": args.shape}).data)
        assert lists.train.rows == plan.rows and lists.channel_stats is not None  # read as 8-bit images
        variants["pyarrow, 8-bit pixel lists"] = lambda epoch: sum(len(y) for _, y, _ in iter_split(lists, "train"))
        variants["worker: blocks + ShuffleBuffer, 8-bit pixel lists"] = worker(lists, train_dataset(lists, seed=0))
        if tuple(args.shape) == SHAPE:  # the same 8-bit samples as PNG images, decoded by Ray Data every epoch
            write_data(work / "png", args.rows, encoding="png")
            png = plan_stream(config.load(None, {"data.source": "parquet", "data.path": str(work / "png"),
                                                 **data_settings("png")}).data)
            assert png.train.rows == plan.rows
            variants["worker: blocks + ShuffleBuffer, PNG images"] = worker(png, train_dataset(png, seed=0))
    for epoch in range(2):  # untimed: Ray's worker processes start and import on their first read tasks
        variants["ray_data bs 1024, no shuffle"](epoch)
    results = time_epochs(variants, args.epochs)
    ray.shutdown()

    floor = results["pyarrow"]["machine_cpu_s"]
    print(f"\nTraining split: {plan.rows:,} of {args.rows:,} rows ({'x'.join(map(str, args.shape))} float32), "
          f"{len(plan.files)} files; "
          f"median of epochs 2..{args.epochs}\n")
    print("| reader | rows | wall s | machine CPU-s | CPU x pyarrow | CPU ms per 1,000 rows | of which the reading "
          "process | of which other processes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        per_k = 1e6 / r["rows"]  # CPU-s per epoch -> CPU-ms per 1,000 rows
        print(f"| {name} | {r['rows']:,} | {r['wall_s']:.2f} | {r['machine_cpu_s']:.2f} | "
              f"{r['machine_cpu_s'] / floor:.2f} | {r['machine_cpu_s'] * per_k:.0f} | "
              f"{r['reader_cpu_s'] * per_k:.0f} | {(r['machine_cpu_s'] - r['reader_cpu_s']) * per_k:.0f} |")
    grouped, mixed = (results[f"split column, {k}"]["machine_cpu_s"] for k in ("own files", "interleaved"))
    print(f"\nsplit column: files of one split use {grouped / mixed:.2f}x the machine CPU of interleaved files")
    split, one = (results[k]["machine_cpu_s"] for k in ("split between 2 readers", "one reader, whole blocks"))
    print(f"split between 2 readers: {split / one:.2f}x the machine CPU of one reader")
    for label, now, before in (("fixed-size list", "worker: blocks + ShuffleBuffer, batches of 64",
                                "worker before: local shuffle, reads cut to 64"),
                               ("own files, float32 bytes", "own files, worker: blocks + ShuffleBuffer",
                                "own files, worker before")):
        a, b = results[now], results[before]
        print(f"worker's reading, {label}: machine CPU {a['machine_cpu_s'] / b['machine_cpu_s']:.2f}x before, "
              f"the reading process's own {a['reader_cpu_s'] / b['reader_cpu_s']:.2f}x")
    for kind, lists_row, bytes_row in (("pyarrow", "pyarrow", "pyarrow, float32 bytes"),
                                       ("worker", "worker: blocks + ShuffleBuffer, batches of 64",
                                        "own files, worker: blocks + ShuffleBuffer")):
        a, b = results[bytes_row], results[lists_row]
        print(f"{kind}, float32 bytes (data prepare's layout) against float32 lists: machine CPU "
              f"{a['machine_cpu_s'] / b['machine_cpu_s']:.2f}x, the reading process's own "
              f"{a['reader_cpu_s'] / b['reader_cpu_s']:.2f}x")
    if "pyarrow, 8-bit pixels" in results:
        for kind, float_row, pixel_row in (("pyarrow", "pyarrow", "pyarrow, 8-bit pixels"),
                                           ("worker", "worker: blocks + ShuffleBuffer, batches of 64",
                                            "worker: blocks + ShuffleBuffer, 8-bit pixels"),
                                           ("pyarrow", "pyarrow", "pyarrow, 8-bit pixel lists"),
                                           ("worker", "worker: blocks + ShuffleBuffer, batches of 64",
                                            "worker: blocks + ShuffleBuffer, 8-bit pixel lists"),
                                           ("worker", "worker: blocks + ShuffleBuffer, batches of 64",
                                            "worker: blocks + ShuffleBuffer, PNG images")):
            if pixel_row not in results:
                continue
            a, b = results[pixel_row], results[float_row]
            print(f"{kind}, {pixel_row.split(', ')[-1]} against float32 features: machine CPU "
                  f"{a['machine_cpu_s'] / b['machine_cpu_s']:.2f}x, "
                  f"the reading process's own {a['reader_cpu_s'] / b['reader_cpu_s']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "args": vars(args), "train_rows": plan.rows,
                               "results": results}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
