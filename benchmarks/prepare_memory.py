"""Does `raydistill data prepare parquet --stream` hold memory flat as the set grows? Against the in-memory prepare.

    python benchmarks/prepare_memory.py --base-rows 12500 --scales 1 4   # writes benchmarks/results/prepare_memory.json

A synthetic CIFAR-shaped set (``data_scale.write_data``: 3 x 32 x 32 float32 as a fixed-size list a row, a user's
own file, 4,096 rows a file; or ``--encoding pixels``: the same samples as one list of uint8 a row, read as 8-bit
images) at each scale is prepared by `raydistill data prepare parquet` in a fresh process, streamed (``--stream``)
and in memory, while a sampler reads that process's VmRSS and RssAnon (private) from /proc every 0.1 s. The table
gives each run's peak, wall time and rows/s. Goal (issue 13: "no process holds the whole set"): the streamed peak at
the largest scale within 1.3x its peak at the smallest, where the in-memory peak grows with the set.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def prepare_once(data: Path, out: Path, stream: bool, rows_per_file: int, settings: list[str]) -> dict:
    cmd = [sys.executable, "-m", "raydistill.cli", "data", "prepare", "parquet", "--root", str(data), "--out",
           str(out), "--rows-per-file", str(rows_per_file), *settings, *(["--stream"] if stream else [])]
    from data_scale import _rss_mb

    peaks = {"VmRSS": 0.0, "RssAnon": 0.0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                rss = _rss_mb(str(proc.pid))
                for key in peaks:
                    peaks[key] = max(peaks[key], rss.get(key, 0.0))
            except OSError:  # ended
                return
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    return {"stream": stream, "wall_s": wall, "peak_mb": peaks["VmRSS"], "private_peak_mb": peaks["RssAnon"],
            "line": stdout.strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-rows", type=int, default=12_500)
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rows-per-file", type=int, default=4096)
    ap.add_argument("--encoding", choices=("float", "pixels"), default="float")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prepare_memory.json"))
    args = ap.parse_args()

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from data_scale import SHAPE, write_data
    from throughput import machine

    work = Path(tempfile.mkdtemp(prefix="prepare_memory_"))
    results = []
    try:
        for scale in args.scales:
            rows = args.base_rows * scale
            data = work / f"data_{scale}x"
            write_data(data, rows, seed=scale)
            if args.encoding == "pixels":  # the same samples as one list of uint8 a row (x * 32 + 128, clipped)
                for file in sorted(data.glob("*.parquet")):
                    table = pq.read_table(file)
                    x = table["features"].combine_chunks().flatten().to_numpy()
                    pixels = np.clip(x * 32 + 128, 0, 255).astype(np.uint8).reshape(table.num_rows, -1)
                    pq.write_table(table.set_column(2, "features", pa.array(list(pixels), pa.list_(pa.uint8()))),
                                   file)
            settings = ["--shape", *map(str, SHAPE)]
            for stream in (True, False):
                out = work / f"out_{scale}x_{'stream' if stream else 'memory'}"
                r = prepare_once(data, out, stream, args.rows_per_file, settings)
                r.update(scale=scale, rows=rows, rows_per_s=rows / r["wall_s"])
                results.append(r)
                print(json.dumps(r), flush=True)
                shutil.rmtree(out)
            shutil.rmtree(data)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.encoding} samples, {args.rows_per_file:,} rows a file\n")
    print("| scale | rows | prepare | peak MB (private) | wall s | rows/s |")
    print("| ---: | ---: | --- | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['scale']}x | {r['rows']:,} | {'--stream' if r['stream'] else 'in memory'} | "
              f"{r['peak_mb']:,.0f} ({r['private_peak_mb']:,.0f}) | {r['wall_s']:.1f} | {r['rows_per_s']:,.0f} |")
    ratios = {}
    for stream in (True, False):
        runs = [r for r in results if r["stream"] == stream]
        base, top = runs[0], runs[-1]
        name = "stream" if stream else "in_memory"
        ratios[f"{name}_peak_top_vs_base"] = top["peak_mb"] / base["peak_mb"]
        ratios[f"{name}_private_peak_top_vs_base"] = top["private_peak_mb"] / base["private_peak_mb"]
    top = [r for r in results if r["scale"] == args.scales[-1]]
    ratios["stream_vs_in_memory_peak_at_top"] = top[0]["peak_mb"] / top[1]["peak_mb"]
    ratios["stream_vs_in_memory_rows_per_s_at_top"] = top[0]["rows_per_s"] / top[1]["rows_per_s"]
    print()
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "args": vars(args), "results": results, "ratios": ratios},
                              indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
