"""Ray Train local mode (the laptop default): a console a person can read, and reproducible results."""

import json
import os
import subprocess
import sys

import pytest
from smoke import SMOKE, ray_address_file

from raydistill import config
from raydistill.pipeline import run

pytestmark = pytest.mark.ray

SMOKE_ARGS = [a for k, v in SMOKE.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "raydistill.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def _epoch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "] epoch " in line]


def test_default_run_console_is_one_line_per_event(tmp_path):
    """No Ray internals (TrainingReport lines, worker prefixes, core-worker warnings), one line per epoch,
    and the run ends with the report table and the path of report.md.

    The run goes with a stale cluster address file in place: a crashed `ray start` leaves Ray's
    `ray_current_cluster` file behind (plain `ray.init()` would follow it and fail); `raydistill run` with no
    address starts its own private Ray and says so."""
    with ray_address_file("127.0.0.1:1"):  # nothing listens there
        res = _cli("run", "--out", str(tmp_path / "run"), *SMOKE_ARGS, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "on a private local Ray" in res.stdout
    text = res.stdout + res.stderr
    for noise in ("TrainingReport", "Reporting training result", "Reported metrics", "RayTrainWorker",
                  "core_worker.cc", "PYTHON worker processes", "Started a local Ray instance", "Traceback"):
        assert noise not in text, noise
    epochs = _epoch_lines(res.stdout)
    assert epochs and len(epochs) == len(set(epochs))  # no progress line twice
    for stage in ("teacher", "student_baseline", "student_kd", "student_pruned"):
        assert any(line.startswith(f"[{stage}] epoch ") for line in epochs), stage
    assert "Ray Train local mode" in res.stdout
    # Ray starts beside the teacher's training: announced before the teacher's first epoch, its readiness after
    # the teacher's last and before the next stage
    lines = res.stdout.splitlines()
    starting = next(i for i, line in enumerate(lines) if "Ray Train local mode" in line)
    assert lines[starting].endswith("on a private local Ray starting beside the teacher (pass --address to use a "
                                    "running cluster)"), lines[starting]
    teacher = [i for i, line in enumerate(lines) if line.startswith("[teacher] epoch ")]
    ready = next(i for i, line in enumerate(lines) if line.startswith("[raydistill] private local Ray ready in "))
    baseline = lines.index("[raydistill] stage student_baseline: training cnn (Ray Train local mode)")
    assert starting < teacher[0] and teacher[-1] < ready < baseline, lines[starting:baseline + 1]
    timings = json.loads((tmp_path / "run" / "report.json").read_text())["timings"]
    assert timings["ray_start"]["beside"] == "teacher" and timings["ray_start"]["waited"] >= 0
    assert "| ray_start (beside the teacher; waited " in (tmp_path / "run" / "report.md").read_text()
    tail = res.stdout.strip().splitlines()
    assert tail[-1] == f"report: {tmp_path / 'run' / 'report.md'}"
    assert tail[-8].startswith("| model |") and any(line.startswith("| student_pruned |") for line in tail[-8:])

    quiet = _cli("run", "--quiet", "--out", str(tmp_path / "run"), *SMOKE_ARGS, cwd=tmp_path)  # resumes: all done
    assert quiet.returncode == 0 and quiet.stdout.splitlines()[0].startswith("| model |"), quiet.stdout
    assert all(line.startswith("|") for line in quiet.stdout.strip().splitlines()), quiet.stdout
    # every stage was up to date: the rerun started no Ray (neither its own nor one that a Ray call starts by itself)
    assert "ray_start" not in json.loads((tmp_path / "run" / "report.json").read_text())["timings"]
    assert "Started a local Ray" not in quiet.stderr and "Traceback" not in quiet.stderr, quiet.stderr
    again = _cli("run", "--out", str(tmp_path / "run"), *SMOKE_ARGS, cwd=tmp_path)
    assert again.returncode == 0 and "all are up to date, so this rerun starts no Ray" in again.stdout, again.stdout
    assert "private local Ray" not in again.stdout and "Started a local Ray" not in again.stderr, again.stderr

    # cache-logits in the same folder: in local mode on in-memory data this process runs the teacher pass too, so
    # the command starts no Ray (it started one, and a Ray Data actor pool on it, for a pass of milliseconds)
    cache = _cli("cache-logits", "--out", str(tmp_path / "run"), *SMOKE_ARGS, cwd=tmp_path)
    assert cache.returncode == 0, cache.stdout[-2000:] + cache.stderr[-3000:]
    lines = cache.stdout.splitlines()
    assert "the logit cache's teacher pass too; this command starts no Ray" in lines[1], lines
    assert any(line.startswith("[raydistill] logit cache: one teacher pass over 200 samples x 1 view(s) (none) in "
                               "this process (local mode)") for line in lines), lines
    assert lines[-1].startswith(f"logit cache {tmp_path / 'run' / 'logit_cache'}: "), lines
    assert "private local Ray" not in cache.stdout and "Started a local Ray" not in cache.stderr, cache.stderr
    assert "Traceback" not in cache.stderr, cache.stderr


@pytest.mark.parametrize("mode", ["cache", "inprocess"])
def test_a_local_run_whose_teacher_needs_no_actor_starts_no_ray(mode, ray_local, tmp_path, tiny_teacher):
    """Local mode on in-memory data with the cached or the in-process teacher: nothing left for Ray to do (the
    cache is built and read here, the teacher runs here), so `raydistill run` starts none, and hands the students'
    start weights (the teacher's tensors, the chosen student to prune, the factorized one) over as they are. The
    same config run here, in this session's Ray (the object store in between, as before), gives the same
    accuracies. (The run also sets a deploy bound that its student misses: the command finishes every stage and the
    report, exports nothing, and ends with one line and exit status 3.)"""
    sets = {**SMOKE, "teacher.checkpoint": tiny_teacher, "distill.teacher_mode": mode,
            "student.init_from_teacher": True, "lowrank.rank": 8, "lowrank.finetune_epochs": 1,
            "deploy.min_accuracy": 1.0}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    res = _cli("run", "--out", str(tmp_path / "cli"), *args, cwd=tmp_path)
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr[-3000:]
    gate = [line for line in res.stderr.splitlines() if line.startswith("raydistill: deploy gate failed: ")]
    assert len(gate) == 1 and "is below deploy.min_accuracy 1.000 by " in gate[0], res.stderr[-3000:]
    assert gate[0].endswith("; not exported (exit status 3)"), gate
    assert res.stdout.strip().splitlines()[-1] == f"report: {tmp_path / 'cli' / 'report.md'}", res.stdout[-2000:]
    assert not (tmp_path / "cli" / "deploy").exists()
    assert "this command starts no Ray" in res.stdout.splitlines()[1], res.stdout[:1000]
    assert "private local Ray" not in res.stdout and "Started a local Ray" not in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    alone = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert "ray_start" not in alone["timings"] and "student_lowrank" in alone["models"]
    with_ray = run(config.load(None, sets), tmp_path / "in_ray", quiet=True)  # ray.put and ray.get between stages
    assert {n: m["accuracy"] for n, m in alone["models"].items()} == \
        {n: m["accuracy"] for n, m in with_ray["models"].items()}


def test_a_run_whose_stdout_is_closed_stops_quietly(tmp_path):
    """`raydistill run ... | head -1`: when the reader of stdout goes away, the command stops as one killed by
    SIGPIPE does (exit 141), with no traceback and no "this is a bug" line; the same command resumes."""
    proc = subprocess.Popen([sys.executable, "-m", "raydistill.cli", "run", "--out", str(tmp_path / "run"),
                             *SMOKE_ARGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        first = proc.stdout.readline()
        proc.stdout.close()  # the reader is gone: the command's next line meets a broken pipe
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert first.startswith("[raydistill] data digits") and rc == 141, (first, rc, err[-2000:])
    assert "Traceback" not in err and "bug" not in err, err[-2000:]


def test_local_mode_is_reproducible(ray_local, tmp_path, tiny_teacher, capsys):
    """Same config, same seed, two run folders: the same accuracies for every model. Both runs are quiet: in
    local mode the loop runs in this process, so not one epoch line reaches its stdout."""
    cfg = config.load(None, {**SMOKE, "teacher.checkpoint": tiny_teacher})
    assert cfg.scale.num_workers is None  # auto: local mode for a run that starts its own Ray
    first, second = run(cfg, tmp_path / "a", quiet=True), run(cfg, tmp_path / "b", quiet=True)
    printed = capsys.readouterr().out
    assert "] epoch " not in printed and "stage " not in printed, printed[-2000:]
    assert first["config"]["scale"]["num_workers"] == 0
    accuracies = {name: m["accuracy"] for name, m in first["models"].items()}
    assert accuracies == {name: m["accuracy"] for name, m in second["models"].items()}


def test_a_private_local_ray_collects_no_metrics_and_prestarts_no_workers(ray_local):
    """`cluster.init_ray` starts a private Ray (this session's, tests/conftest.py) with metrics collection off:
    with it on, the driver's exit waited 10 s on a failed metrics export in 4 of 8 default runs
    (docs/benchmarks.md); and with no idle workers prestarted for the driver (they competed with the teacher's
    training and kept polling: cluster.py). The cluster's system config, as the GCS holds it, is what every
    process got."""
    from ray._private.state import state

    from raydistill import cluster

    system_config = state.get_system_config()
    assert system_config.get("enable_metrics_collection") is False
    assert system_config.get("prestart_worker_first_driver") is False
    # a Ray this process started is local: a later run here (or a script's own plain ray.init()) is not on a cluster
    assert cluster.ray_in_process() == "local" and not cluster.joins_cluster(None)


def test_a_private_local_ray_waits_longer_for_its_dashboard(ray_local, monkeypatch):
    """Ray fails ray.init when a local dashboard has not published its address within 60 s, which a loaded 2-core
    machine exceeded (cluster.DASHBOARD_START_TIMEOUT_S); a private start waits longer, unless the user set Ray's own
    variable."""
    from ray._private import ray_constants

    from raydistill import cluster

    assert "RAY_DASHBOARD_STARTUP_TIMEOUT_S" not in os.environ  # this session's Ray came up with raydistill's limit
    assert ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S == cluster.DASHBOARD_START_TIMEOUT_S > 60
    monkeypatch.setattr(ray_constants, "RAY_DASHBOARD_STARTUP_TIMEOUT_S", 60)
    monkeypatch.setenv("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "60")
    cluster._wait_longer_for_the_dashboard()
    assert ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S == 60  # the user's setting stands
