"""Wall time of an N-trial `raydistill tune` sweep: one shared logit cache vs each trial running its own teacher,
and trials that reuse a finished trial's process vs a fresh process per trial.

    python benchmarks/sweep.py                          # 8 trials, cache vs inprocess, reuse on and off, 2 repeats
    python benchmarks/sweep.py --trials 12 --modes cache live inprocess --reuse on --repeats 1

The sweep is jobs/sweep.yaml (digits; distill 20 + prune 8 + fine-tune 10 epochs per trial, 2 trials
at a time) with ``--trials`` trials and no early stopping (``tune.scheduler=none``), so every
variant does the same student work and the same trials (same seed, same sampled points). Variants:

  cache      the default: one teacher pass builds the Parquet logit cache, every trial reads it
  live       every trial asks the one shared TeacherServer actor
  inprocess  every trial loads its own teacher copy and computes its own logits (no sharing)

and, with ``--reuse both`` (the default), each of them with ``tune.reuse_actors`` on (the default: a trial that
ends hands its process to the next) and off (every trial starts its own process: Tune's default).

The teacher is trained once up front and given to every sweep as ``teacher.checkpoint``, so no
variant pays for training it; each sweep runs in a fresh folder, so ``cache`` pays for building its
cache every time. Reported per variant: the sweep's total wall time (``run_sweep`` from start to
results, including the cache build), the trials' part alone, and the teacher forward samples. The
ratios are to ``inprocess`` with the same reuse setting, and to the same mode with fresh processes;
medians over the repeats; variants are interleaved per repeat so machine noise hits them alike. Writes a table to
stdout and JSON to benchmarks/results/sweep.json.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    from raydistill.job import TEACHER_MODES

    ap.add_argument("--modes", nargs="+", default=["cache", "inprocess"], choices=TEACHER_MODES)
    ap.add_argument("--reuse", choices=["on", "off", "both"], default="both",
                    help="tune.reuse_actors: on, off, or both as separate variants")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sweep.json"))
    args = ap.parse_args()

    from throughput import machine  # the same machine description as every benchmark here

    from raydistill import config
    from raydistill.checkpoints import atomic_write_text
    from raydistill.cluster import init_ray
    from raydistill.pipeline import open_run, prepare_teacher
    from raydistill.sweep import run_sweep

    load0 = os.getloadavg()
    overrides = {"tune.num_trials": args.trials, "tune.scheduler": "none",
                 **dict(config.parse_override(s) for s in args.set)}
    job = ROOT / "jobs" / "sweep.yaml"
    work = Path(tempfile.mkdtemp(prefix="rd-sweep-bench-"))
    atexit.register(shutil.rmtree, work, True)  # scratch data and runs, removed at exit
    init_ray(None, quiet=True)

    t0 = time.perf_counter()
    cfg0 = config.load(job, overrides)
    teacher = prepare_teacher(open_run(cfg0, work / "teacher", None, True, uses_cache=False))
    print(f"teacher trained once in {time.perf_counter() - t0:.0f} s: {teacher.path}", flush=True)

    runs: dict[str, list[dict]] = {}
    reuses = {"on": [True], "off": [False], "both": [True, False]}[args.reuse]
    variants = [(mode, reuse) for mode in args.modes for reuse in reuses]
    for rep in range(args.repeats):
        for mode, reuse in variants:
            cfg = config.load(job, {**overrides, "tune.teacher_mode": mode, "tune.reuse_actors": reuse,
                                    "teacher.checkpoint": str(teacher.path)})
            folder = work / f"{mode}-{'reuse' if reuse else 'fresh'}-r{rep}"
            t0 = time.perf_counter()
            report = run_sweep(cfg, folder, quiet=True)
            total = time.perf_counter() - t0
            accs = sorted(r["accuracy"] for r in json.loads((folder / "sweep_report.json").read_text())["pareto_macs"])
            runs.setdefault((mode, reuse), []).append({
                "total_s": total, "trials_s": report["timings"]["sweep_s"], "completed": report["completed"],
                "trial_processes": trial_processes(folder),
                "teacher_forward_samples": report["teacher_forward_samples"],
                "teacher_passes_over_data": report["teacher_passes_over_data"],
                "best_accuracy": report["best"]["accuracy"] if report["best"] else None,
                "pareto_accuracies": accs})
            r = runs[(mode, reuse)][-1]
            print(f"repeat {rep + 1}: {mode:9s} reuse_actors={reuse!s:5s} total {total:6.1f} s, trials "
                  f"{r['trials_s']:6.1f} s in {r['trial_processes']} processes, {r['completed']}/{args.trials} "
                  f"completed, teacher passes {r['teacher_passes_over_data']}, best {r['best_accuracy']}", flush=True)

    def median(key, variant):
        return statistics.median(r[key] for r in runs[variant]) if variant in runs else None

    rows = []
    for (mode, reuse), rs in runs.items():
        total, to_inprocess, to_fresh = median("total_s", (mode, reuse)), median("total_s", ("inprocess", reuse)), \
            median("total_s", (mode, False))
        rows.append({"mode": mode, "reuse_actors": reuse, "total_s": total,
                     "trials_s": median("trials_s", (mode, reuse)),
                     "trial_processes": median("trial_processes", (mode, reuse)),
                     "teacher_passes_over_data": rs[0]["teacher_passes_over_data"],
                     "ratio_to_inprocess": total / to_inprocess if to_inprocess else None,
                     "ratio_to_fresh_processes": total / to_fresh if to_fresh else None, "runs": rs})
    print(f"\n{args.trials}-trial sweep, median of {args.repeats}")
    print("| teacher | trial processes | sweep wall time (s) | trials only (s) | teacher passes over the data "
          "| vs per-trial teacher | vs a fresh process per trial |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        ratios = [f"{r[k]:.2f}" if r[k] else "-" for k in ("ratio_to_inprocess", "ratio_to_fresh_processes")]
        print(f"| {r['mode']} | {'reused' if r['reuse_actors'] else 'one per trial'} ({r['trial_processes']:g}) | "
              f"{r['total_s']:.1f} | {r['trials_s']:.1f} | {r['teacher_passes_over_data']:.1f} | {ratios[0]} | "
              f"{ratios[1]} |")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({
        "command": " ".join(["sweep.py"] + sys.argv[1:]), "load_average_at_start": load0,
        "machine": machine(),
        "trials": args.trials, "repeats": args.repeats, "overrides": overrides, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


def trial_processes(folder: Path) -> int:
    """How many processes the sweep's trials ran in: the distinct pids in Tune's per-trial result.json files."""
    return len({json.loads(line)["pid"] for path in (folder / "tune").glob("sweep-*/trial_*/result.json")
                for line in path.read_text().splitlines() if line.strip()})


if __name__ == "__main__":
    main()
