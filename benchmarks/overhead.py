"""What Ray costs on a laptop: the default pipeline three ways, same machine, same run, as ratios.

    python benchmarks/overhead.py --repeats 3          # writes benchmarks/results/overhead.json

(a) `raydistill run` in Ray Train local mode (the default on a laptop: scale.num_workers resolves to 0);
(b) `raydistill run --set scale.num_workers=2` (two DDP Train workers);
(c) the floor: this file's `--plain` mode, one process of plain torch doing the same stages with the same models,
    epochs, optimizer, losses, pruning, evaluation, int8 and export, and no Ray at all.

Each variant is a fresh process timed from start to exit (imports included), the three run back to back in every
repeat; the table gives the median wall time and the median of the per-repeat ratios. Results and the machine are
in docs/benchmarks.md.
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


def plain_pipeline(out: Path) -> dict:
    """The default config's stages in plain torch (no Ray): teacher, baseline, KD, prune + fine-tune, evaluate,
    int8, export. Uses raydistill's plain-torch parts (data, models, core) so the work is the same."""
    import math

    import torch
    import torch.nn.functional as F

    from raydistill import config
    from raydistill.core.losses import soft_kd_loss
    from raydistill.core.metrics import accuracy
    from raydistill.core.pruning import ChannelPruner, sparsity_schedule
    from raydistill.core.quantize import quantize_int8
    from raydistill.data import load_splits
    from raydistill.evaluate import evaluate_on_test
    from raydistill.export import export_model
    from raydistill.models import build_model

    cfg = config.load(None)
    torch.set_num_threads(cfg.scale.torch_threads)  # as the pipeline's training loop
    d, p, t = cfg.distill, cfg.prune, cfg.teacher
    s = load_splits("digits", val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction,
                    seed=cfg.data.seed)
    x, y = torch.from_numpy(s.train.x), torch.from_numpy(s.train.y)
    xv, yv = torch.from_numpy(s.val.x), torch.from_numpy(s.val.y)
    C, H, _ = s.shape

    def fit(model, epochs, lr, bs, wd, teacher=None, alpha=0.0, prune=None, first_epoch=0):
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * math.ceil(len(x) / bs))
        pruner = ChannelPruner(model, x[:2], importance=p.importance) if prune else None
        for e in range(epochs):
            if pruner is not None:
                pruner.mask_(sparsity_schedule(e + 1, epochs, p.ratio, p.schedule))
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + first_epoch + e))
            for i in range(0, len(x), bs):
                b = perm[i:i + bs]
                logits = model(x[b])
                loss = (1 - alpha) * F.cross_entropy(logits, y[b])
                if alpha > 0:
                    with torch.inference_mode():
                        t_logits = teacher(x[b])
                    loss = loss + alpha * soft_kd_loss(logits, t_logits.clone(), d.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if pruner is not None:
                    pruner.reapply_masks_()
            accuracy(model, xv, yv)  # the pipeline measures validation accuracy every epoch
        if pruner is not None:
            pruner.remove_()
        return model

    torch.manual_seed(cfg.seed)
    teacher = fit(build_model(t.model, s.num_classes, C, H, **t.kwargs), t.epochs, t.lr, t.batch_size,
                  t.weight_decay).eval()
    torch.manual_seed(cfg.seed)
    baseline = fit(build_model(cfg.student.model, s.num_classes, C, H, **cfg.student.kwargs), d.epochs, d.lr,
                   d.batch_size, d.weight_decay)
    torch.manual_seed(cfg.seed)
    kd = fit(build_model(cfg.student.model, s.num_classes, C, H, **cfg.student.kwargs), d.epochs, d.lr, d.batch_size,
             d.weight_decay, teacher, d.alpha)
    import copy

    pruned = fit(copy.deepcopy(kd), p.epochs, p.lr, d.batch_size, d.weight_decay, teacher, d.alpha, prune=True,
                 first_epoch=d.epochs)
    pruned = fit(pruned, p.finetune_epochs, p.lr, d.batch_size, d.weight_decay, teacher, d.alpha,
                 first_epoch=d.epochs + p.epochs)
    rows = {name: evaluate_on_test(m, s) for name, m in
            (("teacher", teacher), ("student_baseline", baseline), ("student_kd", kd), ("student_pruned", pruned))}
    q = quantize_int8(pruned.eval(), cfg.quantize.scheme)
    rows["student_int8"] = {"accuracy": accuracy(q, torch.from_numpy(s.test.x), torch.from_numpy(s.test.y))}
    export_model(pruned.eval(), torch.from_numpy(s.test.x[:1]), out / "deploy")
    return {name: round(r["accuracy"], 4) for name, r in rows.items()}


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plain", metavar="OUT", help=argparse.SUPPRESS)  # (c) itself, in its own process
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overhead.json"))
    args = ap.parse_args()
    if args.plain:
        print(json.dumps(plain_pipeline(Path(args.plain))))
        return

    from throughput import machine  # the same machine description as every benchmark here

    from raydistill.checkpoints import atomic_write_text

    bin_dir = Path(sys.executable).parent
    work = Path(tempfile.mkdtemp(prefix="rd-overhead-"))
    atexit.register(shutil.rmtree, work, True)  # scratch data and runs, removed at exit
    load0 = os.getloadavg()
    variants = {
        "a_local_mode": lambda r: [str(bin_dir / "raydistill"), "run", "--quiet", "--out", str(work / f"a{r}")],
        "b_two_workers": lambda r: [str(bin_dir / "raydistill"), "run", "--quiet", "--out", str(work / f"b{r}"),
                                    "--set", "scale.num_workers=2"],
        "c_plain_torch": lambda r: [sys.executable, str(Path(__file__).resolve()), "--plain", str(work / f"c{r}")],
    }
    walls: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for name, cmd in variants.items():
            walls[name].append(timed(cmd(r)))
            print(f"repeat {r + 1}: {name:14s} {walls[name][-1]:6.1f} s", flush=True)
    ratios = {key: [walls[a][i] / walls[b][i] for i in range(args.repeats)]
              for key, (a, b) in {"a/c": ("a_local_mode", "c_plain_torch"), "b/c": ("b_two_workers", "c_plain_torch"),
                                  "a/b": ("a_local_mode", "b_two_workers")}.items()}
    print(f"\n{'variant':16s} {'median wall (s)':>16s}  runs")
    for name, w in walls.items():
        print(f"{name:16s} {statistics.median(w):16.1f}  {', '.join(f'{v:.1f}' for v in w)}")
    for key, vals in ratios.items():
        print(f"ratio {key}: median {statistics.median(vals):.2f} ({', '.join(f'{v:.2f}' for v in vals)})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({
        "command": " ".join(["overhead.py"] + sys.argv[1:]), "machine": machine(), "load_average_at_start": load0,
        "wall_s": walls, "median_wall_s": {k: statistics.median(v) for k, v in walls.items()},
        "ratios_per_repeat": ratios, "median_ratios": {k: statistics.median(v) for k, v in ratios.items()}},
        indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
