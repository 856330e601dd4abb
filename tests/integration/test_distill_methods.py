"""Every core method reachable from the config, on a real local Ray in local mode: several teachers averaged
(served by the live actor, stored by the cache, computed in-process), unstructured pruning, the low-rank stage,
the student that goes on chosen on validation accuracy, and the noisy_digits job's smoke mode."""

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from smoke import SMOKE, train_smoke_teacher

from raydistill import config
from raydistill.checkpoints import load_model
from raydistill.evaluate import val_accuracy
from raydistill.pipeline import load_data, run

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory) -> str:
    """An MLP teacher for the smoke data, unlike tiny_teacher (a CNN), trained here for one epoch."""
    return train_smoke_teacher(tmp_path_factory.mktemp("second_teacher") / "teacher.pt", "mlp", {"hidden": [64]},
                               seed=1)


def _average(paths: list[str], weights: list[float], x: np.ndarray) -> np.ndarray:
    """The naive weighted average of the teachers' logits on x."""
    with torch.no_grad():
        outs = [load_model(p)[0].eval()(torch.from_numpy(np.array(x))) for p in paths]
    return (sum(w * o for w, o in zip(weights, outs)) / sum(weights)).numpy()


def test_ensemble_unstructured_lowrank_and_the_chosen_student(ray_local, tmp_path, tiny_teacher, second_teacher):
    out = tmp_path / "run"
    cfg = config.load(None, {**SMOKE, "teacher.checkpoint": tiny_teacher, "teacher.ensemble": [second_teacher],
                             "teacher.weights": [1.0, 3.0], "distill.teacher_mode": "inprocess",
                             "prune.kind": "unstructured", "prune.ratio": 0.5, "lowrank.rank": 8})
    report = run(cfg, out, quiet=True)
    models = report["models"]
    # the teacher row is the ensemble: both members' parameters
    params = [sum(p.numel() for p in load_model(p)[0].parameters()) for p in (tiny_teacher, second_teacher)]
    assert models["teacher"]["params"] == sum(params)
    # never worse than training alone: the better student on validation went on, and the report says why
    sel = report["selection"]
    splits = load_data(cfg)
    val = {n: val_accuracy(load_model(out / f"{n}.pt")[0], splits) for n in ("student_kd", "student_baseline")}
    assert sel["val_accuracy"] == pytest.approx(val)
    assert sel["chosen"] == ("student_kd" if val["student_kd"] >= val["student_baseline"] else "student_baseline")
    text = (out / "report.md").read_text()
    assert "## Which student goes on" in text and sel["chosen"] in text
    # unstructured: half the prunable weights are zero, the shapes and MACs are the unpruned student's
    pruned, kd = models["student_pruned"], models["student_kd"]
    assert pruned["macs"] == kd["macs"] and pruned["params"] == kd["params"]
    assert 0.3 < pruned["sparsity"] < 0.5 and pruned["sparse_size_bytes"] < pruned["size_bytes"]
    assert "no dense speed-up" in text
    # the low-rank stage: its own row, fewer parameters, a checkpoint that rebuilds its factorized layers
    low = models["student_lowrank"]
    assert low["params"] < pruned["params"] and report["gains"]["lowrank_params_vs_its_input"] < 1
    model, spec, _ = load_model(out / "student_lowrank.pt")
    assert spec["lowrank"] == {"9": 8} and isinstance(model[9], torch.nn.Sequential)
    assert models["student_int8"]["from"] == "student_lowrank"


def test_live_actor_and_cache_serve_the_weighted_average(ray_local, tmp_path, tiny_teacher, second_teacher, capfd):
    import ray

    from raydistill.cache import CacheInfo, load_for_ids
    from raydistill.pipeline import (
        open_run,
        open_teacher_source,
        prepare_teacher,
        stop_teacher_server,
        wait_for_teacher_server,
    )

    cfg = config.load(None, {**SMOKE, "teacher.checkpoint": tiny_teacher, "teacher.ensemble": [second_teacher],
                             "teacher.weights": [1.0, 3.0], "distill.teacher_mode": "cache"})
    ctx = open_run(cfg, tmp_path / "run", None, quiet=True, uses_cache=True)
    teacher = prepare_teacher(ctx, with_cache=True)
    # the cache's actor pool starts without the core worker's note on its constructor arguments (console)
    assert "core_worker.cc" not in capfd.readouterr().err
    x = ctx.splits.train.x
    expected = _average([tiny_teacher, second_teacher], [1.0, 3.0], x)
    info = {k: v for k, v in teacher.cache.items() if k != "uri"}
    cached = load_for_ids(teacher.cache["uri"], ctx.splits.train.ids, CacheInfo(**info))["logits"][:, 0]
    np.testing.assert_allclose(cached, expected, rtol=1e-2, atol=1e-2)  # stored as fp16
    source, server = open_teacher_source(ctx, teacher, "live")
    try:
        wait_for_teacher_server(ctx, source, server)
        served = ray.get(server.logits.remote(np.array(x[:32])))
    finally:
        stop_teacher_server(source, server)
    np.testing.assert_allclose(served, expected[:32], rtol=1e-4, atol=1e-4)


def _smoke_overrides(job: str) -> dict:
    text = (REPO / "jobs" / "README.md").read_text()
    block = text.split(f"## {job}", 1)[1].split("\n## ", 1)[0].split("Smoke mode", 1)[1].split("```", 2)[1]
    return dict(config.parse_override(w) for w in shlex.split(block.strip()) if w != "--set")


def test_noisy_digits_job_smoke_mode(ray_local, tmp_path):
    """jobs/noisy_digits.yaml in its documented smoke mode: the whole pipeline on the built-in benchmark data."""
    cfg = config.load(REPO / "jobs" / "noisy_digits.yaml", _smoke_overrides("noisy_digits.yaml"))
    report = run(cfg, tmp_path / "run", quiet=True)
    assert report["data"]["name"] == "noisy_digits" and report["data"]["train"] == cfg.data.limit
    assert {"teacher", "student_baseline", "student_kd", "student_pruned"} <= set(report["models"])
    assert report["selection"]["chosen"] in ("student_kd", "student_baseline")
    assert json.loads((tmp_path / "run" / "report.json").read_text())["config"]["data"]["source"] == "noisy_digits"
