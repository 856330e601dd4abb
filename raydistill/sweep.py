"""``raydistill tune``: a Ray Tune search over run keys with one shared teacher and a Pareto front.

    teacher (trained/loaded once) ─> logit cache (one teacher pass)
      ─┬─> trial 1: distill ─> prune ─> fine-tune ─> evaluate
       ├─> trial 2 ...
       └─> trial N
    ─> results.parquet / results.csv, pareto.md / pareto.png, best_config.yaml, sweep_report.json

Trials are plain Tune function trainables running the same loop as a Ray Train worker
(``worker.run_loop`` with a ``TuneSession``): one process per trial is enough for the student, and
it avoids a TorchTrainer start-up (~25 s on a 2-core machine) per trial. Every trial reads the same
teacher outputs, from the cache by default (or the shared TeacherServer actor with
``tune.teacher_mode: live``), so the teacher's cost does not grow with the number of trials.
``tune.teacher_mode: inprocess`` gives every trial its own teacher copy that computes its own
logits: the cost the shared teacher saves, kept so that it can be measured (benchmarks/sweep.py).

The first trials are always the label-only student (α = 0, β = 0) at the base config's other values,
one per pruning ratio when ``prune.ratio`` is searched over a choice or grid, fed to the search as
points to evaluate: the sweep is never worse than the plain student, and every ratio has its
label-only reference. The best trial is picked by validation accuracy (test accuracy is reported,
never used to choose).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from raydistill import config as config_mod
from raydistill.checkpoints import atomic_write_bytes, atomic_write_text
from raydistill.cluster import check_trial_resources, joins_cluster
from raydistill.config import Config
from raydistill.console import log
from raydistill.redact import redact_obj

OBJECTIVES = {"accuracy": "max", "macs": "min", "latency_ms_b1": "min"}
SEARCHES = ("random", "grid", "optuna")  # tune.search: Tune's basic variant generator (random, grid), OptunaSearch
SCHEDULERS = ("asha", "none")  # tune.scheduler
# tune.space kinds → Tune's sampling functions (module-level without importing Ray: config.validate reads the keys)
_SAMPLERS = {"choice": lambda tune, v: tune.choice(v), "grid": lambda tune, v: tune.grid_search(v),
             "uniform": lambda tune, v: tune.uniform(*v), "loguniform": lambda tune, v: tune.loguniform(*v),
             "randint": lambda tune, v: tune.randint(*v)}
SPACE_KINDS = tuple(_SAMPLERS)


# ---- pure helpers -----------------------------------------------------------------------------------------
def pareto_front(points: list[dict], maximize: str, minimize: str) -> list[int]:
    """Indices of the non-dominated points: no other point is ≥ on ``maximize`` and ≤ on ``minimize``
    with at least one strict inequality. O(n²), fine for sweeps of hundreds of trials."""
    front = []
    for i, p in enumerate(points):
        dominated = any(
            q[maximize] >= p[maximize] and q[minimize] <= p[minimize]
            and (q[maximize] > p[maximize] or q[minimize] < p[minimize])
            for j, q in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def search_space(space: dict[str, dict]) -> dict[str, Any]:
    """YAML space spec → Tune sampling objects ({"choice": [..]} → tune.choice([..]), ...)."""
    from ray import tune

    return {key: _SAMPLERS[kind](tune, value) for key, spec in space.items() for kind, value in spec.items()}


def trial_config(base: dict, params: dict, teacher_mode: str) -> Config:
    overrides = {**params, "distill.teacher_mode": teacher_mode}
    return config_mod.from_dict(config_mod.apply_overrides(base, overrides))


# ---- the trial ---------------------------------------------------------------------------------------------
def trial(params: dict, *, base: dict, data_ref, s_spec: dict, teacher: list[dict], teacher_mode: str) -> None:
    """One Tune trial: the pipeline's student stages with this trial's keys; the last report carries test metrics."""
    from ray import tune

    from raydistill.evaluate import evaluate_on_test
    from raydistill.job import StageJob, TeacherSource, resolve, trial_phases
    from raydistill.worker import TuneSession, run_loop

    cfg = trial_config(base, params, teacher_mode)
    data_ref, source = data_ref[0], TeacherSource(**teacher[0])  # in lists: with_parameters passes refs, not copies
    job = StageJob(stage="trial", config=cfg, spec=s_spec, data=data_ref, phases=trial_phases(cfg), teacher=source,
                   verbose=False)
    summary, model = run_loop(job, TuneSession())
    final = evaluate_on_test(model, resolve(data_ref), cfg.report.latency_budget_s)
    last = summary["history"][-1] if summary["history"] else {}
    # "evaluated", not "done": Tune sets its own "done" on a trial's last result, early-stopped or not
    tune.report({**final, "val_acc": last.get("val_acc", float("nan")), "evaluated": True,
                 "epochs_total": job.total_epochs,
                 **({"teacher_forward_samples": last["teacher_forward_samples"]}
                    if "teacher_forward_samples" in last else {})})


# ---- the sweep ---------------------------------------------------------------------------------------------
def label_only_points(cfg: Config) -> list[dict]:
    """The plain student as search points: α = 0 and every other searched key at its base value, once per
    pruning ratio when ``prune.ratio`` is a choice/grid (the reference for trials at that ratio)."""
    point = {}
    for key in cfg.tune.space:
        point[key] = 0.0 if key in ("distill.alpha", "distill.beta") else config_mod.get(cfg, key)
    kind, values = next(iter(cfg.tune.space.get("prune.ratio", {"": None}).items()))
    if kind not in ("choice", "grid"):
        return [point]
    ordered = sorted(values, key=lambda r: r != point["prune.ratio"])  # the base ratio first
    return [{**point, "prune.ratio": r} for r in ordered]


def is_label_only(params: dict) -> bool:
    """A trial of the plain student: α = 0 and no hard-label term (``label_only_points``)."""
    return params.get("distill.alpha") == 0.0 and not params.get("distill.beta")


def asha_keeping_label_only(max_t: int, grace_period: int):
    """Tune's ASHA (early stopping on val_acc), except that a label-only trial is never stopped early: the
    reference the best trial is compared with (``best_vs_label_only_same_ratio``) always finishes, is
    evaluated on test and stays in the results."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class KeepLabelOnly(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP and is_label_only(trial.config):
                self._num_stopped -= 1
                return TrialScheduler.CONTINUE  # the trial ends by itself after its final (test) report
            return action

    return KeepLabelOnly(metric="val_acc", mode="max", time_attr="training_iteration", max_t=max_t,
                         grace_period=grace_period, reduction_factor=2)


def trial_lines(keys: list[str], total: int, quiet: bool):
    """A Tune callback printing one line per finished trial (Tune's own status tables need --verbose)."""
    from ray import tune

    class TrialLines(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            # Tune calls this before it marks the trial TERMINATED: count it with the others already finished
            done = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
            params = ", ".join(f"{k}={_fmt(trial.config.get(k))}" for k in keys)
            if r.get("evaluated"):
                log(f"trial {trial.trial_id} ({done}/{total}) {params}: test accuracy {r['accuracy']:.4f}, "
                    f"{r['macs']:,} MACs, val_acc {r['val_acc']:.4f}", quiet)
            else:
                log(f"trial {trial.trial_id} ({done}/{total}) {params}: stopped early after "
                    f"{r.get('training_iteration', 0)} epoch(s), val_acc {r.get('val_acc', float('nan')):.4f}", quiet)

        def on_trial_error(self, iteration, trials, trial, **info):
            error = trial_error(trial)
            log(f"trial {trial.trial_id} failed: {error_line(error) if error else 'no error recorded'}", quiet)

    return TrialLines()


def trial_error(trial) -> BaseException | str | None:
    """The error a failed Tune trial raised, as Tune kept it when it marked the trial failed: the pickled exception,
    else its text, from the trial's local folder (Tune writes both there before it calls ``on_trial_error``; its
    ``get_pickled_error`` reads the storage copy, which may not be written yet)."""
    import cloudpickle

    for path in (trial.pickled_error_file, trial.error_file):
        if path and os.path.isfile(path):
            try:
                if path == trial.pickled_error_file:
                    with open(path, "rb") as f:
                        return cloudpickle.load(f)
                return Path(path).read_text()
            except Exception:  # an exception that cannot be unpickled here: its text is next
                continue
    try:  # the storage copy (a remote storage_path); this runs inside a Tune callback, which must not fail the sweep
        return trial.get_pickled_error() or trial.get_error()
    except Exception:
        return None


def root_cause(error: BaseException | str) -> BaseException | str:
    """The exception a trial raised, out of Ray's wrappers (a RayTaskError's ``cause``)."""
    while isinstance(error, BaseException) and getattr(error, "cause", None) is not None:
        error = error.cause
    return error


def is_bad_input(error: BaseException | str | None) -> bool:
    """Whether a trial failed on bad input (a raydistill UserError: a NaN loss from the learning rate, bad data);
    an error Tune kept only as text is not known to be."""
    from raydistill.errors import first_user_error

    return isinstance(error, BaseException) and first_user_error(error) is not None


def error_line(error: BaseException | str) -> str:
    """One line for a failed trial: the exception the trial raised ("FileNotFoundError: train.parquet", or a
    raydistill error's own message), not the first line of Ray's wrapper ("ray::ImplicitFunc.train() (pid=...)"),
    which is all that said before. ``error`` is the exception Tune kept, or its text when it could not pickle it."""
    from raydistill.errors import UserError, message_line

    cause = root_cause(error)
    if isinstance(cause, UserError):
        return message_line(cause)
    if isinstance(cause, BaseException) and not hasattr(cause, "traceback_str"):
        message = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {message[0]}" if message else type(cause).__name__
    # text only (a traceback): its last line names the exception
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(cause).splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else "unknown error"


def quiet_tune(verbose: bool) -> None:
    """Ray Tune's documented switches for what it prints that a person cannot act on, unless ``verbose``; a value
    the user set wins. Called before ``ray.tune`` is first imported: it reads some of them then."""
    if verbose:
        return
    # Tune logs every failed trial's whole traceback (tune_controller: "Trial task failed for trial ..."); the trial
    # lines give its error in one line, and results.csv keeps it.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    # Tune's default output engine prints its experiment box and result paths whatever the verbosity (tune.py calls
    # experiment_started unconditionally); its legacy engine, documented as RAY_AIR_NEW_OUTPUT=0, prints nothing at
    # verbose=0. Our trial lines are the progress.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune warns whenever trials' checkpoints forced more than one experiment-state snapshot in 5 s, which short
    # trials that checkpoint every epoch always do (each snapshot took ~7 ms here); 0: never warn.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune warns when one step of its event loop took over 0.5 s ("... may be a performance bottleneck. Please
    # consider reporting results less frequently"), four lines at once, which a busy 2-core laptop hits in a sweep of
    # a minute or more (seen in benchmarks/sweep.py); trials report once an epoch because ASHA decides on epochs.
    # Read once, when ray.tune is imported.
    os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "10")


def run_sweep(cfg: Config, out: str | Path, *, resume: bool = False, address: str | None = None,
              quiet: bool = False, verbose: bool = False) -> dict:
    import dataclasses

    quiet_tune(verbose)
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from raydistill.job import trial_phases
    from raydistill.manifest import digest
    from raydistill.pipeline import (
        open_run,
        open_teacher_source,
        prepare_teacher,
        stop_teacher_server,
        wait_for_teacher_server,
    )

    t = cfg.tune
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    teacher_cpus = cfg.scale.teacher_cpus if t.teacher_mode == "live" else 0.0  # held by the actor all sweep long
    if not joins_cluster(address):  # a private Ray's CPUs are known before it starts: refused before any work
        check_trial_resources(cfg, address, teacher_cpus)
    # Teacher once (trained or loaded) and its logit cache once, through the pipeline's cached stages.
    ctx = open_run(cfg, out, address, quiet,
                   uses_cache=t.teacher_mode == "cache" or cfg.distill.teacher_mode == "cache",
                   verbose=verbose, sweep=True)  # Ray may start beside the teacher: prepare_teacher waits for it
    cfg = ctx.cfg  # scale.num_workers resolved
    if joins_cluster(address):  # a cluster's once connected (its autoscaler asked first)
        check_trial_resources(cfg, address, teacher_cpus)
    teacher = prepare_teacher(ctx, with_cache=t.teacher_mode == "cache")
    timings["teacher_and_cache_s" if t.teacher_mode == "cache" else "teacher_s"] = time.perf_counter() - t0
    out, splits = ctx.out, ctx.splits
    # every trial reads the cache (default), asks one shared actor, or loads its own copy (inprocess: the cost the
    # others save, kept so that it can be measured)
    source, server = open_teacher_source(ctx, teacher, t.teacher_mode)
    wait_for_teacher_server(ctx, source, server)

    from raydistill.track import finish_tune, tune_callbacks

    tracking, tracking_parent = tune_callbacks(cfg, out)  # MLflow: a run for the sweep, one nested run per trial
    base = cfg.to_dict()
    # ctx.data_ref: an object ref, or (Ray started beside the teacher) the in-memory Splits, which with_parameters
    # puts in the object store once for every trial
    trainable = tune.with_resources(
        tune.with_parameters(trial, base=base, data_ref=[ctx.data_ref], s_spec=ctx.s_spec,
                             teacher=[{f.name: getattr(source, f.name) for f in dataclasses.fields(source)}],
                             teacher_mode=t.teacher_mode),
        {"cpu": t.cpus_per_trial})
    name = f"sweep-{digest(base)[:12]}"
    storage = out / "tune"
    max_t = sum(p.epochs for p in trial_phases(cfg)) + 1  # +1: the final report with test metrics
    if resume and tune.Tuner.can_restore(str(storage / name)):
        log(f"resuming sweep {storage / name}", quiet)
        tuner = tune.Tuner.restore(str(storage / name), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        if resume:
            log("no interrupted sweep to resume; starting a new one", quiet)
        points = label_only_points(cfg)[:max(1, t.num_trials // 3)]  # at most a third of the budget
        if t.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            searcher = OptunaSearch(metric="val_acc", mode="max", points_to_evaluate=points, seed=cfg.seed)
            search_alg = tune.search.ConcurrencyLimiter(searcher, max_concurrent=t.max_concurrent)
        else:
            search_alg = BasicVariantGenerator(points_to_evaluate=points, max_concurrent=t.max_concurrent,
                                               random_state=cfg.seed)
        scheduler = asha_keeping_label_only(max_t, min(t.grace_period, max_t)) if t.scheduler == "asha" else None
        tuner = tune.Tuner(
            trainable, param_space=search_space(t.space),
            # tune.max_concurrent is the search algorithm's own limit (above): Tune ignores max_concurrent_trials
            # beside a BasicVariantGenerator or a ConcurrencyLimiter, with a warning that it does
            # reuse_actors: a trial that ends hands its process to the next one (Tune's documented switch, off by
            # default): on digits a trial process's start, imports and data load cost more than its epochs
            tune_config=tune.TuneConfig(num_samples=t.num_trials, search_alg=search_alg, scheduler=scheduler,
                                        reuse_actors=t.reuse_actors),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=1 if verbose else 0,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      callbacks=[trial_lines(list(t.space), t.num_trials, quiet), *tracking]))
    t0 = time.perf_counter()
    grid = tuner.fit()
    timings["sweep_s"] = time.perf_counter() - t0

    rows = []
    for res in grid:
        m = res.metrics or {}
        row = {"trial_id": m.get("trial_id"), **{k: res.config.get(k) for k in t.space},
               "completed": bool(m.get("evaluated")), "val_acc": m.get("val_acc"),
               "epochs_run": m.get("training_iteration"),
               "error": error_line(res.error) if res.error else None, "bad_input": is_bad_input(res.error)}
        for k in ("accuracy", "params", "macs", "latency_ms_b1", "latency_ms_b64", "size_bytes", "sparsity"):
            row[k] = m.get(k) if m.get("evaluated") else None
        row["teacher_forward_samples"] = m.get("teacher_forward_samples")  # per-trial teacher only
        rows.append(row)
    teacher_passes = None
    if t.teacher_mode == "cache":
        teacher_passes = teacher.cache["teacher_forward_samples"]
    elif t.teacher_mode == "inprocess":
        teacher_passes = sum(r["teacher_forward_samples"] or 0 for r in rows)
    if server is not None:
        teacher_passes = stop_teacher_server(source, server)["samples"]
    report = write_results(cfg, out, rows, teacher_passes, teacher.cache, timings, splits.rows("train"),
                           rerun=rerun_overrides(cfg, teacher))
    finish_tune(cfg, out, tracking_parent, report)
    best = report["best"]
    log(f"sweep done: {len(rows)} trials, best (on validation) test accuracy "
        f"{format(best['accuracy'], '.4f') if best else 'n/a'}; results in {out}", quiet)
    return report


def rerun_overrides(cfg: Config, teacher) -> dict[str, Any]:
    """What best_config.yaml needs besides the trial's keys to rerun it exactly with ``raydistill run``: the
    execution shape a trial has (one process: local mode), its teacher source, and this sweep's teacher (and
    logit cache), so the rerun's student reads the very teacher outputs the trial read."""
    overrides = {"scale.num_workers": 0, "distill.teacher_mode": cfg.tune.teacher_mode,
                 "teacher.checkpoint": str(teacher.path),
                 # a trial prunes its own KD student; the sweep already chose among trials (label-only ones
                 # included) on validation, so the rerun must not choose again
                 "distill.never_worse": False}
    if cfg.tune.teacher_mode == "cache":
        overrides["cache.path"] = teacher.cache["uri"]
    return overrides


def write_results(cfg: Config, out: Path, rows: list[dict], teacher_passes, cache_info, timings, n_train,
                  rerun: dict[str, Any] | None = None) -> dict:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(out / "results.parquet", sink.getvalue().to_pybytes())
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink)
    atomic_write_bytes(out / "results.csv", sink.getvalue().to_pybytes())

    done = [r for r in rows if r["completed"]]
    fronts = {obj: [done[i] for i in pareto_front(done, "accuracy", obj)] for obj in ("macs", "latency_ms_b1")}
    t = cfg.tune
    eligible = [r for r in done if (t.max_macs is None or r["macs"] <= t.max_macs)
                and (t.max_latency_ms is None or r["latency_ms_b1"] <= t.max_latency_ms)]
    # chosen on validation accuracy (ties: fewer MACs, then the earlier trial); the test set only reports
    best = max(eligible, key=lambda r: (r["val_acc"], -r["macs"])) if eligible else None
    if best is not None:
        rerun = rerun or {}
        best_cfg = trial_config(cfg.to_dict(), {**{k: best[k] for k in t.space}, **rerun},
                                rerun.get("distill.teacher_mode", cfg.distill.teacher_mode))
        atomic_write_text(out / "best_config.yaml",
                          f"# best trial {best['trial_id']}: test accuracy {best['accuracy']:.4f}, "
                          f"{best['macs']:,} MACs\n# reproduce: raydistill run best_config.yaml\n" + best_cfg.to_yaml())
    label_only = [r for r in done if is_label_only(r)]
    same_ratio = [r for r in label_only if best is not None and r.get("prune.ratio", cfg.prune.ratio)
                  == best.get("prune.ratio", cfg.prune.ratio)]
    vs_label_only = None
    if best is not None and same_ratio:
        ref = max(same_ratio, key=lambda r: r["val_acc"])
        vs_label_only = {"prune_ratio": best.get("prune.ratio", cfg.prune.ratio), "best_accuracy": best["accuracy"],
                         "label_only_accuracy": ref["accuracy"], "best_val_acc": best["val_acc"],
                         "label_only_val_acc": ref["val_acc"], "label_only_trial": ref["trial_id"],
                         "difference_points": 100 * (best["accuracy"] - ref["accuracy"])}
    failed = [{"trial_id": r["trial_id"], "error": r["error"], "bad_input": r.get("bad_input", False)}
              for r in rows if r.get("error")]
    report = {"trials": len(rows), "completed": len(done), "failed_trials": failed, "best": best,
              "label_only_trials": label_only,
              "best_vs_label_only_same_ratio": vs_label_only,
              "pareto_macs": fronts["macs"], "pareto_latency": fronts["latency_ms_b1"],
              "teacher_forward_samples": teacher_passes, "train_samples": n_train,
              "teacher_passes_over_data": (teacher_passes / n_train) if teacher_passes is not None else None,
              "constraints": {"max_macs": t.max_macs, "max_latency_ms": t.max_latency_ms},
              "logit_cache": cache_info, "timings": timings}
    report = redact_obj(report)  # credentials in the cache's URI stay out of it (best_config.yaml keeps them)
    atomic_write_text(out / "sweep_report.json", json.dumps(report, indent=2, default=str))
    keys = list(t.space)
    lines = ["# Sweep: Pareto fronts", "", f"{len(done)} of {len(rows)} trials completed (the rest stopped early "
             f"by ASHA or failed). Teacher forward samples for the whole sweep: {teacher_passes} "
             f"({report['teacher_passes_over_data']} passes over {n_train} training samples).", ""]
    for obj, front in fronts.items():
        lines += [f"## accuracy vs {obj}", "", "| " + " | ".join(keys) + f" | accuracy | {obj} |",
                  "|" + " --- |" * (len(keys) + 2)]
        for r in sorted(front, key=lambda r: r[obj]):
            lines.append("| " + " | ".join(_fmt(r[k]) for k in keys) + f" | {r['accuracy']:.4f} | {_fmt(r[obj])} |")
        lines.append("")
    atomic_write_text(out / "pareto.md", "\n".join(lines))
    plot_pareto(done, fronts, out / "pareto.png")
    return report


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def plot_pareto(done: list[dict], fronts: dict, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, obj in zip(axes, ("macs", "latency_ms_b1")):
        ax.scatter([r[obj] for r in done], [r["accuracy"] for r in done], s=20, alpha=0.5, label="trials")
        front = sorted(fronts[obj], key=lambda r: r[obj])
        ax.plot([r[obj] for r in front], [r["accuracy"] for r in front], "r-o", ms=5, label="Pareto front")
        ax.set_xlabel(obj)
        ax.set_ylabel("test accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
