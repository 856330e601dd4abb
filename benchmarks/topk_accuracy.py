"""Does a KD student trained from a top-k logit cache match one trained from full logits?

    python benchmarks/topk_accuracy.py                    # default digits teacher/student, k=5 of 10, 8 seeds
    python benchmarks/topk_accuracy.py --k 1 3 5 --temperatures 1 4 --seeds 5

One teacher is trained (the default config's teacher, through the same worker loop as a Ray Train
worker), then one full fp16 cache and one top-k cache per ``--k`` are built with
``raydistill.cache.build_cache`` (the Ray Data actor pool ``raydistill cache-logits`` uses). For each
temperature and seed, the default student is distilled (``distill.alpha``, ``distill.epochs``) from
each cache and from labels only, with the same seed (same init and data order) for every variant,
so the per-seed differences are paired. Test accuracy is reported as mean ± standard deviation
over seeds, and the paired difference top-k − full with its standard error: "the same within noise"
means that difference is within two standard errors of 0, and within the seed-to-seed spread.

Students run in this process (``worker.run_loop`` with a one-process session, as a Tune trial
does): the question is about the loss, not the cluster, and a Ray Train start-up per student would
only add minutes. Writes a table to stdout and JSON to benchmarks/results/topk_accuracy.json.
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


class LocalSession:
    """``worker.run_loop``'s session in this process: one rank, reports kept in memory."""

    rank, world = 0, 1

    def __init__(self):
        import torch

        self.device = torch.device("cpu")
        self.reports: list[dict] = []

    def get_checkpoint(self):
        return None

    def report(self, metrics: dict, state: dict | None) -> None:
        self.reports.append(metrics)  # no checkpoints: nothing here resumes

    def progress(self, text: str) -> None:
        pass

    def prepare_model(self, model):
        return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[5])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[4.0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "topk_accuracy.json"))
    args = ap.parse_args()

    import ray
    import torch

    from raydistill import config
    from raydistill import job as jobs
    from raydistill.cache import build_cache
    from raydistill.checkpoints import atomic_write_text, model_spec
    from raydistill.cluster import init_ray
    from raydistill.core.metrics import accuracy
    from raydistill.data import fingerprint
    from raydistill.pipeline import load_data
    from raydistill.worker import run_loop

    load0 = os.getloadavg()
    overrides = dict(config.parse_override(s) for s in args.set) if args.set else {}
    cfg0 = config.load(None, overrides)
    splits = load_data(cfg0)
    K = splits.num_classes
    for k in args.k:
        if not 1 <= k < K:
            sys.exit(f"--k {k}: must be in [1, {K - 1}] (k={K} is the full distribution)")
    t_spec = model_spec(cfg0.teacher.model, cfg0.teacher.kwargs, K, splits.shape)
    s_spec = model_spec(cfg0.student.model, cfg0.student.kwargs, K, splits.shape)
    x_test, y_test = torch.from_numpy(splits.test.x), torch.from_numpy(splits.test.y)

    init_ray(None, quiet=True)
    data_ref = ray.put(splits)
    t0 = time.perf_counter()
    job = jobs.StageJob(stage="teacher", config=cfg0, spec=t_spec, data=data_ref, phases=jobs.teacher_phases(cfg0),
                        verbose=False)
    _, teacher = run_loop(job, LocalSession())
    teacher_acc = accuracy(teacher, x_test, y_test)
    print(f"teacher: test accuracy {teacher_acc:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    work = Path(tempfile.mkdtemp(prefix="rd-topk-"))
    atexit.register(shutil.rmtree, work, True)  # scratch data and runs, removed at exit
    caches = {}
    for k in [None] + args.k:
        name = "full" if k is None else f"top{k}"
        info = build_cache(str(work / name), teacher_spec=t_spec, teacher_state=teacher.state_dict(),
                           teacher_sha256="bench", splits=splits, data_fingerprint=fingerprint(splits), k=k)
        size = sum(f.stat().st_size for f in (work / name).glob("*.parquet"))
        caches[name] = {"uri": str(work / name), "info": info.__dict__, "bytes": size}

    variants = ["labels"] + list(caches)
    results: dict[str, dict[str, list[float]]] = {}
    for T in args.temperatures:
        for seed in range(args.seeds):
            for v in variants:
                cfg = config.load(None, {**overrides, "seed": seed, "distill.temperature": T,
                                         "distill.teacher_mode": "cache",
                                         **({"distill.alpha": 0.0} if v == "labels" else {}),
                                         **({"cache.k": caches[v]["info"]["k"]} if v != "labels" else {})})
                source = None if v == "labels" else jobs.cached_teacher(caches[v]["uri"], caches[v]["info"])
                job = jobs.StageJob(stage=v, config=cfg, spec=s_spec, data=data_ref, phases=jobs.kd_phases(cfg),
                                    teacher=source, verbose=False)
                _, student = run_loop(job, LocalSession())
                acc = accuracy(student, x_test, y_test)
                results.setdefault(f"T={T:g}", {}).setdefault(v, []).append(acc)
            row = results[f"T={T:g}"]
            print(f"T={T:g} seed {seed}: " + "  ".join(f"{v} {row[v][-1]:.4f}" for v in variants), flush=True)

    table = []
    for tkey, row in results.items():
        full = row["full"]
        for v in variants:
            accs = row[v]
            entry = {"temperature": tkey, "variant": v, "mean": statistics.mean(accs),
                     "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "accuracies": accs}
            if v != "full":
                diff = [a - b for a, b in zip(accs, full)]
                se = statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
                entry.update(paired_diff_vs_full=statistics.mean(diff), paired_diff_se=se,
                             within_noise=abs(statistics.mean(diff)) <= 2 * se if se == se else None)
            table.append(entry)

    print(f"\nteacher test accuracy {teacher_acc:.4f}; student test accuracy over {args.seeds} seeds "
          f"({len(splits.test)} test samples)")
    print("| T | variant | mean | std | top-k − full (paired) | within 2 SE |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for e in table:
        diff = (f"{100 * e['paired_diff_vs_full']:+.2f} ± {100 * e['paired_diff_se']:.2f} pts"
                if "paired_diff_vs_full" in e else "-")
        print(f"| {e['temperature']} | {e['variant']} | {e['mean']:.4f} | {e['std']:.4f} | {diff} | "
              f"{e.get('within_noise', '-')} |")
    for name, c in caches.items():
        print(f"cache {name}: {c['bytes']} bytes")

    from throughput import machine  # the same machine description as every benchmark here

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({
        "command": " ".join(["topk_accuracy.py"] + sys.argv[1:]), "load_average_at_start": load0,
        "machine": machine(),
        "data": {"name": splits.name, "train": len(splits.train), "test": len(splits.test), "classes": K},
        "alpha": cfg0.distill.alpha, "epochs": cfg0.distill.epochs, "seeds": args.seeds,
        "teacher_test_accuracy": teacher_acc,
        "cache_bytes": {n: c["bytes"] for n, c in caches.items()}, "rows": table}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
