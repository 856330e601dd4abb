"""The Python API on a real local Ray, in Ray Train's local mode with the smoke settings. The one run is also the
ecosystem run: its teacher starts from a local state-dict file (teacher.pretrained), its student is a tiny
randomly initialised timm ViT (pruned, int8, exported to pt2, ONNX and ONNX Runtime static int8), and the ONNX
files are checked here too."""

from pathlib import Path

import pytest
import torch
from smoke import SMOKE

import raydistill
from raydistill import evaluate
from raydistill.errors import RunFolderError
from raydistill.pipeline import load_data

pytestmark = pytest.mark.ray
ONNX = {"deploy.formats": ["pt2", "onnx", "onnx_int8"]}
VIT = {"student.model": "timm:vit_tiny_patch16_224",
       "student.kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_teacher):
    """The tiny teacher's weights as a plain state-dict file (what a user brings from elsewhere)."""
    path = tmp_path_factory.mktemp("weights") / "teacher_weights.pth"
    torch.save(raydistill.load_student(Path(tiny_teacher).parent, "teacher").state_dict(), path)
    return str(path)


def _run(out, pretrained, **more):
    # lr ~ 0: the teacher's one epoch keeps the pretrained weights, which shows that training started from them
    return raydistill.run(None, out, quiet=True, teacher={"pretrained": pretrained, "lr": 1e-12},
                          track={"tensorboard": True}, **{**SMOKE, **ONNX, **VIT, **more})


THREADS = {}  # torch's intra-op threads in this process after the API run (test_the_callers_torch_threads_are_kept)


@pytest.fixture(scope="module")
def api_run(ray_local, tmp_path_factory, pretrained):
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the script's own setting; every stage's loop trains on scale.torch_threads (1)
    try:
        run = _run(tmp_path_factory.mktemp("api") / "run", pretrained)
        THREADS["after"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    return run


def test_the_callers_torch_threads_are_kept(api_run):
    """Local mode trains in the caller's process: the loop's one thread is not left behind for the script."""
    assert THREADS["after"] == 2


def test_run_returns_the_report_and_load_student_gives_the_final_student(api_run):
    assert api_run.report["config"]["scale"]["num_workers"] == 0  # local mode
    assert (api_run.out / "report.json").is_file()
    student = raydistill.load_student(api_run.out)
    row = api_run.models["student_pruned"]
    assert sum(p.numel() for p in student.parameters()) == row["params"]
    data = load_data(raydistill.load_config(api_run.report["config"]))
    assert evaluate.test_accuracy(student, data) == pytest.approx(row["accuracy"])


def test_rerun_resumes_and_another_config_is_refused(api_run, pretrained):
    again = _run(api_run.out, pretrained)
    assert all(again.report["timings"][s].get("skipped") for s in ("teacher", "student_kd", "student_pruned"))
    assert again.models["student_kd"]["accuracy"] == api_run.models["student_kd"]["accuracy"]
    with pytest.raises(RunFolderError, match="holds results of another config"):
        _run(api_run.out, pretrained, seed=1)


def test_the_teacher_started_from_the_pretrained_file(api_run, pretrained):
    start = torch.load(pretrained, weights_only=True)
    teacher = raydistill.load_student(api_run.out, "teacher")
    for name, p in teacher.named_parameters():
        assert torch.allclose(p, start[name], atol=1e-6), name


def test_the_timm_vit_student_is_pruned_where_it_can_be_and_the_report_says_where_not(api_run):
    kd, pruned = api_run.models["student_kd"], api_run.models["student_pruned"]
    assert pruned["params"] < kd["params"] and "student_int8" in api_run.models
    coverage = api_run.report["pruning"]
    assert coverage["pruned_groups"] == ["blocks.0.mlp.fc1"]
    assert "attention projection" in coverage["not_pruned"]["blocks.0.attn.qkv"]
    assert "blocks.0.attn.qkv: attention projection" in (api_run.out / "report.md").read_text()
    assert (api_run.out / "deploy" / "student.pt2").is_file()


def test_tensorboard_has_every_stages_epochs(api_run):
    for stage in ("teacher", "student_baseline", "student_kd", "student_pruned"):
        assert list((api_run.out / "tensorboard" / stage).glob("events.out.tfevents.*")), stage


def test_onnx_export_is_checked_reported_and_in_the_manifest(api_run, tmp_path):
    import shutil

    from raydistill.manifest import read_manifest, verify_run
    from raydistill.onnx_export import OrtModel

    onnx = api_run.report["deploy"]["onnx"]
    row = api_run.models["student_pruned"]
    assert onnx["accuracy"] == row["accuracy"] == onnx["torch_accuracy"] and onnx["max_abs_diff"] <= 1e-4
    assert onnx["torch_latency_ms_b1"] == row["latency_ms_b1"] and onnx["latency_ms_b64"] > 0
    path = api_run.out / "deploy" / "student.onnx"
    assert read_manifest(api_run.out)["files"]["deploy/student.onnx"]["bytes"] == path.stat().st_size
    assert "## ONNX Runtime vs PyTorch (CPU)" in (api_run.out / "report.md").read_text()
    student, x = raydistill.load_student(api_run.out), torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(OrtModel(path.read_bytes(), threads=1)(x), student(x), atol=1e-4)
    copy = tmp_path / "copy"
    shutil.copytree(api_run.out, copy, ignore=shutil.ignore_patterns("ray_train"))
    assert verify_run(copy) == []
    data = bytearray((copy / "deploy" / "student.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "deploy" / "student.onnx").write_bytes(bytes(data))
    assert [p for p in verify_run(copy) if "student.onnx" in p]


def test_onnx_int8_is_calibrated_reported_and_in_the_manifest(api_run):
    from raydistill.manifest import read_manifest

    int8 = api_run.report["deploy"]["onnx_int8"]
    row, config = api_run.models["student_pruned"], api_run.report["config"]
    assert int8["torch_accuracy"] == row["accuracy"] and abs(int8["accuracy"] - row["accuracy"]) <= 0.1
    assert 0 < int8["calibration_samples"] <= config["quantize"]["calibration_samples"]  # the (limited) val split
    assert int8["size_bytes"] < int8["fp32_onnx_size_bytes"] == api_run.report["deploy"]["onnx"]["size_bytes"]
    path = api_run.out / "deploy" / "student_int8.onnx"
    assert read_manifest(api_run.out)["files"]["deploy/student_int8.onnx"]["bytes"] == path.stat().st_size
    assert " static int8 | " in (api_run.out / "report.md").read_text()
    # the deploy folder says how a raw sample is normalized for the model (digits: values / 16, then per channel)
    import json

    normalization = json.loads((api_run.out / "deploy" / "artifact.json").read_text())["input_normalization"]
    assert normalization == api_run.report["data"]["normalization"] and normalization["scale"] == 1 / 16
    # auto: the ViT's only Conv2d (the patch embedding) has one input channel, which torchao cannot quantize
    assert api_run.models["student_int8"]["scheme"] == "weight_only" and "no Conv2d" in api_run.models[
        "student_int8"]["scheme_reason"]
