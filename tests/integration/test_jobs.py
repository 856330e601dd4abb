"""The jobs in jobs/, run for real: a Ray head started with `ray start --head`, the digits job submitted with
the `ray job submit` line exactly as README.md documents it, and the CIFAR-10 job in smoke mode on CPU on a
synthetic CIFAR-shaped Parquet set. The smoke overrides are read from jobs/README.md, so the docs are what runs.

The digits submission is the suite's one run of the whole pipeline on 2 Ray Train workers (DDP): it also checks
what only several workers do (both ranks served by the one teacher actor, rank 0's epoch lines reaching the console
once). The CIFAR-10 smoke mode runs in Ray Train local mode: what it checks (the job's models, Parquet data and
in-process teacher on CPU) does not depend on the number of workers, and ResNet-18 on two workers costs minutes.

The head is isolated from any other Ray on the machine: free ports (GCS, dashboard, dashboard agent, client
server), its own short --temp-dir (so `ray_current_cluster` is written there and a plain `ray.init()` elsewhere
never joins it) and its own HOME (so the auth token it generates is not the user's). It is stopped by signalling
its own `ray start --block` process group and killing whatever still names its temp dir -- never `ray stop`.
"""

import json
import re
import shlex
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from shared_head import Head
from shared_head import ray_head as start_ray_head

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODELS = {"teacher", "student_baseline", "student_kd", "student_pruned"}  # at least these (int8 may follow)


# ---- what the docs say ------------------------------------------------------------------------------------
def documented_submit(job: str) -> tuple[dict, list[str]]:
    """(env assignments, argv) of README.md's `ray job submit` line for ``jobs/<job>``."""
    readme = (REPO / "README.md").read_text()
    cluster = readme[readme.index("## Cluster"):]
    lines = [line.strip() for line in cluster.splitlines()
             if "ray job submit" in line and f"raydistill run jobs/{job}" in line]
    assert lines, f"README.md's Cluster section has no `ray job submit ... raydistill run jobs/{job}` line"
    words = shlex.split(lines[0])
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


def smoke_overrides(job: str) -> list[str]:
    """The smoke-mode `--set ...` words documented for ``jobs/<job>`` in jobs/README.md."""
    text = (REPO / "jobs" / "README.md").read_text()
    section = text.split(f"## {job}", 1)[1].split("\n## ", 1)[0]
    smoke = section.split("Smoke mode", 1)[1]
    block = smoke.split("```", 2)[1]
    return shlex.split(block.strip())


def _replace_value(words: list[str], flag: str, value: str) -> list[str]:
    """``words`` with the value after the first ``flag`` replaced."""
    i = words.index(flag)
    return words[: i + 1] + [value] + words[i + 2:]


# ---- a Ray head of our own ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head (`ray start --head --block`) with the dashboard on, token auth, 4 logical CPUs
    (tests/integration/shared_head.py)."""
    with start_ray_head(tmp_path_factory.mktemp("head")) as head:
        yield head


def _run(cmd: list[str], head: Head, log: Path, env: dict | None = None, timeout: int = 540) -> str:
    """Run ``cmd`` in the repository root against ``head`` (its client environment, plus ``env``); its whole output
    goes to ``log``; returns that output."""
    done = subprocess.run(cmd, cwd=REPO, env={**head.env, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    output = done.stdout + done.stderr
    log.write_text(output)
    assert done.returncode == 0, f"{shlex.join(cmd)} exited with {done.returncode}:\n{output[-4000:]}{head.died()}"
    return output


def _report(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert MODELS <= set(report["models"]), f"report.json lacks {MODELS - set(report['models'])}"
    assert (out / "report.md").is_file()
    return report


def _write_synthetic_cifar(path: Path, n: int = 60) -> None:
    """A learnable CIFAR-shaped set: 3x32x32 float features, 10 classes, ids, as Parquet shards; like CIFAR-10
    prepared by `raydistill data prepare`, it declares its test split (the last 20 rows, 2 per class) in a split
    column. 60 rows (34 train, 6 val): the smoke run trains the job's real ResNet-18 teacher (CIFAR stem, 6-13
    samples/s on one thread here) beside the digits job; at 100 rows its teacher epoch took 22 s of an 86 s run in a
    suite (4.7 s of 46 s at 60 rows, the test file alone). Its five models' latency took 25 s of either run at the
    default budget; the smoke mode's `report.latency_budget_s=0` makes it 3 timed runs each (evaluate 4.6 s)."""
    from raydistill.data import Arrays, write_parquet

    rng = np.random.default_rng(0)
    y = np.arange(n, dtype=np.int64) % 10
    x = rng.normal(0.0, 0.5, size=(n, 3, 32, 32)).astype(np.float32)
    for i, label in enumerate(y):  # a class-dependent stripe: channel label % 3, rows by label // 3
        x[i, label % 3, (label // 3) * 8:(label // 3) * 8 + 8, :] += 1.5
    split = np.where(np.arange(n) < n - 20, "train", "test")
    write_parquet(Arrays(x, y, np.arange(n, dtype=np.int64) + 1000, 10, (3, 32, 32)), path, rows_per_file=64,
                  split=split)


@dataclass
class BackgroundRun:
    proc: subprocess.Popen
    head: Head
    cmd: list[str]
    out: Path
    data: Path
    log: Path

    def wait(self, timeout: float = 540) -> str:
        """Wait for the run; assert it succeeded; return its output."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        output = self.log.read_text()
        assert self.proc.returncode == 0, \
            f"{shlex.join(self.cmd)} exited with {self.proc.returncode}:\n{output[-4000:]}{self.head.died()}"
        return output


@pytest.fixture(scope="module")
def cifar_smoke_run(ray_head, tmp_path_factory):
    """The CIFAR-10 job in its documented smoke mode (local mode), started in the background on the shared head
    via the real CLI, so it runs while the digits job is submitted; test_cifar10_job_smoke_on_cpu checks it."""
    base = tmp_path_factory.mktemp("cifar")
    data = base / "cifar-synthetic"
    _write_synthetic_cifar(data)
    overrides = [w.replace("DIR", str(data)) if w.startswith("data.path=") else w
                 for w in smoke_overrides("cifar10_resnet18.yaml")]
    assert f"data.path={data}" in overrides and "scale.use_gpu=false" in overrides
    assert "scale.num_workers=0" in overrides  # local mode: see the module docstring
    out, log = base / "cifar10", base / "run.log"
    cmd = ["raydistill", "run", "jobs/cifar10_resnet18.yaml", "--out", str(out), "--address", ray_head.gcs, *overrides]
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ray_head.env, stdout=sink, stderr=subprocess.STDOUT)
    run = BackgroundRun(proc, ray_head, cmd, out, data, log)
    yield run
    if proc.poll() is None:  # the test never waited (deselected or failed early)
        proc.kill()
        proc.wait()


# ---- the tests ---------------------------------------------------------------------------------------------
@pytest.mark.ray
def test_ray_job_submit_digits_as_documented(ray_head, cifar_smoke_run, tmp_path):
    """Submits exactly README.md's line (address and --out swapped for this head and a temp folder), plus the
    smoke overrides from jobs/README.md. (cifar_smoke_run only starts the other job alongside.)"""
    doc_env, words = documented_submit("digits.yaml")
    assert doc_env == {"RAY_AUTH_MODE": "token"}, "the README's submit line must set RAY_AUTH_MODE=token"
    assert words[:3] == ["ray", "job", "submit"] and "--working-dir" in words
    assert words[words.index("--address") + 1] == "http://127.0.0.1:8265"
    out = tmp_path / "digits"
    cmd = _replace_value(_replace_value(words, "--address", ray_head.dashboard), "--out", str(out))
    output = _run(cmd + smoke_overrides("digits.yaml"), ray_head, tmp_path / "submit.log", env=doc_env)
    assert re.search(r"Job 'raysubmit_\w+' succeeded", output), output[-2000:]
    report = _report(out)
    assert report["data"]["train"] == 200  # the smoke overrides reached the job
    # a submitted job joins the cluster (RAY_ADDRESS): 2 data-parallel workers per stage by default
    assert report["config"]["scale"]["num_workers"] == 2
    stats = report["teacher_server"]
    assert set(stats["requests_by_rank"]) == {"0", "1"}  # both Train workers asked the same actor (JSON keys)
    assert stats["forward_passes"] <= stats["requests"]
    # two Train workers: rank 0's epoch lines reach the console once each, without Ray's worker prefix
    epochs = [line for line in output.splitlines() if "] epoch " in line]
    stages = {"teacher": 1, "student_baseline": 1, "student_kd": 1, "student_pruned": 2}  # the smoke epochs
    assert sorted(epochs) == sorted(set(epochs)) and len(epochs) == sum(stages.values()), output[-3000:]
    for stage, n in stages.items():
        assert sum(line.startswith(f"[{stage}] epoch ") for line in epochs) == n, stage
    assert "RayTrainWorker" not in output and "TrainingReport" not in output
    assert "PYTHON worker processes" not in output  # the raylet's start-up warning, filtered (raydistill/console.py)
    # the head's State API lists the actors of finished jobs too, and only this job runs on workers here (the CIFAR
    # job is in local mode): one progress queue (an actor, a process start) for the whole command, not one per
    # stage; no Train dataset manager (in-memory data: trainer.unused_train_callback); on a cluster, Train's
    # placement-group cleaner for each of the 4 stages (left out only on a private Ray)
    listed = subprocess.run(["ray", "list", "actors", "--address", ray_head.dashboard, "--format", "json",
                             "--limit", "1000"], env=ray_head.env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stdout[-1000:] + listed.stderr[-2000:]
    actors = Counter(a["class_name"] for a in json.loads(listed.stdout))
    assert actors["_QueueActor"] == 1 and actors["DatasetManager"] == 0, actors
    assert actors["PlacementGroupCleaner"] == actors["TrainController"] == len(stages), actors
    # the Train workers' per-epoch checkpoints were copied into run storage and their temporary folders removed
    assert not list(ray_head.tmp.glob("raydistill-ckpt-*")), "checkpoint folders left in the workers' TMPDIR"


@pytest.mark.ray
def test_cifar10_job_smoke_on_cpu(cifar_smoke_run):
    cifar_smoke_run.wait()
    out = cifar_smoke_run.out
    report = _report(out)
    assert report["data"]["name"] == "parquet" and report["data"]["test"] == 20  # the declared test split
    assert report["data"]["streamed"] is True  # Parquet with ids: streamed through Ray Data
    models = report["models"]
    assert models["teacher"]["macs"] >= 10 * models["student_kd"]["macs"]
    assert models["student_pruned"]["macs"] < models["student_kd"]["macs"]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["teacher"]["model"] == "resnet18" and config["student"]["model"] == "mobilenet_v2"
    assert config["data"]["path"] == str(cifar_smoke_run.data) and config["scale"]["use_gpu"] is False
    assert config["scale"]["num_workers"] == 0 and config["distill"]["teacher_mode"] == "inprocess"
    assert config["report"]["latency_budget_s"] == 0 and report["latency_budget_s"] == 0  # 3 timed runs each
    assert "up to 0 s of timed runs per model and batch size (at least 3 runs)" in (out / "report.md").read_text()


def test_job_configs_load_and_cifar_student_is_much_smaller():
    import torch

    from raydistill import config
    from raydistill.core.metrics import count_macs
    from raydistill.models import build_model

    for path in sorted((REPO / "jobs").glob("*.yaml")):
        config.load(path)  # every job validates
    cfg = config.load(REPO / "jobs" / "cifar10_resnet18.yaml")
    assert cfg.data.source == "cifar10" and cfg.data.root.startswith("/shared/") and cfg.scale.use_gpu
    example = torch.zeros(1, 3, 32, 32)
    teacher = build_model(cfg.teacher.model, 10, 3, 32, **cfg.teacher.kwargs)
    student = build_model(cfg.student.model, 10, 3, 32, **cfg.student.kwargs)
    assert teacher(example).shape == student(example).shape == (1, 10)
    assert count_macs(teacher, example) >= 10 * count_macs(student, example)


def test_every_job_is_documented():
    text = (REPO / "jobs" / "README.md").read_text()
    for path in sorted((REPO / "jobs").glob("*.yaml")):
        assert f"## {path.name}" in text, f"jobs/README.md has no section for {path.name}"
        section = text.split(f"## {path.name}", 1)[1].split("\n## ", 1)[0]
        command = "tune" if path.name == "sweep.yaml" else "run"
        assert ("ray job submit --address http://127.0.0.1:8265 --working-dir . -- "
                f"raydistill {command} jobs/{path.name}") in section
        words = smoke_overrides(path.name)
        assert words and all(w == "--set" or "=" in w for w in words)
    readme = (REPO / "README.md").read_text()
    cluster = readme[readme.index("## Cluster"):]
    for needle in ("ray up cluster.yaml", "RAY_AUTH_MODE=token", "ray rsync-down cluster.yaml",
                   "deploy/kuberay-rayjob.yaml", "raydistill data prepare", "--out /shared/runs/"):
        assert needle in cluster, f"README.md's Cluster section does not mention {needle!r}"
