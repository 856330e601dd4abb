"""Export (torch-only artifacts) and the deploy gate."""

import hashlib
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from raydistill.core.quantize import quantize_int8
from raydistill.export import deploy_gate, export_if_gate_passes, export_model
from raydistill.models import build_model

warnings.filterwarnings("ignore", module="torchao")

# Runs in a fresh interpreter where raydistill, torchao and numpy cannot be imported; checks
# each artifact folder given on the command line, then runs its predict.py on x.npy.
TORCH_ONLY = """
import sys
for name in ("raydistill", "torchao", "numpy"):
    sys.modules[name] = None  # any import of them now raises ImportError
import runpy, torch
for folder in sys.argv[1:]:
    x = torch.load(folder + "/x.pt", weights_only=True)
    expected = torch.load(folder + "/expected.pt", weights_only=True)
    for name in ("student.pt2", "student.torchscript.pt"):
        if name.endswith(".pt2"):
            import torch.ao.quantization.fx._decomposed  # registers int8 PT2E ops, part of torch
            model = torch.export.load(folder + "/" + name).module()
        else:
            model = torch.jit.load(folder + "/" + name)
        with torch.no_grad():
            for rows in (x, x[:1]):
                assert torch.allclose(model(rows), expected[: len(rows)], atol=1e-4), (folder, name)
    print("==", folder)
    sys.argv = ["predict.py", folder + "/x.npy"]
    try:
        runpy.run_path(folder + "/predict.py", run_name="__main__")
    except SystemExit as done:  # predict.py ends with sys.exit(main())
        assert done.code == 0, done.code
"""


def student():
    torch.manual_seed(0)
    return build_model("cnn", num_classes=10, in_channels=1, image_size=8, widths=[4, 8], hidden=16).eval()


def test_artifacts_load_and_predict_with_torch_only(tmp_path):
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    models = {"fp32": student(), "pt2e_x86": quantize_int8(student(), "pt2e_x86", calibration_data=x),
              "weight_only": quantize_int8(student(), "weight_only")}
    predictions = []
    for name, model in models.items():
        folder = tmp_path / name
        result = export_model(model, x[:2], folder)
        assert result["format"] == "torch.export" and result["errors"] == {}, name
        assert result["artifact"] == str(folder / "student.pt2")
        assert sorted(p.name for p in folder.iterdir()) == ["artifact.json", "predict.py", "student.pt2",
                                                             "student.torchscript.pt"]
        assert hashlib.sha256((folder / "student.pt2").read_bytes()).hexdigest() == result["sha256"]
        meta = json.loads((folder / "artifact.json").read_text())
        assert meta["input_shape"] == [1, 8, 8] and meta["files"]["student.pt2"] == result["sha256"]
        with torch.no_grad():
            torch.save(model(x), folder / "expected.pt")
            predictions += ["==", str(folder), *[str(int(c)) for c in model(x).argmax(1)]]
        torch.save(x, folder / "x.pt")
        np.save(folder / "x.npy", x.numpy())

    out = subprocess.run([sys.executable, "-c", TORCH_ONLY, *(str(tmp_path / n) for n in models)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == predictions


def test_predict_normalizes_raw_uint8_samples_as_the_run_did(tmp_path):
    """artifact.json's input_normalization lets predict.py take raw 8-bit samples: a uint8 .npy gives the logits of
    the model on what the run's reader makes of those pixels (data.standardize_pixels); float input is taken as
    the model's input; uint8 input for a model with no normalization is refused in one line."""
    from raydistill.data import input_normalization, standardize_pixels

    model = student().eval()
    raw = np.random.default_rng(3).integers(0, 256, (5, 1, 8, 8), dtype=np.uint8)
    stats = ((0.45,), (0.28,))
    folder = tmp_path / "deploy"
    export_model(model, torch.zeros(2, 1, 8, 8), folder, input_normalization("parquet", stats))
    np.save(folder / "raw.npy", raw)
    done = subprocess.run([sys.executable, str(folder / "predict.py"), str(folder / "raw.npy"), "--logits"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        expected = model(torch.from_numpy(standardize_pixels(raw, stats)))
    got = torch.tensor([json.loads(line) for line in done.stdout.splitlines()])
    assert torch.allclose(got, expected, atol=1e-4)

    bare = tmp_path / "bare"
    export_model(model, torch.zeros(2, 1, 8, 8), bare)
    refused = subprocess.run([sys.executable, str(bare / "predict.py"), str(folder / "raw.npy")],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "is uint8 but this model takes its inputs as stored" in refused.stderr


def test_predict_refuses_a_bad_input_file_in_one_line(tmp_path):
    """predict.py's input: a missing file, a file that is no torch.save, a dict without "x" and a saved
    non-tensor each stop it with one line naming the file and the fix (they were tracebacks)."""
    import runpy

    folder = tmp_path / "deploy"
    export_model(student().eval(), torch.zeros(2, 1, 8, 8), folder)
    load_input = runpy.run_path(str(folder / "predict.py"), run_name="predict")["load_input"]
    (tmp_path / "text.pt").write_text("not a tensor file")
    torch.save({"y": torch.zeros(2, 1, 8, 8)}, tmp_path / "dict.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    for name, words in [("missing.npy", "does not exist; pass a .npy file or a tensor saved with torch.save"),
                        ("text.pt", "is not a tensor saved with torch.save"),
                        ("dict.pt", "holds a dict without key 'x' (keys: ['y'])"),
                        ("list.pt", "holds a list, not a tensor")]:
        with pytest.raises(SystemExit) as stop:
            load_input(tmp_path / name, [1, 8, 8])
        message = str(stop.value)
        assert str(tmp_path / name) in message and words in message and "\n" not in message, message


def test_model_needing_torchao_is_refused(tmp_path):
    model = quantize_int8(student(), "dynamic")  # torchao ops in the graph: not loadable with torch only
    with pytest.raises(ValueError, match="torchao"):
        export_model(model, torch.randn(2, 1, 8, 8), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gate_blocks_with_the_shortfall():
    gate = deploy_gate(0.912, 0.96, min_accuracy=0.95, min_ratio_to_teacher=0.9)
    assert gate["passed"] is False
    accuracy_check, ratio_check = gate["checks"]
    assert accuracy_check == {"bound": "min_accuracy", "required": 0.95, "actual": 0.912, "passed": False,
                              "short_by": pytest.approx(0.038),
                              "message": "student accuracy 0.912 is below deploy.min_accuracy 0.950 by 0.038"}
    assert ratio_check["passed"] is True and ratio_check["short_by"] == 0.0
    assert ratio_check["actual"] == pytest.approx(0.95)
    assert gate["message"].startswith("student accuracy 0.912 is below deploy.min_accuracy 0.950 by 0.038")


def test_gate_ratio_to_teacher():
    gate = deploy_gate(0.90, 0.96, min_accuracy=None, min_ratio_to_teacher=0.98)
    (check,) = gate["checks"]
    assert not gate["passed"] and check["bound"] == "min_ratio_to_teacher"
    assert check["short_by"] == pytest.approx(0.98 - 0.90 / 0.96)
    assert "below deploy.min_ratio_to_teacher 0.980 by 0.042" in gate["message"]
    assert deploy_gate(0.95, 0.95, min_accuracy=0.95, min_ratio_to_teacher=1.0)["passed"]  # bounds inclusive
    assert deploy_gate(0.5, 0.9, None, None) == {"passed": True, "checks": [], "message": deploy_gate(
        0.5, 0.9, None, None)["message"]}


@pytest.mark.parametrize("args, match", [
    ((1.2, 0.9, 0.5, None), "student accuracy"),
    ((0.9, 0.9, 95, None), "deploy.min_accuracy"),
    ((0.9, None, None, 0.9), "teacher accuracy"),
    ((0.9, 0.0, None, 0.9), "teacher accuracy above 0"),
])
def test_gate_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        deploy_gate(*args)


def test_blocked_gate_writes_nothing(tmp_path):
    blocked = deploy_gate(0.5, 0.9, min_accuracy=0.8, min_ratio_to_teacher=None)
    assert export_if_gate_passes(student(), torch.randn(2, 1, 8, 8), tmp_path / "deploy", blocked) is None
    assert not (tmp_path / "deploy").exists()
    passed = deploy_gate(0.85, 0.9, min_accuracy=0.8, min_ratio_to_teacher=None)
    result = export_if_gate_passes(student(), torch.randn(2, 1, 8, 8), tmp_path / "deploy", passed)
    assert result is not None and (tmp_path / "deploy" / "student.pt2").is_file()
    assert not [p for p in (tmp_path / "deploy").iterdir() if p.name.endswith(".tmp")]
