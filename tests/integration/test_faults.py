"""Real faults during a real run: Ctrl-C, a Train worker killed by pid, the teacher actor killed by pid; and, in
Ray Train's local mode, the whole process killed mid-stage."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

# Full digits (an epoch takes ~1 s) and enough KD epochs that both kills land mid-stage. Two Train workers: this
# test is about worker processes dying (local mode has none; see the last test). No pruning stage: the teacher actor
# is killed during KD, which asks it the same way, so a prune stage would only add a third Train start-up.
ARGS = {"teacher.epochs": 1, "teacher.kwargs": {"widths": [16, 32], "hidden": 64}, "distill.epochs": 6,
        "prune.ratio": 0.0, "quantize.scheme": "none", "scale.num_workers": 2}


def _cmd(out: Path, args: dict = ARGS) -> list[str]:
    cmd = [sys.executable, "-m", "raydistill.cli", "run", "--out", str(out)]
    for k, v in args.items():
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
    # the teacher and the baseline train side by side on two workers each, then the teacher actor starts (it
    # writes teacher_server.json) and the KD stage's Train run begins: Ctrl-C it there
    _wait(lambda: (out / "teacher_server.json").exists(), proc, 400, "the teacher actor after teacher and baseline")

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
    assert {"teacher", "student_baseline"} <= set(json.loads((out / "stages.json").read_text()))
    teacher_bytes, baseline_bytes = (out / "teacher.pt").read_bytes(), (out / "student_baseline.pt").read_bytes()
    first_run_kd = len([e for e in _journal(out) if e["stage"] == "student_kd"])  # KD epochs before Ctrl-C (0 or so)

    # 2. the same command resumes; kill a Train worker mid-KD and then, while the restarted workers are asking
    # it, the teacher actor, by pid
    log2 = open(tmp_path / "second.log", "w")
    proc = subprocess.Popen(_cmd(out), stdout=log2, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        kd = lambda: [e for e in _journal(out) if e["stage"] == "student_kd"][first_run_kd:]  # noqa: E731
        _wait(lambda: len(kd()) >= 2, proc, 400, "two KD epochs")
        victim = kd()[-1]["pid"]
        os.kill(victim, signal.SIGKILL)  # the rank-0 Ray Train worker, mid-stage

        _wait(lambda: kd()[-1]["pid"] != victim, proc, 400, "a KD epoch by the restarted worker")
        teacher_pid = json.loads((out / "teacher_server.json").read_text())["pid"]
        os.kill(teacher_pid, signal.SIGKILL)  # the shared teacher actor, while workers are asking it

        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "second.log").read_text()
    assert rc == 0, text[-3000:]
    # finished stages are not redone
    assert "stage teacher: up to date, skipped" in text and "stage student_baseline: up to date, skipped" in text
    assert (out / "teacher.pt").read_bytes() == teacher_bytes
    assert (out / "student_baseline.pt").read_bytes() == baseline_bytes
    report = json.loads((out / "report.json").read_text())
    assert "student_kd" in report["models"]

    epochs = [e["epoch"] for e in kd()]
    assert sorted(set(epochs)) == list(range(min(epochs), ARGS["distill.epochs"]))  # every epoch done ...
    assert min(epochs) <= first_run_kd  # (resumed from at most the epoch the Ctrl-C stopped)
    assert len(epochs) - len(set(epochs)) <= 1  # ... and at most one redone after the worker died
    assert len({e["pid"] for e in kd()}) >= 2  # a new worker process took over
    after_teacher_kill = [e for e in kd() if e["pid"] != victim][1:]
    assert after_teacher_kill, "no KD epoch finished after the teacher actor was killed"
    print(f"Ctrl-C stopped the run in {stop_s:.1f} s")


def test_local_mode_resumes_after_the_process_is_killed(tmp_path):
    """Local mode (the default on a laptop): the training loop is this process. SIGKILL it (and the Ray it
    started) mid-KD; the same command resumes KD from its last epoch checkpoint, redoing at most one epoch."""
    args = {**ARGS, "scale.num_workers": 0, "distill.epochs": 12, "prune.ratio": 0.0}
    out = tmp_path / "run"
    log1 = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_cmd(out, args), stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    kd = lambda: [e for e in _journal(out) if e["stage"] == "student_kd"]  # noqa: E731
    try:
        _wait(lambda: len(kd()) >= 3, proc, 400, "three KD epochs")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and the Ray processes it started, mid-stage
        proc.wait(timeout=60)
    killed_pid, done_before = kd()[-1]["pid"], {e["epoch"] for e in kd()}
    assert killed_pid == proc.pid  # local mode: the loop ran in the command's own process

    res = subprocess.run(_cmd(out, args), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "stage teacher: up to date, skipped" in res.stdout
    epochs = [e["epoch"] for e in kd()]
    assert sorted(set(epochs)) == list(range(args["distill.epochs"]))  # every epoch done ...
    resumed = [e for e in kd() if e["pid"] != killed_pid]
    assert min(e["epoch"] for e in resumed) >= max(done_before) - 1  # ... resumed, not restarted
    assert len(epochs) - len(set(epochs)) <= 1  # at most one epoch redone
    assert json.loads((out / "report.json").read_text())["config"]["scale"]["num_workers"] == 0
