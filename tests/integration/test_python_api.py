"""The Python API on a real local Ray, in Ray Train's local mode with the smoke settings."""

import pytest
import torch
from smoke import SMOKE

import raydistill
from raydistill.errors import RunFolderError
from raydistill.evaluate import test_tensors
from raydistill.pipeline import load_data

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def api_run(ray_local, tmp_path_factory, tiny_teacher):
    out = tmp_path_factory.mktemp("api") / "run"
    return raydistill.run(None, out, quiet=True, teacher={"checkpoint": tiny_teacher}, **SMOKE)


def test_run_returns_the_report_and_load_student_gives_the_final_student(api_run):
    assert api_run.report["config"]["scale"]["num_workers"] == 0  # local mode
    assert (api_run.out / "report.json").is_file()
    student = raydistill.load_student(api_run.out)
    row = api_run.models["student_pruned"]
    assert sum(p.numel() for p in student.parameters()) == row["params"]
    x, y = test_tensors(load_data(raydistill.load_config(api_run.report["config"])))
    with torch.no_grad():
        assert (student(x).argmax(1) == y).float().mean().item() == pytest.approx(row["accuracy"])


def test_rerun_resumes_and_another_config_is_refused(api_run, tiny_teacher):
    again = raydistill.run(None, api_run.out, quiet=True, teacher={"checkpoint": tiny_teacher}, **SMOKE)
    assert all(again.report["timings"][s].get("skipped") for s in ("student_kd", "student_pruned"))
    assert again.models["student_kd"]["accuracy"] == api_run.models["student_kd"]["accuracy"]
    with pytest.raises(RunFolderError, match="holds results of another config"):
        raydistill.run(None, api_run.out, quiet=True, teacher={"checkpoint": tiny_teacher}, **{**SMOKE, "seed": 1})
