"""Does memory stay flat as the data grows? Streamed (Ray Data) against in-memory, same data, same run.

    python benchmarks/data_scale.py --base-rows 6250 --scales 1 4 16     # writes benchmarks/results/data_scale.json

A synthetic CIFAR-shaped set (3 x 32 x 32 float32 features, 10 classes, a learnable class signal plus noise) is
written as Parquet (4,096 rows a file) at each scale; at 1x the in-memory path (``data.stream: false``) runs too.
Each run is `raydistill run` in a fresh process with 2 Ray Train workers, the logit cache teacher (one teacher
pass, then the cache joined by sample id), a pre-trained teacher checkpoint (`teacher.checkpoint`), one epoch of
label-only and one of KD training, no pruning or int8. While it runs a sampler reads every 0.2 s the RSS of the
driver (the `raydistill` process) and of each Ray Train worker (`RayTrainWorker` processes) from /proc;
the table gives each one's peak, and the KD stage's samples/s (report.json's throughput, global, median epoch).

``--encoding png`` writes the same samples as 8-bit PNG images in a column ``png`` (``data.image_column``), which
the streamed path decodes where the rows are read (the workers, the cache builder) and the in-memory path decodes
once, on the driver, when it loads the set.

``--encoding pixels`` writes the same 8-bit samples as the PNG encoding, but as raw uint8 pixels (a fixed-size
binary column, a row's C x H x W bytes) with their per-channel statistics in the schema metadata
(``raydistill.pixels``): what ``raydistill data prepare`` writes for CIFAR-10 and image folders, a quarter of
float32's bytes; both paths standardize them as they read them.

``--layout prepared`` writes the same rows as ``raydistill data prepare`` lays a set out instead: a ``split`` column
naming the rows the carving would give (test 20 %, val 10 %, by the same hash of (seed 0, id)) and each split in
files of its own (train files first), so a streamed epoch reads the train files only, with no row filter, as it does
on CIFAR-10 or an image folder after `data prepare`, and with ``data.write_parquet``'s storage: float samples as
each row's float32 bytes (since 2026-12-03; before, a list of floats), pixels as pixel bytes. The default,
``carved``, has no split column and float samples as a fixed-size list of floats (a user's own file): val and test
are carved out of every file by id, and a streamed epoch reads every file and drops ~30 % of its rows.

Goals (issue 13): every process's peak RSS at 16x <= 1.3x its peak at 1x; streamed samples/s at 1x >= 0.8x the
in-memory path's. The accuracy columns compare the streamed shuffle (a per-epoch file order plus a local shuffle
buffer) with the in-memory path's full permutation on the same data and epochs.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (3, 32, 32)


def write_data(folder: Path, rows: int, seed: int = 0, rows_per_file: int = 4096,
               shape: tuple[int, ...] = SHAPE, encoding: str = "float") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    # one class signal per channel, the same at every scale (the teacher is trained once, on the 1x data); only
    # the noise and so the samples come from ``seed``
    means = np.random.default_rng(12345).standard_normal((10, shape[0], *[1] * (len(shape) - 1))).astype(np.float32)
    rng = np.random.default_rng(seed)
    for part, start in enumerate(range(0, rows, rows_per_file)):
        n = min(rows_per_file, rows - start)
        ids = np.arange(start, start + n)
        y = ids % 10
        x = (means[y] + 2.0 * rng.standard_normal((n, *shape)).astype(np.float32)).reshape(n, -1)
        if encoding == "png":  # the same samples as 8-bit PNG images (x * 32 + 128, clipped), in a column "png"
            pixels = np.clip(x.reshape(n, *shape) * 32 + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
            table = pa.table({"id": ids, "label": y, "png": [_png(p) for p in pixels]})
        elif encoding == "pixels":  # the same 8-bit samples as uint8 pixels, written as `data prepare` writes images
            from raydistill.data import Arrays, write_parquet

            pixels = np.clip(x * 32 + 128, 0, 255).astype(np.uint8).reshape(n, *shape)
            write_parquet(Arrays(pixels, y, ids, 10, shape), folder / f"part-{part:05d}.parquet",
                          pixel_stats=pixel_stats(shape))
            continue
        else:
            table = pa.table({"id": ids, "label": y, "features": pa.FixedSizeListArray.from_arrays(
                pa.array(x.reshape(-1)), x.shape[1])})
        pq.write_table(table, folder / f"part-{part:05d}.parquet")


def pixel_stats(shape: tuple[int, ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``pixels`` encoding's per-channel (mean, std) (float32) of the pixels / 255 of 4,096 rows drawn as
    ``write_data`` draws them, the same at every scale (``raydistill.pixels`` metadata)."""
    means = np.random.default_rng(12345).standard_normal((10, shape[0], *[1] * (len(shape) - 1))).astype(np.float32)
    rng = np.random.default_rng(54321)
    y = np.arange(4096) % 10
    x = means[y] + 2.0 * rng.standard_normal((4096, *shape)).astype(np.float32)
    pixels = np.clip(x * 32 + 128, 0, 255).astype(np.uint8).astype(np.float32) / 255.0
    axes = (0, *range(2, len(shape) + 1))
    return tuple(tuple(float(v) for v in getattr(pixels, f)(axis=axes, dtype=np.float64).astype(np.float32))
                 for f in ("mean", "std"))


def _png(hwc: np.ndarray) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(hwc).save(out, format="PNG")
    return out.getvalue()


def data_settings(encoding: str) -> dict:
    """How a run reads the set: a flat feature column of data.shape, or PNG images decoded at 32 x 32."""
    if encoding == "png":
        return {"data.image_column": "png", "data.image_size": list(SHAPE[1:])}
    return {"data.shape": list(SHAPE)}


def write_with_split_column(data, folder: Path, grouped: bool = True) -> None:
    """The rows of a carved set (``data``: its ``stream.StreamData``) written again to ``folder`` with a ``split``
    column naming the rows its carving gives to train, val and test, by ``data.write_parquet`` in files of at most
    4,096 rows: ``grouped``, each split in files of its own (train files first), as ``raydistill data prepare``
    lays a set out; otherwise sorted by id, every split in every file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydistill.data import Arrays, _flat_features, write_parquet
    from raydistill.stream import _bucket

    table = pa.concat_tables(pq.read_table(f) for f in data.train.files)
    ids = table["id"].to_numpy()
    bucket = _bucket(ids, data.train.seed)
    split = np.full(len(ids), "train", dtype=object)
    for name in ("val", "test"):
        lo, hi = data.plan(name).carve
        split[(bucket >= lo) & (bucket < hi)] = name
    order = (np.lexsort((ids, [("train", "val", "test").index(v) for v in split])) if grouped
             else np.argsort(ids, kind="stable"))
    x = _flat_features(table["features"], data.shape, "features", "the set")  # float32, or uint8 pixels
    stats = data.channel_stats if x.dtype == np.uint8 else None  # 8-bit pixels stay pixels, with their statistics
    write_parquet(Arrays(x[order], table["label"].to_numpy()[order], ids[order], data.num_classes, data.shape),
                  folder, rows_per_file=4096, split=split[order], pixel_stats=stats)


def write_prepared(folder: Path, rows: int, seed: int = 0, encoding: str = "float") -> None:
    """``write_data``'s rows laid out as ``raydistill data prepare`` writes a set: a split column naming the rows
    that carving would give (``stream.plan_stream`` with the default fractions and data.seed 0), each split in
    files of its own."""
    from raydistill import config
    from raydistill.stream import plan_stream

    carved = folder.with_name(folder.name + "-carved")
    write_data(carved, rows, seed=seed, encoding=encoding)
    write_with_split_column(plan_stream(config.load(None, {"data.source": "parquet", "data.path": str(carved),
                                                           "data.shape": list(SHAPE)}).data), folder)
    shutil.rmtree(carved)


def _rss_mb(pid: str) -> dict[str, float]:
    """VmRSS, RssAnon and RssShmem of a process in MB: all its resident pages; its private ones; the shared-memory
    pages it has touched, here the Ray object store's, which a process maps while it reads blocks (they stay in
    its VmRSS as long as the store is mapped, even after the block is freed). VmRSS less both is file-backed
    pages (the libraries: libtorch alone is several hundred MB)."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:", "RssShmem:")):
                found[line.split(":")[0]] = int(line.split()[1]) / 1024
    return found


class Sampler(threading.Thread):
    """Peak RSS (MB) of the driver process and of each Ray Train worker, polled from /proc (Linux): VmRSS in
    ``peaks``, RssAnon in ``private``, RssShmem in ``shmem``."""

    def __init__(self, driver_pid: int):
        super().__init__(daemon=True)
        self.driver_pid, self.stop, self.peaks, self.private, self.shmem = driver_pid, threading.Event(), {}, {}, {}

    def run(self):
        while not self.stop.is_set():
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                    if int(pid) == self.driver_pid:
                        key = "driver"
                    elif "RayTrainWorker" in cmd:
                        key = f"worker-{pid}"
                    else:
                        continue
                    rss = _rss_mb(pid)
                    for peaks, field in ((self.peaks, "VmRSS"), (self.private, "RssAnon"), (self.shmem, "RssShmem")):
                        peaks[key] = max(peaks.get(key, 0.0), rss.get(field, 0.0))
                except OSError:  # the process ended meanwhile
                    continue
            time.sleep(0.2)


def run_one(data: Path, out: Path, teacher: Path, stream: bool, epochs: int, seed: int = 0,
            extra: dict | None = None, encoding: str = "float") -> dict:
    sets = {"seed": seed, "data.source": "parquet", "data.path": str(data), **data_settings(encoding),
            "data.stream": stream,
            "teacher.model": "cnn", "teacher.kwargs": {"widths": [16, 32], "hidden": 64},
            "teacher.checkpoint": str(teacher), "student.model": "cnn",
            "student.kwargs": {"widths": [8, 16], "hidden": 32}, "distill.epochs": epochs, "prune.ratio": 0.0,
            "quantize.scheme": "none", "distill.teacher_mode": "cache", "scale.num_workers": 2,
            "distill.batch_size": 128, **(extra or {})}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "raydistill.cli", "run", "--quiet", "--out", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({data}, stream={stream}):\n{stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    workers = sorted(v for k, v in sampler.peaks.items() if k.startswith("worker-"))
    private = sorted(v for k, v in sampler.private.items() if k.startswith("worker-"))
    shmem = sorted(v for k, v in sampler.shmem.items() if k.startswith("worker-"))
    return {"rows": report["data"]["train"], "stream": stream, "seed": seed, "wall_s": time.perf_counter() - t0,
            "kd_stage_s": report["timings"]["student_kd"]["seconds"],
            "driver_peak_mb": sampler.peaks.get("driver"), "worker_peaks_mb": workers,
            "driver_private_peak_mb": sampler.private.get("driver"), "worker_private_peaks_mb": private,
            "worker_shmem_peaks_mb": shmem,
            "kd_samples_per_s": report["throughput"]["student_kd"],
            "kd_accuracy": report["models"]["student_kd"]["accuracy"],
            "baseline_accuracy": report["models"]["student_baseline"]["accuracy"]}


def train_teacher(data: Path, work: Path, encoding: str = "float") -> Path:
    """A teacher checkpoint trained once (in memory, local mode) on the 1x data."""
    sets = {"data.source": "parquet", "data.path": str(data), **data_settings(encoding), "data.stream": False,
            "teacher.model": "cnn", "teacher.kwargs": {"widths": [16, 32], "hidden": 64}, "teacher.epochs": 2,
            "distill.epochs": 1, "prune.ratio": 0.0, "quantize.scheme": "none", "scale.num_workers": 0}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    subprocess.run([sys.executable, "-m", "raydistill.cli", "run", "--quiet", "--out", str(work / "teacher_run"),
                    *args], check=True, capture_output=True)
    return work / "teacher_run" / "teacher.pt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-rows", type=int, default=6250)
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the first scale's streamed/in-memory pair this many times, seeds 0..R-1, alternating")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a further config override for every run (VALUE as JSON), e.g. data.stream_buffer_mb=64")
    ap.add_argument("--layout", choices=("carved", "prepared"), default="carved",
                    help="carved: no split column, val/test carved out of every file by id; prepared: a split "
                         "column, each split in files of its own, as `raydistill data prepare` writes")
    ap.add_argument("--encoding", choices=("float", "png", "pixels"), default="float",
                    help="float: a flat float32 feature column (data.shape); png: the same samples as 8-bit PNG "
                         "images (data.image_column), decoded where they are read; pixels: the same 8-bit "
                         "samples as uint8 pixels with their statistics, as `raydistill data prepare` stores images")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_scale.json"))
    args = ap.parse_args()
    if args.encoding == "png" and args.layout == "prepared":
        raise SystemExit("--encoding png writes the carved layout only")
    extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    work = Path(tempfile.mkdtemp(prefix="raydistill-data-scale-"))
    atexit.register(shutil.rmtree, work, True)  # scratch data and runs (1.3-1.6 GB at 16x), removed at exit
    rows = []
    teacher = None
    for scale in args.scales:
        data = work / f"data{scale}"
        if args.layout == "prepared":
            write_prepared(data, args.base_rows * scale, seed=scale, encoding=args.encoding)
        else:
            write_data(data, args.base_rows * scale, seed=scale, encoding=args.encoding)
        if teacher is None:
            teacher = train_teacher(data, work, args.encoding)
        runs = ([(s, stream) for s in range(args.repeats) for stream in (True, False)] if scale == args.scales[0]
                else [(0, True)])
        for seed, stream in runs:
            row = {"scale": scale, **run_one(data, work / f"run{scale}-{stream}-{seed}", teacher, stream,
                                             args.epochs, seed, extra, args.encoding)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    first = [r for r in rows if r["scale"] == args.scales[0]]
    base = {stream: [r for r in first if r["stream"] == stream] for stream in (True, False)}
    print("\n| scale | rows | path | seed | driver peak MB (private) | worker peaks MB | worker private peaks MB | "
          "worker shmem peaks MB | KD samples/s | KD stage s | KD acc | baseline acc |")
    print("| ---: | ---: | --- | ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['scale']}x | {r['rows']:,} | {'streamed' if r['stream'] else 'in memory'} | {r['seed']} | "
              f"{r['driver_peak_mb']:.0f} ({r['driver_private_peak_mb']:.0f}) | "
              f"{', '.join(f'{w:.0f}' for w in r['worker_peaks_mb'])} | "
              f"{', '.join(f'{w:.0f}' for w in r['worker_private_peaks_mb'])} | "
              f"{', '.join(f'{w:.0f}' for w in r['worker_shmem_peaks_mb'])} | "
              f"{r['kd_samples_per_s']:.0f} | {r['kd_stage_s']:.1f} | {r['kd_accuracy']:.4f} | "
              f"{r['baseline_accuracy']:.4f} |")
    top = [r for r in rows if r["stream"] and r["scale"] == args.scales[-1]][0]
    pairs = list(zip(base[True], base[False]))  # same seed, run one after the other

    def median(values):
        return float(np.median(values))

    ratios = {"driver_peak_top_vs_base": top["driver_peak_mb"] / base[True][0]["driver_peak_mb"],
              "worker_peak_top_vs_base": max(top["worker_peaks_mb"]) / max(base[True][0]["worker_peaks_mb"]),
              "driver_private_peak_top_vs_base": (top["driver_private_peak_mb"]
                                                  / base[True][0]["driver_private_peak_mb"]),
              "worker_private_peak_top_vs_base": (max(top["worker_private_peaks_mb"])
                                                  / max(base[True][0]["worker_private_peaks_mb"])),
              "worker_shmem_peak_top_minus_base_mb": (max(top["worker_shmem_peaks_mb"])
                                                      - max(base[True][0]["worker_shmem_peaks_mb"])),
              "streamed_vs_in_memory_samples_per_s": median([s["kd_samples_per_s"] / m["kd_samples_per_s"]
                                                             for s, m in pairs]),
              "streamed_vs_in_memory_kd_stage_time": median([s["kd_stage_s"] / m["kd_stage_s"] for s, m in pairs]),
              "streamed_minus_in_memory_kd_accuracy": median([s["kd_accuracy"] - m["kd_accuracy"] for s, m in pairs]),
              "streamed_minus_in_memory_baseline_accuracy": median([s["baseline_accuracy"] - m["baseline_accuracy"]
                                                                    for s, m in pairs])}
    print("\n" + "\n".join(f"{k}: {v:.3f}" for k, v in ratios.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "ratios": ratios, "args": vars(args),
                                          "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
