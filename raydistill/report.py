"""Run reports: report.json, report.md (a table) and report.png (accuracy vs MACs and latency)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raydistill.checkpoints import atomic_write_bytes, atomic_write_text

MODEL_ORDER = ["teacher", "student_baseline", "student_kd", "student_pruned", "student_lowrank", "student_int8"]


def markdown_table(models: dict[str, dict[str, Any]]) -> str:
    rows = ["| model | accuracy | params | MACs | latency b1 (ms) | latency b64 (ms) | size (KiB) | sparsity |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in [n for n in MODEL_ORDER if n in models] + [n for n in models if n not in MODEL_ORDER]:
        m = models[name]
        rows.append(f"| {name} | {m['accuracy']:.4f} | {m['params']:,} | {m['macs']:,} | {m['latency_ms_b1']:.3f} | "
                    f"{m['latency_ms_b64']:.3f} | {m['size_bytes'] / 1024:.1f} | {m['sparsity']:.3f} |")
    return "\n".join(rows)


def render_markdown(report: dict[str, Any]) -> str:
    models, t = report["models"], report["timings"]
    lines = ["# raydistill run report", "", markdown_table(models), ""]
    if "gains" in report:
        g = report["gains"]
        lines += ["## What distillation and pruning gained and cost", ""]
        lines += [f"- {k.replace('_', ' ')}: " + (f"{v:+.4f}" if "change" in k or "gain" in k else
                                                   f"{v:.3f}" if k.endswith("sparsity") else f"{v:.3f}×")
                  for k, v in g.items()]
        lines.append("")
    pruned = models.get("student_pruned", {})
    if "sparse_size_bytes" in pruned:
        lines += [f"student_pruned is unstructured-pruned: {100 * pruned['sparsity']:.1f} % of its Linear/Conv "
                  f"weights are zero, stored dense (size column); stored sparse (bitmap + non-zeros) it takes "
                  f"{pruned['sparse_size_bytes'] / 1024:.1f} KiB. Its MACs and dense latency are the unpruned "
                  "student's: unstructured sparsity gives no dense speed-up.", ""]
    if report.get("selection"):
        sel = report["selection"]
        lines += ["## Which student goes on", "",
                  f"{sel['chosen']} goes on to pruning, quantization and export: {sel['reason']}.", ""]
    if report.get("deploy"):
        dep = report["deploy"]
        where = f"exported to {dep['export']['artifact']}" if dep.get("export") else "nothing exported"
        lines += ["## Deploy gate", "", f"{dep['model']}: {dep['gate']['message']} ({where}).", ""]
        if dep.get("onnx") or dep.get("onnx_int8"):
            lines += onnx_section(dep["model"], models.get(dep["model"]), dep.get("onnx"), dep.get("onnx_int8"))
    if report.get("pruning"):
        p = report["pruning"]
        lines += ["## Pruning coverage", "",
                  f"Channel pruning reaches {len(p['pruned_groups'])} layer group(s) of the student; "
                  f"{len(p['not_pruned'])} stay whole:", ""]
        lines += [f"- {name}: {reason}" for name, reason in p["not_pruned"].items()] + [""]
    lines += ["## Stage wall times (s)", "", "| stage | seconds | skipped |", "| --- | ---: | --- |"]
    for stage, info in t.items():
        name = f"{stage} (beside the {info['beside']}; waited {info['waited']:.1f} s)" if "beside" in info else stage
        lines.append(f"| {name} | {info['seconds']:.1f} | {'yes' if info.get('skipped') else 'no'} |")
    if report.get("teacher_server"):
        s = report["teacher_server"]
        lines += ["", "## Shared teacher actor", "",
                  f"{s['requests']} requests merged into {s['forward_passes']} forward passes "
                  f"({s['samples']} samples) from ranks {sorted(s.get('requests_by_rank', {}))}."]
    budget = report.get("latency_budget_s")
    lines += ["", f"Latency: median of repeated CPU forwards with {report.get('latency_threads', 1)} thread(s)"
              + (f", up to {budget:g} s of timed runs per model and batch size (at least 3 runs)"
                 if budget is not None else "") + "; accuracy on the held-out test split.", ""]
    return "\n".join(lines)


def onnx_section(name: str, row: dict[str, Any] | None, o: dict[str, Any] | None,
                 o8: dict[str, Any] | None = None) -> list[str]:
    """The exported ONNX models (fp32 ``o`` and/or static int8 ``o8``) next to the PyTorch model they came from
    (same test split, same thread count)."""
    first = o or o8
    torch_size = f"{row['size_bytes'] / 1024:.1f}" if row else "–"
    lines = ["## ONNX Runtime vs PyTorch (CPU)", "",
             "| runtime | accuracy | latency b1 (ms) | latency b64 (ms) | size (KiB) |",
             "| --- | ---: | ---: | ---: | ---: |",
             f"| PyTorch ({name}) | {first['torch_accuracy']:.4f} | {first['torch_latency_ms_b1']:.3f} | "
             f"{first['torch_latency_ms_b64']:.3f} | {torch_size} |"]
    if o:
        lines.append(f"| ONNX Runtime {o['onnxruntime']} (opset {o['opset']}) | {o['accuracy']:.4f} | "
                     f"{o['latency_ms_b1']:.3f} | {o['latency_ms_b64']:.3f} | {o['size_bytes'] / 1024:.1f} |")
    if o8:
        lines.append(f"| ONNX Runtime {o8['onnxruntime']} static int8 | {o8['accuracy']:.4f} | "
                     f"{o8['latency_ms_b1']:.3f} | {o8['latency_ms_b64']:.3f} | {o8['size_bytes'] / 1024:.1f} |")
    lines.append("")
    if o:
        lines += [f"`{o['file']}`: largest logit difference to PyTorch on the test split {o['max_abs_diff']:.2g} "
                  f"(tolerance {o['atol']:g} + {o['rtol']:g}·|logit|).", ""]
    if o8:
        lines += [f"`{o8['file']}`: ONNX Runtime static int8 (QDQ, per-channel weights, calibrated on "
                  f"{o8['calibration_samples']} validation samples{', reduce_range' if o8['reduce_range'] else ''}); "
                  f"top-1 agreement with PyTorch fp32 {o8['agreement']:.4f}, largest logit difference "
                  f"{o8['max_abs_diff']:.2g}.", ""]
    return lines


def plot(models: dict[str, dict[str, Any]], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "macs", "MACs (batch 1)"), (axes[1], "latency_ms_b1", "latency at batch 1 (ms)")):
        for name, m in models.items():
            ax.scatter(m[key], m["accuracy"], s=40)
            ax.annotate(name, (m[key], m["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(True, alpha=0.3)
    fig.suptitle("raydistill: accuracy vs cost")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_report(out: Path, report: dict[str, Any]) -> None:
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(out / "report.md", render_markdown(report))
    plot(report["models"], out / "report.png")
