"""Does a streamed reader's memory grow with the rows it has read, or level off? One process, no model.

    python benchmarks/stream_memory.py --rows 100000 --epochs 2   # writes benchmarks/results/stream_memory.json

The training split of benchmarks/data_scale.py's synthetic CIFAR-shaped set (``--rows`` written, 70 % of them the
training split) is read ``--epochs`` times through ``worker.StreamedTrain`` exactly as a Train worker in local mode
reads it (``stream.train_dataset``: per-epoch file shuffle, Ray Data's local shuffle buffer of 4,096 rows, the reader
thread running ahead), batches of 128, on a local Ray. Every 100 batches the process's RssAnon (private memory) and
RssShmem (the Ray object-store pages it has mapped) are read from /proc/self/status. Why: data_scale.py's worker
VmRSS grows from 1x to 16x the data (issue 13's goal is <= 1.3x), and this tells a leak (growth with every batch)
from a working set that levels off. Results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
BATCH = 128
SHUFFLE_BUFFER = 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000, help="rows written (70%% are the training split)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--local-copy-mb", type=int, default=0,
                    help="data.local_copy_mb: 0 streams every epoch (the default here, as measured before the copy)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stream_memory.json"))
    args = ap.parse_args()

    import ray
    from data_scale import _rss_mb, write_data
    from throughput import machine

    from raydistill import config
    from raydistill.cluster import init_ray
    from raydistill.stream import plan_stream, train_dataset
    from raydistill.worker import StreamedTrain

    def sample(epoch: int, batch: int, rows_read: int) -> dict:  # this process's memory now (data_scale's reader)
        rss = _rss_mb("self")
        return {"epoch": epoch, "batch": batch, "rows_read": rows_read, "private_mb": rss["RssAnon"],
                "object_store_mb": rss["RssShmem"]}

    work = Path(tempfile.mkdtemp(prefix="stream_memory_"))
    try:
        write_data(work / "data", args.rows)
        data = plan_stream(config.load(None, {"data.source": "parquet", "data.path": str(work / "data"),
                                              "data.shape": [3, 32, 32]}).data)
        init_ray(None, quiet=True)  # the private Ray a command starts; also turns off Ray Data progress bars
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-execution INFO lines
        reader = StreamedTrain(train_dataset(data, seed=0), data, world=1, shuffle_buffer=SHUFFLE_BUFFER,
                               local_copy_mb=args.local_copy_mb)
        reader.expect([(epoch, BATCH, 0) for epoch in range(args.epochs)])
        samples, rows_read, t0 = [], 0, time.perf_counter()
        for epoch in range(args.epochs):
            for i, (_, y, _) in enumerate(reader.batches(epoch, BATCH, 0)):
                rows_read += len(y)
                if i % 100 == 0:
                    samples.append(sample(epoch, i, rows_read))
            samples.append(sample(epoch, i + 1, rows_read))
        reader.close()
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nTraining split: {data.train.rows:,} rows (3x32x32 float32), {args.epochs} epochs, batches of {BATCH}, "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| epoch | batch | rows read | private (RssAnon) MB | object store (RssShmem) MB |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for s in samples:
        print(f"| {s['epoch']} | {s['batch']} | {s['rows_read']:,} | {s['private_mb']:.0f} | "
              f"{s['object_store_mb']:.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "args": vars(args), "train_rows": data.train.rows,
                               "samples": samples}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
