"""Real faults during a real run: Ctrl-C, a Train worker killed by pid, the teacher actor killed by pid."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

# Enough epochs (full digits, ~1 s each) that the faults land mid-stage.
ARGS = {"teacher.epochs": 3, "teacher.kwargs": {"widths": [16, 32], "hidden": 64}, "distill.epochs": 8,
        "prune.epochs": 4, "prune.finetune_epochs": 4, "quantize.scheme": "none"}


def _cmd(out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "raydistill.cli", "run", "--out", str(out)]
    for k, v in ARGS.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    return cmd


def _journal(out: Path) -> list[dict]:
    path = out / "journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _wait(pred, proc, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_ctrl_c_then_resume_through_worker_and_teacher_deaths(tmp_path):
    out = tmp_path / "run"
    log1 = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_cmd(out), stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    stages = out / "stages.json"
    _wait(lambda: stages.exists() and "teacher" in json.loads(stages.read_text()), proc, 400, "the teacher stage")

    # 1. Ctrl-C: a clean stop within seconds, no half-written files
    t0 = time.time()
    os.kill(proc.pid, signal.SIGINT)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("Ctrl-C did not stop the run within 60 s")
    assert rc == 130, (tmp_path / "first.log").read_text()[-2000:]
    stop_s = time.time() - t0
    partial = [p for p in out.rglob("*.tmp") if "ray_train" not in p.parts]
    assert not partial, partial
    teacher_bytes = (out / "teacher.pt").read_bytes()

    # 2. the same command resumes; kill a Train worker and then the teacher actor, by pid
    log2 = open(tmp_path / "second.log", "w")
    proc = subprocess.Popen(_cmd(out), stdout=log2, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        kd = lambda: [e for e in _journal(out) if e["stage"] == "student_kd"]  # noqa: E731
        _wait(lambda: len(kd()) >= 2, proc, 400, "two KD epochs")
        victim = kd()[-1]["pid"]
        os.kill(victim, signal.SIGKILL)  # the rank-0 Ray Train worker, mid-stage

        pruned = lambda: [e for e in _journal(out) if e["stage"] == "student_pruned"]  # noqa: E731
        _wait(lambda: len(pruned()) >= 1, proc, 400, "the first prune epoch")
        teacher_pid = json.loads((out / "teacher_server.json").read_text())["pid"]
        os.kill(teacher_pid, signal.SIGKILL)  # the shared teacher actor, while workers are asking it

        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "second.log").read_text()
    assert rc == 0, text[-3000:]
    assert "stage teacher: up to date, skipped" in text  # finished stages are not redone
    assert (out / "teacher.pt").read_bytes() == teacher_bytes
    report = json.loads((out / "report.json").read_text())
    assert {"student_kd", "student_pruned"} <= set(report["models"])

    epochs = [e["epoch"] for e in kd()]
    assert sorted(set(epochs)) == list(range(ARGS["distill.epochs"]))  # every epoch done ...
    assert len(epochs) - len(set(epochs)) <= 1  # ... and at most one redone after the worker died
    assert len({e["pid"] for e in kd()}) >= 2  # a new worker process took over
    print(f"Ctrl-C stopped the run in {stop_s:.1f} s")
