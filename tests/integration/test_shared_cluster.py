"""Several commands on one shared Ray cluster (a real `ray start --head` with token auth, real `ray job submit` and
`ray job stop`), never breaking each other: two runs of the same teacher side by side, one of them stopped mid-KD
and resubmitted; two runs building one logit cache at the same moment; a second command into a live run's folder;
and a worker whose teacher actor is gone.

Every run trains in Ray Train's local mode (``scale.num_workers=0``): what is tested is what the commands do to
each other on the cluster (the teacher actor, the run folder, the cache), not data-parallel workers.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from shared_head import pids_naming, ray_head
from smoke import ray_address_file, tracebacks

from raydistill.locks import RUN_LOCK, FileLock

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
# ~0.1 s each on a quiet machine: job A's stop lands ~0.1-0.3 s after it is sent (A then takes ~3 s to exit), and
# it must land before A's last KD epoch. B is paused across the stop and needs no margin of its own.
KD_EPOCHS = 30


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    with ray_head(tmp_path_factory.mktemp("head")) as h:
        yield h


def _sets(args: dict) -> list[str]:
    return [w for k, v in args.items() for w in ("--set", f"{k}={json.dumps(v)}")]


def _run_args(teacher: str, **extra) -> list[str]:
    """A small run of the bundled digits data (full size: a KD epoch takes long enough to stop the job in it)."""
    return _sets({"teacher.checkpoint": teacher, "scale.num_workers": 0, "distill.epochs": KD_EPOCHS,
                  "prune.ratio": 0.0, "quantize.scheme": "none", **extra})


def _journal(out: Path, stage: str = "student_kd") -> list[dict]:
    path = out / "journal.jsonl"
    if not path.exists():
        return []
    return [e for e in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
            if e["stage"] == stage]


def _wait(pred, what: str, timeout: float, alive=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        assert alive is None or alive(), f"ended before {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _popen(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as sink:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, f"{shlex.join(proc.args)} exited with {proc.returncode}:\n{text[-4000:]}"
    return text


def _complete_report(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert {"teacher", "student_baseline", "student_kd"} <= set(report["models"]), report["models"].keys()
    assert (out / "report.md").is_file() and (out / "manifest.json").is_file()
    return report


def _preloaded_ray_cli(argv: list[str], env: dict) -> subprocess.Popen:
    """The `ray` command line (ray.scripts.scripts.main, what the `ray` executable runs), its imports done, running
    ``argv`` when a line arrives on its stdin: the command then lands within a KD epoch, not after Ray's imports."""
    code = ("import sys; from ray.scripts.scripts import main; sys.stdin.readline(); "
            f"sys.argv = {['ray', *argv]!r}; main()")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_job_stop_mid_kd_then_resubmit_beside_a_run_of_the_same_teacher(head, tiny_teacher, tmp_path):
    """Run B (`raydistill run --address`) and job A (`ray job submit`) use the same teacher at once. A is stopped
    with `ray job stop` while both are mid-KD: A stops within seconds and B goes on (it finishes a KD epoch, asking
    its teacher actor, after A's driver is gone). Resubmitted, A resumes KD from its last epoch checkpoint (at most
    one epoch redone) while B completes; both reports are complete.

    B starts when A's job driver does, not before A is submitted: a job's start-up (submission, its supervisor,
    the working dir) is slower than a command's, and a B started first had finished all its KD epochs 4 s before
    A's first one (measured on a quiet machine, 12 epochs of ~0.4 s). Started together with the same budget, and
    the first into KD paused until the other is in it too (under load their start-ups differ by more than a KD
    stage), each is in KD while the other is, and A is stopped only once both are in it."""
    a, b = tmp_path / "a", tmp_path / "b"
    args = _run_args(tiny_teacher)
    submit = ["ray", "job", "submit", "--address", head.dashboard, "--working-dir", str(REPO)]
    stopper = _preloaded_ray_cli(["job", "stop", "--address", head.dashboard, "rd-a-1"], head.env)
    run_b = None
    try:
        first = subprocess.run([*submit, "--no-wait", "--submission-id", "rd-a-1", "--", "raydistill", "run", "--out",
                                str(a), *args], env=head.env, capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stdout + first.stderr
        _wait(lambda: pids_naming(str(a)), "job A's driver to start", 300)  # its command line names its --out
        run_b = _popen([sys.executable, "-m", "raydistill.cli", "run", "--address", head.gcs, "--out", str(b), *args],
                       head.env, tmp_path / "b.log")
        b_alive = lambda: run_b.poll() is None  # noqa: E731
        # 0. both in KD at once, whatever the load: the first one into KD is paused (SIGSTOP, its training loop is
        # its own process in local mode) until the other has a KD epoch too. Left to themselves, B once finished
        # all its KD epochs before A's second one (the suite on two pytest workers: A's job start-up was slower).
        _wait(lambda: _journal(a) or _journal(b), "a KD epoch of job A or run B", 400, b_alive)
        if not (_journal(a) and _journal(b)):
            leader = (_journal(a) or _journal(b))[-1]["pid"]
            os.kill(leader, signal.SIGSTOP)
            try:
                _wait(lambda: _journal(a) and _journal(b), "the other one's first KD epoch", 400, b_alive)
            finally:
                os.kill(leader, signal.SIGCONT)
        # 1. `ray job stop` while A and B are both in KD: A's driver is gone within seconds; B goes on. B is paused
        # across the stop, so that it is still mid-KD when A's driver is gone and its next epoch asks its teacher
        # after that. Left running, B did not: alone, its last KD epoch came 2.6 s after the stop was sent and A's
        # driver was gone after 3.5 s (2026-12-05), so `B goes on` was checked on epochs before A's exit.
        _wait(lambda: len(_journal(a)) >= 2 and _journal(b), "two KD epochs of job A and one of run B", 400, b_alive)
        driver_a = _journal(a)[-1]["pid"]
        os.kill(run_b.pid, signal.SIGSTOP)
        try:
            b_at_stop = len(_journal(b))
            t0 = time.time()
            stop_out, _ = stopper.communicate("\n", timeout=120)
            assert stopper.returncode == 0, stop_out
            _wait(lambda: not Path(f"/proc/{driver_a}").exists(), "job A's driver to exit", 30)
            stop_s = time.time() - t0
        finally:
            os.kill(run_b.pid, signal.SIGCONT)
        done_before = {e["epoch"] for e in _journal(a)}
        assert len(done_before) < KD_EPOCHS, "job A finished KD before it was stopped"
        assert b_at_stop < KD_EPOCHS  # B was mid-KD when A was stopped ...
        # ... and went on: it finishes another KD epoch after A's driver is gone
        _wait(lambda: len(_journal(b)) > b_at_stop, "a KD epoch of run B after job A's stop", 120, b_alive)
        status = subprocess.run(["ray", "job", "status", "--address", head.dashboard, "rd-a-1"], env=head.env,
                                capture_output=True, text=True, timeout=120)
        assert "Job 'rd-a-1' was stopped" in status.stdout + status.stderr, status.stdout + status.stderr

        # 2. resubmitted, A resumes; B, beside it, completes
        resubmit = subprocess.run([*submit, "--submission-id", "rd-a-2", "--", "raydistill", "run", "--out", str(a),
                                   *args], env=head.env, capture_output=True, text=True, timeout=600)
        text_a = resubmit.stdout + resubmit.stderr
        assert resubmit.returncode == 0 and "Job 'rd-a-2' succeeded" in text_a, text_a[-4000:]
        text_b = _finish(run_b, tmp_path / "b.log")
    finally:
        for proc in (run_b, stopper):
            if proc is not None and proc.poll() is None:
                proc.kill()

    assert "stage student_baseline: up to date, skipped" in text_a
    kd_a = _journal(a)
    epochs = [e["epoch"] for e in kd_a]
    assert sorted(set(epochs)) == list(range(KD_EPOCHS))  # every epoch done ...
    resumed = [e["epoch"] for e in kd_a if e["pid"] != driver_a]
    assert min(resumed) >= max(done_before) - 1 and len(epochs) - len(set(epochs)) <= 1  # ... at most one redone
    _complete_report(a)
    _complete_report(b)
    assert {e["pid"] for e in _journal(b)} == {run_b.pid}  # B's KD ran once, in B, undisturbed
    assert not tracebacks({"b": text_b}), tracebacks({"b": text_b})
    assert not (b / RUN_LOCK).exists()
    print(f"ray job stop: job A's driver was gone {stop_s:.1f} s after the stop command ran")


def test_two_runs_build_one_cache_at_the_same_moment_and_a_third_into_a_busy_folder_is_refused(
        head, tiny_teacher, tmp_path):
    """Two runs build one user-given cache.path at the same moment (both started while the cache's build lock is
    held, then let go together): one teacher pass, both train on the same complete cache, whose rows are exactly
    those of a cache built alone. While they wait, a `run` and a `tune` into the first run's folder are refused at
    once with one line naming it, and the first run then completes untouched."""
    shared, alone = tmp_path / "shared_cache", tmp_path / "alone_cache"
    shared.mkdir()
    gate = FileLock(shared / ".build.lock")
    assert gate.try_acquire()  # hold both builders at the lock until both are there
    small = {"teacher.checkpoint": tiny_teacher, "data.limit": 200, "scale.num_workers": 0, "distill.epochs": 2,
             "prune.ratio": 0.0, "quantize.scheme": "none", "distill.teacher_mode": "cache"}
    cli = [sys.executable, "-m", "raydistill.cli"]
    procs = {}
    try:
        for name in ("one", "two"):
            procs[name] = _popen([*cli, "run", "--address", head.gcs, "--out", str(tmp_path / name),
                                  *_sets({**small, "cache.path": str(shared)})], head.env, tmp_path / f"{name}.log")
        procs["alone"] = _popen([*cli, "cache-logits", "--address", head.gcs, "--out", str(tmp_path / "alone"),
                                 *_sets({**small, "cache.path": str(alone)})], head.env, tmp_path / "alone.log")
        waiting = lambda n: "another command is building it" in (tmp_path / f"{n}.log").read_text()  # noqa: E731
        _wait(lambda: waiting("one") and waiting("two"), "both runs to wait at the cache's build lock", 400,
              alive=lambda: procs["one"].poll() is None and procs["two"].poll() is None)

        # a second command into run one's folder while run one lives (it holds its folder while it waits)
        first = tmp_path / "one"
        before = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file() and p.name != RUN_LOCK}
        for command in ("run", "tune"):
            res = subprocess.run([*cli, command, "--out", str(first), *_sets(small)], cwd=REPO, env=head.env,
                                 capture_output=True, text=True, timeout=300)
            assert res.returncode == 2 and not res.stdout.strip(), res.stdout + res.stderr
            err = res.stderr.strip()
            assert len(err.splitlines()) == 1, err
            assert re.match(rf"raydistill: error: run folder {re.escape(str(first))} is in use by another "
                            rf"raydistill command \(pid {procs['one'].pid} on .*`.*run --address", err), err
        assert {p.name: p.read_bytes() for p in first.iterdir() if p.is_file() and p.name != RUN_LOCK} == before
    finally:
        gate.release()
    texts = {name: _finish(proc, tmp_path / f"{name}.log") for name, proc in procs.items()}

    passes = [n for n in ("one", "two") if "logit cache: one teacher pass" in texts[n]]
    reused = [n for n in ("one", "two") if f"logit cache {shared}: up to date" in texts[n]]
    assert len(passes) == 1 and len(reused) == 1, texts  # the teacher pass ran once; the other reused its cache
    assert sorted(p.name for p in shared.iterdir()) == ["cache.json", "part-00000.parquet"]  # no temp files, no lock
    info_shared = json.loads((shared / "cache.json").read_text())
    info_alone = json.loads((alone / "cache.json").read_text())
    assert info_shared["fingerprint"] == info_alone["fingerprint"] and info_shared["rows"] == info_alone["rows"]
    rows_shared = pq.read_table(shared / "part-00000.parquet")
    assert rows_shared.num_rows == info_shared["rows"] > 0
    assert rows_shared.equals(pq.read_table(alone / "part-00000.parquet"))  # exactly the rows of a single build
    for name in ("one", "two"):  # both runs trained on that one cache, and finished
        report = _complete_report(tmp_path / name)
        assert report["logit_cache"]["uri"] == str(shared)
        assert report["logit_cache"]["fingerprint"] == info_shared["fingerprint"]
    assert not (tmp_path / "one" / RUN_LOCK).exists()


def test_a_run_and_a_two_trial_sweep_of_the_same_teacher_side_by_side(head, tiny_teacher, tmp_path):
    """A `run` and a 2-trial `tune` on one cluster at the same moment, both distilling from the same teacher
    checkpoint through live teacher actors: both complete, each command's actor served its own requests, and the
    first to finish did not stop the other's actor (the failure of issue 17: one actor named by the teacher, killed
    by the first command's clean-up)."""
    small = {"teacher.checkpoint": tiny_teacher, "data.limit": 200, "scale.num_workers": 0, "distill.epochs": 2,
             "distill.teacher_mode": "live"}
    cli = [sys.executable, "-m", "raydistill.cli"]
    procs = {
        "run": _popen([*cli, "run", "--address", head.gcs, "--out", str(tmp_path / "run"),
                       *_sets({**small, "prune.ratio": 0.0, "quantize.scheme": "none"})], head.env,
                      tmp_path / "run.log"),
        "tune": _popen([*cli, "tune", "--address", head.gcs, "--out", str(tmp_path / "tune"),
                        *_sets({**small, "tune.teacher_mode": "live", "tune.num_trials": 2,
                                "tune.max_concurrent": 2, "tune.grace_period": 2, "tune.scheduler": "none"})],
                       head.env, tmp_path / "tune.log"),
    }
    try:
        texts = {name: _finish(proc, tmp_path / f"{name}.log") for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    assert not tracebacks(texts), tracebacks(texts)
    report = _complete_report(tmp_path / "run")
    assert report["teacher_server"]["requests"] > 0  # the run's KD asked its own live actor
    sweep = json.loads((tmp_path / "tune" / "sweep_report.json").read_text())
    assert sweep["trials"] == sweep["completed"] == 2
    assert sweep["teacher_forward_samples"] > 0  # the sweep's trials were served by the sweep's actor
    assert not (tmp_path / "run" / RUN_LOCK).exists() and not (tmp_path / "tune" / RUN_LOCK).exists()


def _head_drivers(head) -> list[str]:
    """The job ids of every driver that has connected to the head (its dashboard's job list, token auth)."""
    import urllib.request

    request = urllib.request.Request(f"{head.dashboard}/api/jobs/", headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return sorted(j["job_id"] for j in json.loads(response.read()) if j.get("type") == "DRIVER")


def test_a_run_with_no_address_on_a_machine_whose_ray_start_head_is_live(head, tiny_teacher, tmp_path):
    """Issue 17, a laptop that already has a Ray cluster: Ray's default address file names a live `ray start`
    head (as `ray start --head` without --temp-dir leaves it). A plain `ray.init()` joins that head (checked
    first: the file is live); `raydistill run` with no address starts its own private Ray in local mode, says so,
    completes, and never connects to the head."""
    # the probe is also a script that joined the cluster with its own ray.init() before calling raydistill: the
    # API then runs on that cluster, as a command given --address does (2 data-parallel workers by default)
    probe = ("import ray; ray.init(logging_level='ERROR'); "
             "print('joined', ray.get_runtime_context().gcs_address, flush=True); "
             "from raydistill import cluster, config; "
             "print('in process:', cluster.ray_in_process(), cluster.joins_cluster(None), "
             "cluster.resolve_scale(config.load(None), None).scale.num_workers, flush=True); ray.shutdown()")
    with ray_address_file(head.gcs):
        joined = subprocess.run([sys.executable, "-c", probe], env=head.env, capture_output=True, text=True,
                                timeout=300)
        port = head.gcs.rsplit(":", 1)[1]  # the head reports its node's address, the port is the head's own
        assert re.search(rf"^joined \S+:{port}$", joined.stdout, re.M), joined.stdout + joined.stderr[-3000:]
        assert "in process: cluster True 2" in joined.stdout, joined.stdout + joined.stderr[-3000:]
        drivers = _head_drivers(head)
        res = subprocess.run([sys.executable, "-m", "raydistill.cli", "run", "--out", str(tmp_path / "run"),
                              *_sets({"teacher.checkpoint": tiny_teacher, "data.limit": 200, "distill.epochs": 1,
                                      "prune.ratio": 0.0, "quantize.scheme": "none"})],
                             cwd=REPO, env=head.env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "on a private local Ray" in res.stdout and "private local Ray ready in " in res.stdout, res.stdout
    assert not tracebacks({"stderr": res.stderr}), tracebacks({"stderr": res.stderr})
    assert _complete_report(tmp_path / "run")["config"]["scale"]["num_workers"] == 0  # local mode: no cluster
    assert _head_drivers(head) == drivers  # the run never connected to the head


def test_a_worker_whose_teacher_actor_is_gone_gets_a_typed_error(ray_local, tmp_path, tiny_teacher):
    """The run's TeacherServer killed for good: a request to it and a new lookup both raise
    TeacherUnavailableError (not Ray's lookup ValueError), and a Train stage on it ends with that error by type."""
    import ray
    import torch

    from raydistill import config
    from raydistill import job as jobs
    from raydistill.checkpoints import load_model
    from raydistill.config import ScaleConfig
    from raydistill.data import load_splits
    from raydistill.errors import TeacherUnavailableError, first_user_error
    from raydistill.teacher import LiveTeacher, start_teacher_server, teacher_actor_name
    from raydistill.trainer import fit

    model, spec, _ = load_model(tiny_teacher)
    name = teacher_actor_name("gone" * 16)
    assert name.endswith(ray.get_runtime_context().get_job_id())  # per run: the Ray job id of this driver
    actor = start_teacher_server(name, spec, model.state_dict(), ScaleConfig(teacher_cpus=0.5))
    teacher = LiveTeacher(name, torch.device("cpu"), rank=0)
    x = torch.zeros(4, 1, 8, 8)
    assert teacher.result(teacher.request(None, x, None)).logits.shape == (4, 10)

    ray.kill(actor, no_restart=True)
    # ray.kill returns before the actor is dead (the kill goes through the GCS, a request straight to the actor), so a
    # request sent at once can still be answered (CI, stop 29): send until one fails, which must be the typed error.
    deadline = time.monotonic() + 60
    while True:
        try:
            teacher.result(teacher.request(None, x, None))
        except TeacherUnavailableError as e:
            assert f"the teacher actor '{name}' of this run is gone" in str(e)
            break
        assert time.monotonic() < deadline, "the killed teacher actor still answers after 60 s"
        time.sleep(0.05)
    with pytest.raises(TeacherUnavailableError) as lookup:
        LiveTeacher(name, torch.device("cpu"), rank=0)
    assert "rerun the same command" in str(lookup.value) and "\n" not in str(lookup.value)

    cfg = config.load(None, {"data.limit": 200, "distill.epochs": 1, "scale.num_workers": 0})
    splits = load_splits("digits", limit=200)
    job = jobs.StageJob(stage="student_kd", config=cfg, spec=spec, data=ray.put(splits), phases=jobs.kd_phases(cfg),
                        teacher=jobs.live_teacher(name))
    with pytest.raises(TeacherUnavailableError) as stage:
        fit(job, "gone" * 4, tmp_path)
    assert isinstance(first_user_error(stage.value), TeacherUnavailableError)
