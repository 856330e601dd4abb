"""Real faults during a real run on two Ray Train workers: Ctrl-C, a Train worker killed by pid, the teacher actor
killed by pid. (Local mode, where the training loop is the command's own process, killed mid-stage and resumed:
tests/integration/test_streaming.py, on streamed data.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from smoke import ctrl_c_default

pytestmark = pytest.mark.ray

# Full digits (an epoch takes ~1 s) and enough KD epochs that both kills land mid-stage. Two Train workers: this
# test is about worker processes dying (local mode has none; see the module docstring). The teacher is given
# (tests/conftest.py's tiny_teacher): its training would be one more 2-worker Train run beside the baseline's, and
# what is tested is the stages that ask it. No pruning stage: the teacher actor is killed during KD, which asks it
# the same way, so a prune stage would only add another Train start-up.
ARGS = {"distill.epochs": 6, "prune.ratio": 0.0, "quantize.scheme": "none", "scale.num_workers": 2}


def _cmd(out: Path, teacher: str) -> list[str]:
    cmd = [sys.executable, "-m", "raydistill.cli", "run", "--out", str(out)]
    for k, v in {**ARGS, "teacher.checkpoint": teacher}.items():
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


def test_ctrl_c_then_resume_through_worker_and_teacher_deaths(tmp_path, tiny_teacher):
    out = tmp_path / "run"
    log1 = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_cmd(out, tiny_teacher), stdout=log1, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=ctrl_c_default)
    # the baseline trains on two workers, then the teacher actor starts (it writes teacher_server.json) and the KD
    # stage's Train run begins: Ctrl-C it there
    _wait(lambda: (out / "teacher_server.json").exists(), proc, 400, "the teacher actor after the baseline")

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
    assert "student_baseline" in json.loads((out / "stages.json").read_text())
    baseline_bytes = (out / "student_baseline.pt").read_bytes()
    first_run_kd = len([e for e in _journal(out) if e["stage"] == "student_kd"])  # KD epochs before Ctrl-C (0 or so)

    # 2. the same command resumes; kill a Train worker mid-KD and then, while the restarted workers are asking
    # it, the teacher actor, by pid
    log2 = open(tmp_path / "second.log", "w")
    proc = subprocess.Popen(_cmd(out, tiny_teacher), stdout=log2, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=ctrl_c_default)
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
    assert "stage student_baseline: up to date, skipped" in text
    # the console: the killed worker and the restart, one line each (Ray's ~900-character message only --verbose)
    assert f"[raydistill] Ray: worker process {victim} died (" in text, text[-3000:]
    assert "stage student_kd: Train worker failed (" in text and "; restarting its workers from the last epoch " \
        "checkpoint (restart 1 of 2)" in text, text[-3000:]
    assert "Lease ID" not in text and "Traceback" not in text, text[-3000:]
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


COUNTING_MODEL = '''
import os

from raydistill.models import cnn


def counted_cnn(**kwargs):
    """The built-in cnn; every process that builds it appends its pid to the file the test names."""
    with open(os.environ["RAYDISTILL_TEST_BUILDS"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    return cnn(**kwargs)
'''


def test_bad_input_in_a_two_worker_stage_is_not_retried(tmp_path, tiny_teacher):
    """A NaN loss from the learning rate fails the same way on every try: the stage's workers are not restarted
    (Ray Train's own FailureConfig would have restarted them scale.max_failures = 2 times first), and the command
    ends with the one-line error. Counted by the processes that built the student: the command's own and the two
    Train workers of one attempt (three attempts: six workers)."""
    (tmp_path / "countmodels.py").write_text(COUNTING_MODEL)
    builds = tmp_path / "builds.txt"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "RAYDISTILL_TEST_BUILDS": str(builds)}
    sets = {**ARGS, "teacher.checkpoint": tiny_teacher, "student.model": "countmodels:counted_cnn",
            "student.kwargs": {"widths": [8, 16], "hidden": 32}, "distill.lr": 1e30, "data.limit": 200}
    cmd = [sys.executable, "-m", "raydistill.cli", "run", "--out", str(tmp_path / "run")]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    errors = [line for line in err.splitlines() if line.startswith("raydistill:")]
    assert proc.returncode == 2 and len(errors) == 1 and "loss became nan" in errors[0], out[-2000:] + err[-3000:]
    assert "restarting its workers" not in out and "Traceback" not in err, out[-2000:] + err[-2000:]
    workers = set(builds.read_text().split()) - {str(proc.pid)}
    assert len(workers) == 2, f"the student was built in {len(workers)} worker processes: {sorted(workers)}"


# The command's own Ctrl-C handling (raydistill/cli.py: main, exit_at_once) with a thread still inside Ray's core
# worker when the main thread is interrupted, as a stage's helper thread is (Train's ray.get on its controller, the
# progress printer's queue poll). Through ``ray.shutdown()`` that thread made Ray end the process with status 1
# ("The core worker has already been shutdown ... The process will exit"): every time in this test, once in a
# full suite's 2-worker Ctrl-C test above.
INSIDE_RAY = '''
import argparse, faulthandler, pathlib, signal, sys, threading, time
import ray
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for every thread's stack if Ctrl-C hangs
import raydistill.cli as cli
from raydistill import cluster

def blocked(args):
    cluster.init_ray(None, quiet=True, dashboard=False)  # the command's own private Ray, as `raydistill run` starts it
    ray.get([ray.remote(lambda: 0).remote() for _ in range(2)])  # worker processes of its own
    core_worker = ray._private.worker.global_worker.core_worker
    def inside_ray():
        while True:
            core_worker.get_current_task_id()
            time.sleep(0.001)
    threading.Thread(target=inside_ray, daemon=True).start()
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    children = [pid for pid, ppid in map(parent, pathlib.Path("/proc").glob("[0-9]*/stat")) if ppid == raylet]
    print("ready", raylet, *children, flush=True)  # (the raylet's children: its agents and workers)
    threading.Event().wait()

def parent(stat):
    try:
        return int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError):  # ended meanwhile
        return 0, 0

parser = argparse.ArgumentParser()
parser.set_defaults(func=blocked, debug=False)
cli.build_parser = lambda: parser  # the command's main() and its handlers, around a command that blocks in Ray
sys.argv = ["raydistill"]
sys.exit(cli.main())
'''


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie left to a parent that does not reap
    except FileNotFoundError:
        return True


def test_ctrl_c_exits_130_while_a_thread_is_inside_ray(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", INSIDE_RAY], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=ctrl_c_default, start_new_session=True)
    try:
        seen = [proc.stdout.readline()]
        while seen[-1] and not seen[-1].startswith("ready "):  # (Ray's own start-up lines)
            seen.append(proc.stdout.readline())
        first = seen[-1]
        assert first.startswith("ready "), "".join(seen)[-2000:] + proc.communicate(timeout=60)[0][-2000:]
        raylet, *children = map(int, first.split()[1:])
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # (seen once in a suite, not understood): say where every thread is
            proc.send_signal(signal.SIGUSR1)
            time.sleep(3)
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("Ctrl-C did not end the command within 60 s; its threads then:\n"
                                 + proc.communicate(timeout=60)[0][-6000:]) from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, out[-2000:]
    assert out.strip().splitlines()[-1] == "raydistill: interrupted; rerun the same command to resume", out[-2000:]
    assert len(children) >= 3, children  # the dashboard and runtime-env agents, workers
    # the command's private Ray ends with it: its raylet (Ray's fate sharing) and the raylet's children (killed
    # once the command has exited: cli._end_private_ray_workers; left alone they took up to a minute)
    deadline = time.time() + 10
    while not all(map(_gone, [raylet, *children])) and time.time() < deadline:
        time.sleep(0.2)
    left = [pid for pid in [raylet, *children] if not _gone(pid)]
    assert not left, f"Ray processes {left} of the interrupted command's private Ray are still running"
