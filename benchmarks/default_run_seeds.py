"""The default run's accuracies over several seeds: which differences between two runs are noise.

    python benchmarks/default_run_seeds.py --seeds 0 1 2 3 4     # writes benchmarks/results/default_run_seeds.json

Each seed is the README's first command (`raydistill run`, local mode on a laptop) with `--set seed=S` in a fresh
run folder. `seed` sets model initialisation and data order; the data split (`data.seed`) stays the same, so every
run is scored on the same 359 test digits (one test sample = 0.28 points). Prints per model the accuracy of every
seed, the mean, the standard deviation and the min-max range, and the KD-minus-baseline difference per seed.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "default_run_seeds.json"))
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throughput import machine

    from raydistill.checkpoints import atomic_write_text

    work = Path(tempfile.mkdtemp(prefix="rd-seeds-"))
    atexit.register(shutil.rmtree, work, True)  # scratch data and runs, removed at exit
    load0 = os.getloadavg()
    runs = {}
    for seed in args.seeds:
        out = work / f"seed{seed}"
        t0 = time.perf_counter()
        res = subprocess.run([str(Path(sys.executable).parent / "raydistill"), "run", "--quiet", "--out", str(out),
                              "--set", f"seed={seed}"], capture_output=True, text=True, cwd=ROOT)
        if res.returncode != 0:
            sys.exit(f"seed {seed} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        report = json.loads((out / "report.json").read_text())
        runs[seed] = {"wall_s": time.perf_counter() - t0,
                      "accuracy": {name: m["accuracy"] for name, m in report["models"].items()}}
        print(f"seed {seed}: " + "  ".join(f"{n} {a:.4f}" for n, a in runs[seed]["accuracy"].items())
              + f"  ({runs[seed]['wall_s']:.0f} s)", flush=True)

    models = list(runs[args.seeds[0]]["accuracy"])
    summary = {}
    print(f"\n{'model':18s} {'mean':>7s} {'std':>7s} {'min':>7s} {'max':>7s}  per seed")
    for name in models:
        accs = [runs[s]["accuracy"][name] for s in args.seeds]
        summary[name] = {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                         "min": min(accs), "max": max(accs), "per_seed": accs}
        print(f"{name:18s} {summary[name]['mean']:7.4f} {summary[name]['std']:7.4f} {min(accs):7.4f} "
              f"{max(accs):7.4f}  {', '.join(f'{a:.4f}' for a in accs)}")
    gain = [runs[s]["accuracy"]["student_kd"] - runs[s]["accuracy"]["student_baseline"] for s in args.seeds]
    print(f"KD - baseline per seed (points): {', '.join(f'{100 * g:+.2f}' for g in gain)}; "
          f"mean {100 * statistics.mean(gain):+.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({
        "command": " ".join(["default_run_seeds.py"] + sys.argv[1:]), "machine": machine(),
        "load_average_at_start": load0, "runs": runs, "summary": summary,
        "kd_minus_baseline_points": [100 * g for g in gain]}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
