"""Student training throughput on Ray Train: data-parallel scaling and the cost of each teacher mode.

    python benchmarks/throughput.py                       # all variants at 2 workers, student-only at 1 and 2
    python benchmarks/throughput.py --workers 1 2 --modes none --repeats 3    # scaling only

Variants, all in one run on the same data and student (the default digits student, 91,776 MACs;
teacher 1,350,144 MACs, 14.7x the student):
  none       student only, labels only: the physical limit (no teacher cost at all)
  inprocess  a teacher copy inside every worker
  live       the shared TeacherServer actor, scale.teacher_prefetch requests kept in flight
  cache      teacher logits read from the Parquet logit cache (built once, timed separately)
  cache_k5   the same from a top-5 cache

Digits' 1,258 training samples make an epoch last ~0.1 s, too short to time on a shared machine, so
``--tile`` repeats the training set (each copy with its own sample ids, so the cache has one row
per copy) to make every epoch last seconds; the work per sample is unchanged.

Each variant is one Ray Train run of ``--epochs`` epochs; its throughput is the median over epochs
after the first (warm-up) of global samples/s, and the reported figure is the median over
``--repeats`` runs. Variants are interleaved per repeat so machine noise hits them alike; ratios
are to ``none`` with the same worker count, measured in the same run. Writes a table to stdout and
JSON to benchmarks/results/throughput.json. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> dict:
    import ray
    import torch

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_id": cpu_id(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def cpu_id() -> str:
    """Family/model/stepping/microcode of the CPU: hosts that all call themselves "AMD EPYC" differ here, and the
    default run's accuracies were seen to differ by a test sample between two such hosts (docs/benchmarks.md)."""
    fields = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("cpu family", "model", "stepping", "microcode") and key not in fields:
                fields[key] = value.strip()
    except OSError:
        return "unknown"
    return " ".join(f"{k}={v}" for k, v in fields.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--modes", nargs="+", default=["none", "inprocess", "live", "cache", "cache_k5"])
    ap.add_argument("--scale-modes", nargs="+", default=["none"],
                    help="modes measured at every worker count; the others only at the largest")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--tile", type=int, default=16, help="repeat the training set this many times (longer epochs)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "throughput.json"))
    args = ap.parse_args()

    import ray
    import torch

    load0 = os.getloadavg()
    from raydistill import config
    from raydistill import job as jobs
    from raydistill.cache import build_cache
    from raydistill.checkpoints import atomic_write_text, build_from_spec, model_spec
    from raydistill.cluster import init_ray
    from raydistill.core.metrics import count_macs
    from raydistill.data import fingerprint
    from raydistill.pipeline import load_data
    from raydistill.teacher import start_teacher_server
    from raydistill.trainer import fit

    cfg0 = config.load()
    splits = load_data(cfg0)
    if args.tile > 1:
        import dataclasses

        import numpy as np

        from raydistill.data import Arrays

        tr = splits.train
        span = int(tr.ids.max()) + 1
        splits = dataclasses.replace(splits, train=Arrays(
            np.concatenate([tr.x] * args.tile), np.concatenate([tr.y] * args.tile),
            np.concatenate([tr.ids + c * span for c in range(args.tile)]), tr.num_classes, tr.shape))
    K = splits.num_classes
    t_spec = model_spec(cfg0.teacher.model, cfg0.teacher.kwargs, K, splits.shape)
    s_spec = model_spec(cfg0.student.model, cfg0.student.kwargs, K, splits.shape)
    torch.manual_seed(0)
    teacher = build_from_spec(t_spec)  # throughput does not depend on the teacher being trained
    t_state = teacher.state_dict()
    example = torch.zeros(1, *splits.shape)
    macs = {"teacher": count_macs(teacher, example), "student": count_macs(build_from_spec(s_spec), example)}

    init_ray(None, quiet=True)
    work = Path(tempfile.mkdtemp(prefix="rd-bench-"))
    atexit.register(shutil.rmtree, work, True)  # scratch data and runs, removed at exit
    data_ref = ray.put(splits)
    cache_info = {}
    for k in (None, 5):
        t0 = time.perf_counter()
        info = build_cache(str(work / f"cache_k{k}"), teacher_spec=t_spec, teacher_state=t_state,
                           teacher_sha256="bench", splits=splits, data_fingerprint=fingerprint(splits), k=k)
        size = sum(f.stat().st_size for f in (work / f"cache_k{k}").glob("*.parquet"))
        cache_info["full" if k is None else f"top{k}"] = {"build_s": time.perf_counter() - t0, "bytes": size,
                                                          "rows": info.rows, "info": info.__dict__}
    server = start_teacher_server("teacher-bench", t_spec, t_state, cfg0.scale)

    def teacher_source(mode):
        if mode == "none":
            return None
        if mode == "inprocess":
            return jobs.inprocess_teacher(t_spec, ray.put(t_state))
        if mode == "live":
            return jobs.live_teacher("teacher-bench")
        key = "full" if mode == "cache" else "top5"
        return jobs.cached_teacher(str(work / ("cache_kNone" if mode == "cache" else "cache_k5")),
                                   cache_info[key]["info"])

    runs: dict[str, list[float]] = {}  # (`server` stays referenced: an actor dies with its last handle)
    for rep in range(args.repeats):
        for w in args.workers:
            for mode in args.modes:
                if w != max(args.workers) and mode not in args.scale_modes:
                    continue
                cfg = config.load(None, {"scale.num_workers": w, "distill.epochs": args.epochs,
                                         **({"distill.alpha": 0.0} if mode == "none" else {}),
                                         **({"cache.k": 5} if mode == "cache_k5" else {})})
                job = jobs.StageJob(stage=f"bench-{mode}-w{w}", config=cfg, spec=s_spec, data=data_ref,
                                    phases=jobs.kd_phases(cfg), teacher=teacher_source(mode))
                _, result = fit(job, f"r{rep}-{time.time_ns()}", work)
                hist = result.return_value["history"][1:]  # drop the warm-up epoch
                sps = statistics.median(h["samples_per_s_global"] for h in hist)
                runs.setdefault(f"{mode}/w{w}", []).append(sps)
                print(f"repeat {rep + 1}: {mode:9s} workers={w}: {sps:8.0f} samples/s", flush=True)

    rows = []
    for w in args.workers:
        base = statistics.median(runs[f"none/w{w}"]) if f"none/w{w}" in runs else None
        for mode in args.modes:
            if f"{mode}/w{w}" not in runs:
                continue
            med = statistics.median(runs[f"{mode}/w{w}"])
            rows.append({"mode": mode, "workers": w, "samples_per_s": med, "runs": runs[f"{mode}/w{w}"],
                         "ratio_to_student_only": med / base if base else None})
    by = {(r["mode"], r["workers"]): r["samples_per_s"] for r in rows}
    derived = {}
    for w in args.workers:
        if ("live", w) in by and ("inprocess", w) in by:
            derived[f"live_vs_inprocess_w{w}"] = by[("live", w)] / by[("inprocess", w)]
    # the same ratios per repeat (variants of one repeat ran back to back), and their median: robust to a
    # repeat that was slowed as a whole by other work on the machine
    w = max(args.workers)
    for mode in args.modes:
        if mode != "none" and f"{mode}/w{w}" in runs and f"none/w{w}" in runs:
            per = [a / b for a, b in zip(runs[f"{mode}/w{w}"], runs[f"none/w{w}"])]
            derived[f"{mode}_vs_none_w{w}_per_repeat"] = per
            derived[f"{mode}_vs_none_w{w}_median_of_repeats"] = statistics.median(per)
    if f"live/w{w}" in runs and f"inprocess/w{w}" in runs:
        per = [a / b for a, b in zip(runs[f"live/w{w}"], runs[f"inprocess/w{w}"])]
        derived[f"live_vs_inprocess_w{w}_per_repeat"] = per
        derived[f"live_vs_inprocess_w{w}_median_of_repeats"] = statistics.median(per)
    for mode in args.modes:
        if (mode, 1) in by and (mode, 2) in by:
            derived[f"scaling_2_vs_1_{mode}"] = by[(mode, 2)] / by[(mode, 1)]

    print(f"\n| mode | workers | samples/s (median of {args.repeats}) | vs student-only |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        ratio = f"{r['ratio_to_student_only']:.2f}" if r["ratio_to_student_only"] else "-"
        print(f"| {r['mode']} | {r['workers']} | {r['samples_per_s']:.0f} | {ratio} |")
    for k, v in derived.items():
        print(f"{k}: " + (" ".join(f"{x:.2f}" for x in v) if isinstance(v, list) else f"{v:.2f}"))
    for name, c in cache_info.items():
        print(f"cache {name}: {c['bytes']} bytes on disk, built in {c['build_s']:.1f} s ({c['rows']} rows)")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({"machine": machine(), "command": " ".join(["throughput.py"] + sys.argv[1:]),
                                            "train_samples": len(splits.train), "load_average_at_start": load0,
                                            "macs": macs, "epochs": args.epochs, "tile": args.tile,
                                            "repeats": args.repeats, "rows": rows, "derived": derived,
                                            "cache": {k: {kk: vv for kk, vv in v.items() if kk != "info"}
                                                      for k, v in cache_info.items()}}, indent=2))
    print(f"wrote {args.out}")
    ray.kill(server)


if __name__ == "__main__":
    main()
