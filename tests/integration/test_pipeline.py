"""`raydistill run` on a real local Ray in Ray Train local mode with a tiny config: the report, the artifacts, the
shared teacher actor, resuming. What only several Train workers do (DDP, the actor serving two ranks, rank 0's
progress lines reaching the console once) is checked on the 2-worker `ray job submit` run in test_jobs.py."""

import contextlib
import io
import json

import pytest
from smoke import SMOKE

from raydistill import config
from raydistill.checkpoints import load_model
from raydistill.pipeline import RunFolderError, run

pytestmark = pytest.mark.ray

FIELDS = {"accuracy", "params", "macs", "latency_ms_b1", "latency_ms_b64", "size_bytes", "sparsity"}


@pytest.fixture(scope="module")
def first_run(ray_local, tmp_path_factory):
    """A run in local mode (every stage trains in this process; the teacher actor serves it)."""
    out = tmp_path_factory.mktemp("run")
    cfg = config.load(None, {**SMOKE, "scale.num_workers": 0, "prune.ratio": 0.5})
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        report = run(cfg, out)
    return cfg, out, report, console.getvalue()


def test_report_has_every_model_and_stage(first_run):
    cfg, out, report, _ = first_run
    on_disk = json.loads((out / "report.json").read_text())
    assert set(on_disk["models"]) == {"teacher", "student_baseline", "student_kd", "student_pruned", "student_int8"}
    for name, m in on_disk["models"].items():
        assert FIELDS <= set(m), name
        assert 0.0 <= m["accuracy"] <= 1.0 and m["params"] > 0 and m["macs"] > 0 and m["size_bytes"] > 0
    for stage in ("teacher", "student_baseline", "student_kd", "student_pruned", "evaluate"):
        assert on_disk["timings"][stage]["seconds"] > 0
    for f in ("report.md", "report.png", "config.yaml", "teacher.pt", "student_kd.pt", "student_pruned.pt"):
        assert (out / f).stat().st_size > 0, f
    assert "| student_pruned |" in (out / "report.md").read_text()
    # in-memory data: every trained epoch (teacher 1, baseline 1, KD 1, prune 1 + finetune 1 in SMOKE) from memory
    assert on_disk["data"]["streamed"] is False and set(on_disk["data"]["epochs_read_from"]) == {"memory"}


def test_pruned_student_is_physically_smaller(first_run):
    _, out, report, _ = first_run
    kd, pruned = report["models"]["student_kd"], report["models"]["student_pruned"]
    # ratio 0.5 on both conv widths and the hidden layer: well under half the MACs and params.
    assert pruned["macs"] < 0.5 * kd["macs"] and pruned["params"] < 0.5 * kd["params"]
    model, spec, _ = load_model(out / "student_pruned.pt")  # weights-only load replays the plan
    assert spec["plan"] and sum(p.numel() for p in model.parameters()) == pruned["params"]


def test_artifacts_are_signed_exported_and_tamper_proof(first_run, tmp_path):
    import shutil

    from raydistill.checkpoints import CheckpointError
    from raydistill.manifest import verify_run

    _, out, report, _ = first_run
    assert verify_run(out) == []
    assert report["deploy"]["gate"]["passed"] and (out / "deploy" / "student.pt2").exists()  # no bounds set
    assert report["models"]["student_int8"]["size_bytes"] < report["models"]["student_pruned"]["size_bytes"]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("ray_train"))
    data = bytearray((copy / "student_kd.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "student_kd.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="student_kd.pt"):
        load_model(copy / "student_kd.pt")
    assert any("student_kd.pt" in p for p in verify_run(copy))


def test_one_teacher_actor_served_the_run(first_run, ray_local):
    from ray.util.state import list_actors

    _, _, report, _ = first_run
    stats = report["teacher_server"]
    assert set(stats["requests_by_rank"]) == {0}  # local mode: one trainer, rank 0 (two ranks: test_jobs.py)
    assert stats["forward_passes"] <= stats["requests"]
    # address: this test's own cluster, even when other Ray instances run on the machine
    address = ray_local.get_runtime_context().gcs_address
    name = json.loads((first_run[1] / "teacher_server.json").read_text())["name"]
    actors = list_actors(address=address, filters=[("class_name", "=", "TeacherServer"), ("name", "=", name)],
                         detail=False)
    assert len(actors) == 1  # created once for the run (KD and prune stages reuse it)


def test_rerun_skips_finished_stages(first_run):
    cfg, out, _, _ = first_run
    stages = ("teacher", "student_baseline", "student_kd", "student_pruned")
    before = {s: (out / f"{s}.pt").stat().st_mtime_ns for s in stages}
    report = run(cfg, out, quiet=True)
    for stage in stages:
        assert report["timings"][stage].get("skipped"), stage
    # the stage checkpoints were not rewritten (int8 and the report are cheap and are redone)
    assert {s: (out / f"{s}.pt").stat().st_mtime_ns for s in stages} == before


def test_run_folder_of_another_config_is_refused(first_run):
    cfg, out, _, _ = first_run
    other = config.load(None, {**SMOKE, "distill.alpha": 0.9})
    before = (out / "report.json").read_bytes()
    with pytest.raises(RunFolderError, match="another config"):
        run(other, out, quiet=True)
    assert (out / "report.json").read_bytes() == before
