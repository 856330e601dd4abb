"""The Python API on a real local Ray, in Ray Train's local mode with the smoke settings; the run also exports
the final student to ONNX (deploy.formats: [pt2, onnx]), which this module checks too."""

import pytest
import torch
from smoke import SMOKE

import raydistill
from raydistill import evaluate
from raydistill.errors import RunFolderError
from raydistill.pipeline import load_data

pytestmark = pytest.mark.ray
ONNX = {"deploy.formats": ["pt2", "onnx"]}


@pytest.fixture(scope="module")
def api_run(ray_local, tmp_path_factory, tiny_teacher):
    out = tmp_path_factory.mktemp("api") / "run"
    return raydistill.run(None, out, quiet=True, teacher={"checkpoint": tiny_teacher}, **SMOKE, **ONNX)


def test_run_returns_the_report_and_load_student_gives_the_final_student(api_run):
    assert api_run.report["config"]["scale"]["num_workers"] == 0  # local mode
    assert (api_run.out / "report.json").is_file()
    student = raydistill.load_student(api_run.out)
    row = api_run.models["student_pruned"]
    assert sum(p.numel() for p in student.parameters()) == row["params"]
    x, y = evaluate.test_tensors(load_data(raydistill.load_config(api_run.report["config"])))
    with torch.no_grad():
        assert (student(x).argmax(1) == y).float().mean().item() == pytest.approx(row["accuracy"])


def test_rerun_resumes_and_another_config_is_refused(api_run, tiny_teacher):
    again = raydistill.run(None, api_run.out, quiet=True, teacher={"checkpoint": tiny_teacher}, **SMOKE, **ONNX)
    assert all(again.report["timings"][s].get("skipped") for s in ("student_kd", "student_pruned"))
    assert again.models["student_kd"]["accuracy"] == api_run.models["student_kd"]["accuracy"]
    with pytest.raises(RunFolderError, match="holds results of another config"):
        raydistill.run(None, api_run.out, quiet=True, teacher={"checkpoint": tiny_teacher}, **SMOKE, **ONNX, seed=1)


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
