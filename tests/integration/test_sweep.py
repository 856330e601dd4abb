"""`raydistill tune`: a real small sweep on local Ray, its results, Pareto set, teacher passes, resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from smoke import SMOKE, ctrl_c_default

from raydistill import config
from raydistill.sweep import run_sweep

SWEEP = {**SMOKE, "data.limit": 240, "distill.epochs": 2, "tune.grace_period": 2, "tune.num_trials": 4,
         "tune.max_concurrent": 2}


@pytest.mark.ray
def test_small_sweep_end_to_end(ray_local, tmp_path, tiny_teacher):
    job = Path(__file__).resolve().parents[2] / "jobs" / "sweep.yaml"
    # the documented sweep job in smoke mode, with a ready teacher (training one is the pipeline tests' job)
    cfg = config.load(job, {**SWEEP, "teacher.checkpoint": tiny_teacher, "track.mlflow": True})
    import logging

    class Keep(logging.Handler):  # Tune's own warnings, as a script's console would show them ("ray" propagates none)
        def emit(self, record):
            warnings.append(record.getMessage())

    warnings, keep = [], Keep(logging.WARNING)
    logging.getLogger("ray.tune").addHandler(keep)
    try:
        report = run_sweep(cfg, tmp_path, quiet=True)
    finally:
        logging.getLogger("ray.tune").removeHandler(keep)
    # none that a user cannot act on: Tune ignoring max_concurrent_trials beside our search algorithm's own limit
    # (it did, every sweep), or short trials' checkpoints forcing experiment snapshots (Ray's switch turns it off)
    assert not [w for w in warnings if "max_concurrent_trials" in w or "snapshotting" in w], warnings
    from mlflow import MlflowClient

    from raydistill.track import mlflow_uri

    client = MlflowClient(mlflow_uri(cfg, tmp_path))  # track.mlflow: a run for the sweep, a nested run per trial
    runs = client.search_runs([client.get_experiment_by_name("raydistill").experiment_id])
    (sweep_run,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep_run.info.run_id]
    assert len(trials) == 4 and all("val_acc" in r.data.metrics for r in trials)
    assert "pareto.png" in {a.path for a in client.list_artifacts(sweep_run.info.run_id)}
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "results.parquet").to_pylist()
    assert len(rows) == 4 and (tmp_path / "results.csv").exists() and (tmp_path / "pareto.png").exists()
    assert rows[0]["distill.alpha"] == 0.0  # the label-only student is always evaluated
    # a trial that ends hands its process to the next (tune.reuse_actors): 4 trials, 2 at a time, in fewer processes
    # (Tune writes each result's pid); each trial started its own before
    pids = {json.loads(line)["pid"] for path in (tmp_path / "tune").glob("sweep-*/trial_*/result.json")
            for line in path.read_text().splitlines() if line.strip()}
    assert 1 <= len(pids) < len(rows), pids
    done = [r for r in rows if r["completed"]]
    assert done and all(r["accuracy"] is not None and r["macs"] > 0 for r in done)
    for front, cost in ((report["pareto_macs"], "macs"), (report["pareto_latency"], "latency_ms_b1")):
        assert front
        for p in front:  # nothing on a front is dominated by any completed trial
            assert not any(q["accuracy"] >= p["accuracy"] and q[cost] <= p[cost]
                           and (q["accuracy"] > p["accuracy"] or q[cost] < p[cost]) for q in done)
    # one teacher pass over the training data for the whole sweep, whatever the number of trials
    assert report["teacher_passes_over_data"] == 1.0
    best = config.load(tmp_path / "best_config.yaml")
    assert best.prune.ratio == report["best"]["prune.ratio"]
    assert best.distill.alpha == report["best"]["distill.alpha"]
    # the best trial is the most accurate on validation data, never chosen on the test set
    assert report["best"]["val_acc"] == max(r["val_acc"] for r in done)
    vs = report["best_vs_label_only_same_ratio"]
    if vs is not None:  # a label-only trial at the best trial's ratio finished
        assert vs["prune_ratio"] == report["best"]["prune.ratio"] and vs["best_val_acc"] >= vs["label_only_val_acc"]

    # `raydistill run best_config.yaml` reproduces the best trial exactly: the config carries the trial's execution
    # shape (one process: local mode), its teacher source and this sweep's teacher and logit cache
    assert best.scale.num_workers == 0 and best.distill.teacher_mode == "cache" and best.cache.path
    from raydistill.pipeline import run

    rerun = run(best, tmp_path / "rerun", quiet=True)
    final = rerun["models"]["student_pruned" if best.prune.ratio > 0 else "student_kd"]
    assert final["accuracy"] == report["best"]["accuracy"]
    assert final["macs"] == report["best"]["macs"] and final["params"] == report["best"]["params"]


@pytest.mark.ray
def test_per_trial_teacher_counts_its_own_forward_passes(ray_local, tmp_path, tiny_teacher, capsys, monkeypatch):
    """tune.teacher_mode=inprocess (the benchmark's no-sharing baseline): each distilling trial runs the teacher
    over its training data every epoch, and the sweep report adds those passes up. The data is digits prepared as
    Parquet and named relative to the current directory, which the trials (Tune runs each in a folder of its own,
    streaming its data through Ray Data) do not share: the config holds it absolute (``config.absolute_paths``;
    before, every trial failed with FileNotFoundError)."""
    from raydistill.prepare import prepare

    prepare("digits", str(tmp_path / "digits"))
    monkeypatch.chdir(tmp_path)
    cfg = config.load(None, {**SWEEP, "data.source": "parquet", "data.path": "digits",
                             "teacher.checkpoint": tiny_teacher, "tune.teacher_mode": "inprocess",
                             "tune.num_trials": 2, "tune.scheduler": "none", "distill.epochs": 1,
                             "tune.space": {"distill.alpha": {"uniform": [0.0, 0.9]}}})
    assert cfg.data.path == str(tmp_path / "digits")
    report = run_sweep(cfg, tmp_path / "sweep")
    console = capsys.readouterr().out
    assert "streamed from Parquet" in console  # the trials read it through Ray Data
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "sweep" / "results.parquet").to_pylist()
    assert len(rows) == 2 and rows[0]["distill.alpha"] == 0.0 < rows[1]["distill.alpha"]  # label-only, then a sample
    trial_lines = [line for line in console.splitlines() if line.startswith("[raydistill] trial ")]
    assert len(trial_lines) == 2 and all("test accuracy" in line and "distill.alpha=" in line for line in trial_lines)
    epochs = cfg.distill.epochs + cfg.prune.epochs + cfg.prune.finetune_epochs
    n = report["train_samples"]
    assert all(r["completed"] for r in rows)
    for r in rows:  # the label-only trials never ask their teacher
        assert r["teacher_forward_samples"] == (epochs * n if r["distill.alpha"] > 0 else 0)
    assert report["teacher_forward_samples"] == epochs * n


@pytest.mark.ray
def test_a_sweep_whose_every_trial_failed_on_bad_input_exits_2(ray_local, tmp_path, tiny_teacher, capsys):
    """Every student diverges (learning rate 1e30): each trial's console line names its error, results.csv keeps
    it, no best_config.yaml is written, and the command exits with one line, status 2 as for bad input in
    `raydistill run` (it exited 0 before, so a script could not tell a sweep that found nothing from one that
    worked)."""
    from raydistill import cli

    settings = {**SWEEP, "teacher.checkpoint": tiny_teacher, "tune.teacher_mode": "inprocess", "tune.num_trials": 1,
                "tune.scheduler": "none", "distill.epochs": 1, "distill.lr": 1e30,
                "tune.space": {"distill.alpha": {"uniform": [0.0, 0.9]}}}
    argv = ["tune", "--out", str(tmp_path)]
    argv += [a for k, v in settings.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    code = cli.main(argv)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("raydistill: error:")]
    assert code == 2 and len(errors) == 1, captured.err[-3000:]
    assert errors[0].startswith("raydistill: error: the sweep's only trial failed: loss became nan")
    failed = [line for line in captured.out.splitlines()
              if line.startswith("[raydistill] trial ") and " failed: " in line]
    assert failed and all("at step" in line for line in failed), captured.out[-3000:]
    import pyarrow.csv as pacsv

    rows = pacsv.read_csv(tmp_path / "results.csv").to_pylist()
    assert len(rows) == 1 and all(r["error"] and "at step" in r["error"] and r["bad_input"] for r in rows)
    assert not (tmp_path / "best_config.yaml").exists()
    assert "Traceback" not in captured.err


def _finished_trials(out: Path) -> dict[str, int]:
    """trial dir -> number of result lines, for trials whose last report carried test metrics."""
    found = {}
    for f in out.glob("tune/*/*/result.json"):
        lines = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if lines and lines[-1].get("evaluated"):
            found[f.parent.name] = len(lines)
    return found


@pytest.mark.ray
def test_interrupted_sweep_resumes_keeping_finished_trials(tmp_path, tiny_teacher):
    # one trial at a time, five trials of one epoch per phase: stopped after the first, resumed for the rest.
    # Five, not two: a trial's result.json shows its last line a moment after the trial ends, and Tune takes a
    # moment to act on Ctrl-C; under load the second trial was seen finished by the time Ctrl-C landed, and with
    # reused trial processes (~1 s a trial) all three of three once were (a fresh clone's `.ci/run`, 2026-12-04).
    trials = 5
    # (each trial's teacher in process: no logit cache to build first; what is tested is the sweep's resume)
    settings = {**SWEEP, "tune.max_concurrent": 1, "tune.scheduler": "none", "tune.num_trials": trials,
                "distill.epochs": 1, "teacher.checkpoint": tiny_teacher, "tune.teacher_mode": "inprocess"}
    args = [sys.executable, "-m", "raydistill.cli", "tune", "--out", str(tmp_path), "--quiet"]
    for k, v in settings.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    log = tmp_path / "first.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=ctrl_c_default)
    deadline = time.time() + 400
    while time.time() < deadline and not _finished_trials(tmp_path):
        assert proc.poll() is None, f"the sweep ended before it could be interrupted:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    before = _finished_trials(tmp_path)
    assert before, "no trial finished in time"
    os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(_finished_trials(tmp_path)) < trials, "the sweep finished before the interrupt"

    # the resumed sweep's processes (its private Ray's included) get a TMPDIR of their own, to see what they leave
    tmp = Path(tempfile.mkdtemp(prefix="rd", dir="/tmp"))  # short: Ray's unix socket paths must stay < 108 chars
    try:
        out = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "TMPDIR": str(tmp)})
        assert out.returncode == 0, out.stderr[-2000:]
        for noise in ("Configuration for experiment", "View detailed results", "To visualize your results",
                      "core_worker.cc"):  # Tune's output engine and Ray's core worker stay quiet (--verbose shows)
            assert noise not in out.stdout + out.stderr, noise
        # every trial's per-epoch checkpoints were copied into the sweep's storage and their temporary folders removed
        assert not list(tmp.glob("raydistill-ckpt-*")), "checkpoint folders left in the trials' TMPDIR"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    after = _finished_trials(tmp_path)
    assert len(after) == trials
    for trial, n_lines in before.items():
        assert after[trial] == n_lines  # finished trials were kept, not run again
