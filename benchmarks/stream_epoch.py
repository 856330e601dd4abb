"""What one streamed epoch costs before any training: Ray Data's fixed cost per execution, by Parquet datasource.

    python benchmarks/stream_epoch.py --epochs 4      # writes benchmarks/results/stream_epoch.json

raydistill's streamed training split is a ``ray.data.read_parquet`` Dataset that is executed once per epoch
(``iter_batches`` in the training loop; the file order is reshuffled every execution). This times that loop alone,
no model, on the bundled digits prepared as Parquet (1,797 rows in 8 files of at most 300 rows, `raydistill data
prepare digits`: each split in files of its own, 5 train, 1 val, 2 test), in one process on a local Ray (as Ray
Train's local mode runs it):

* ``pyarrow``: the same files read batch by batch with pyarrow in this process, the floor;
* ``ray_data_v2``: Ray 2.60's default Parquet datasource (V2, which lists files through a FooterReader actor pool
  created for every execution);
* ``ray_data_v1``: the V1 datasource (``DataContext.use_datasource_v2 = False``) with Ray Data's default
  number of read blocks;
* ``raydistill_stream``: ``stream.train_dataset`` itself, as a run reads its training split: V1, one read task per
  file, 8 MB blocks; it reads the training split only (the 5 train files, no row filter: they hold nothing else),
  so its rows differ from the others'.

The two plain Ray Data variants read with the same options as ``stream.train_dataset``: ``preserve_order``, a per-epoch
file shuffle (``FileShuffleConfig(seed, reseed_after_execution=True)``), batches of 64 as numpy. The first epoch
(worker start-up) is reported apart from the median of the later ones. Ratios are against pyarrow in the same run.
"""

from __future__ import annotations

import argparse
import atexit
import glob
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def epoch_pyarrow(files: list[str]) -> int:
    import pyarrow.dataset as ds

    n = 0
    for batch in ds.dataset(files, format="parquet").to_batches(batch_size=64):
        n += batch.num_rows
    return n


def time_epochs(fn, epochs: int) -> tuple[list[float], int]:
    times, rows = [], 0
    for _ in range(epochs):
        t = time.perf_counter()
        rows = fn()
        times.append(time.perf_counter() - t)
    return times, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stream_epoch.json"))
    args = ap.parse_args()

    import ray
    import ray.data
    from ray.data import FileShuffleConfig

    from raydistill.cluster import init_ray
    from raydistill.prepare import prepare

    folder = Path(tempfile.mkdtemp(prefix="stream_epoch_")) / "digits"
    atexit.register(shutil.rmtree, folder.parent, True)  # scratch data and runs, removed at exit
    prepare("digits", str(folder), rows_per_file=300)
    files = sorted(glob.glob(str(folder / "*.parquet")))
    init_ray(None, quiet=True)  # the private Ray a command starts; also turns off Ray Data progress bars
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True

    def ray_data(v2: bool):
        ctx.use_datasource_v2 = v2
        ds = ray.data.read_parquet(files, shuffle=FileShuffleConfig(seed=0, reseed_after_execution=True))

        def epoch() -> int:
            return sum(len(b["label"]) for b in ds.iter_batches(batch_size=64, batch_format="numpy"))
        return epoch

    def raydistill_stream():
        from raydistill import config
        from raydistill.stream import plan_stream, train_dataset

        data = plan_stream(config.load(None, {"data.source": "parquet", "data.path": str(folder)}).data)
        ds = train_dataset(data, seed=0)  # the training split, as a run reads it: 1,258 rows

        def epoch() -> int:
            return sum(len(b["label"]) for b in ds.iter_batches(batch_size=64, batch_format="numpy"))
        return epoch

    results = {}
    for name, fn in (("pyarrow", lambda: epoch_pyarrow(files)), ("ray_data_v2", ray_data(True)),
                     ("ray_data_v1", ray_data(False)), ("raydistill_stream", raydistill_stream())):
        times, rows = time_epochs(fn, args.epochs)
        results[name] = {"rows": rows, "first_epoch_s": times[0], "later_epoch_median_s": statistics.median(times[1:]),
                         "epochs_s": times}
    floor = results["pyarrow"]["later_epoch_median_s"]
    print(f"{'reader':<18} {'rows':>6} {'first epoch s':>14} {'later epochs s':>15} {'x pyarrow':>10}")
    for name, r in results.items():
        r["ratio_to_pyarrow"] = r["later_epoch_median_s"] / floor
        print(f"{name:<18} {r['rows']:>6} {r['first_epoch_s']:>14.2f} {r['later_epoch_median_s']:>15.3f} "
              f"{r['ratio_to_pyarrow']:>10.0f}")
    v2, v1 = results["ray_data_v2"]["later_epoch_median_s"], results["ray_data_v1"]["later_epoch_median_s"]
    print(f"V2 / V1 per epoch: {v2 / v1:.1f}x")
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "ray": ray.__version__,
           "load_average_at_end": os.getloadavg(), "epochs": args.epochs, "results": results, "v2_over_v1": v2 / v1}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
