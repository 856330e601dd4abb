"""deploy.formats: onnx — torch's ONNX exporter, checked with ONNX Runtime; ops it cannot convert are named."""

import json

import onnx
import pytest
import torch
from torch import nn

from raydistill import config
from raydistill.core.metrics import accuracy
from raydistill.errors import ConfigError, ModelError
from raydistill.manifest import verify_run, write_manifest
from raydistill.models import build_model
from raydistill.onnx_export import (
    ONNX_FILE,
    ONNX_INT8_FILE,
    OrtModel,
    check_against_torch,
    check_onnx_exportable,
    export_onnx,
    export_onnx_int8,
)
from raydistill.report import render_markdown


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("cnn", 10, 1, 8, widths=[8, 16], hidden=32).eval()
    x, y = torch.randn(100, 1, 8, 8), torch.randint(0, 10, (100,))
    row = {"accuracy": accuracy(model, x, y), "latency_ms_b1": 0.5, "latency_ms_b64": 5.0, "size_bytes": 1}
    out = tmp_path_factory.mktemp("deploy")
    (out / "artifact.json").write_text(json.dumps({"primary": "student.pt2", "files": {"student.pt2": "x"}}))
    return model, x, y, out, export_onnx(model, lambda: [(x[:60], y[:60]), (x[60:], y[60:])], x[:2], out, row)


def test_onnx_file_reproduces_the_model_at_any_batch_size(exported):
    model, x, y, out, info = exported
    data = (out / ONNX_FILE).read_bytes()
    onnx.checker.check_model(onnx.load_from_string(data))
    ort_model = OrtModel(data, threads=1)
    for n in (1, 7, 100):
        assert torch.allclose(ort_model(x[:n]), model(x[:n]).detach(), atol=1e-5)
    assert info["accuracy"] == info["torch_accuracy"] and info["max_abs_diff"] < 1e-4
    assert info["latency_ms_b1"] > 0 and info["latency_ms_b64"] > 0 and info["size_bytes"] == len(data)
    assert info["opset"] >= 18 and info["torch_latency_ms_b64"] == 5.0
    meta = json.loads((out / "artifact.json").read_text())
    assert meta["files"] == {"student.pt2": "x", ONNX_FILE: info["sha256"]}
    md = render_markdown({"models": {}, "timings": {}, "deploy": {"model": "student_kd", "gate": {"message": "ok"},
                                                                  "export": None, "onnx": info}})
    assert "| ONNX Runtime " in md and "| PyTorch (student_kd) |" in md


def test_an_onnx_only_deploy_folder_says_how_its_input_is_normalized(exported, tmp_path):
    """With no pt2 export, the ONNX export writes artifact.json itself, with the input normalization the pt2 export
    would have written (predict-side code reads it there); one the pt2 export wrote keeps its own."""
    from raydistill.data import input_normalization

    model, x, y, _, _ = exported
    row = {"accuracy": accuracy(model, x, y), "latency_ms_b1": 0.5, "latency_ms_b64": 5.0}
    normalization = input_normalization("digits", ((0.3,), (0.4,)))
    export_onnx(model, lambda: [(x, y)], x[:2], tmp_path, row, normalization)
    meta = json.loads((tmp_path / "artifact.json").read_text())
    assert meta["format"] == "onnx" and meta["input_normalization"] == normalization
    (tmp_path / "artifact.json").write_text(json.dumps({"primary": "student.pt2", "files": {},
                                                        "input_normalization": None}))
    export_onnx(model, lambda: [(x, y)], x[:2], tmp_path, row, normalization)
    assert json.loads((tmp_path / "artifact.json").read_text())["input_normalization"] is None


def test_onnx_int8_is_static_int8_calibrated_and_recorded(exported):
    model, x, y, out, fp32_info = exported
    fp32 = (out / ONNX_FILE).read_bytes()
    row = {"accuracy": fp32_info["torch_accuracy"], "latency_ms_b1": 0.5, "latency_ms_b64": 5.0}
    calibration = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(2))  # "validation" inputs
    info = export_onnx_int8(model, fp32, lambda: [(x[:60], y[:60]), (x[60:], y[60:])], x[:2], calibration, out, row)
    data = (out / ONNX_INT8_FILE).read_bytes()
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto)
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops  # QDQ around the fp32 ops
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert sum(len(t.raw_data) for t in int8_weights) >= 8 * 9 + 16 * 8 * 9 + 32 * 16 * 2 * 2 + 10 * 32
    assert info["size_bytes"] == len(data) < fp32_info["size_bytes"] and info["fp32_onnx_size_bytes"] == len(fp32)
    assert info["calibration_samples"] == 40 and info["latency_ms_b1"] > 0 and info["latency_ms_b64"] > 0
    # int8, so not bit-exact, but it must still be the same model: logits close, top-1 mostly the same
    ort_model = OrtModel(data, threads=1)
    with torch.no_grad():
        expected, got = model(x), ort_model(x)
    assert 0 < float((got - expected).abs().max()) == pytest.approx(info["max_abs_diff"])
    assert float((got - expected).norm() / expected.norm()) < 0.1
    assert info["agreement"] >= 0.9 and abs(info["accuracy"] - info["torch_accuracy"]) <= 0.1
    assert ort_model(x[:1]).shape == (1, 10)
    meta = json.loads((out / "artifact.json").read_text())
    assert meta["files"][ONNX_INT8_FILE] == info["sha256"] and ONNX_FILE in meta["files"]
    md = render_markdown({"models": {}, "timings": {}, "deploy": {"model": "student_kd", "gate": {"message": "ok"},
                                                                  "export": None, "onnx_int8": info}})
    assert f"| ONNX Runtime {info['onnxruntime']} static int8 | {info['accuracy']:.4f} |" in md
    # the int8 file is signed with the run like every other file: raydistill verify catches a change
    write_manifest(out)
    assert verify_run(out) == []
    (out / ONNX_INT8_FILE).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert any(ONNX_INT8_FILE in problem and "modified" in problem for problem in verify_run(out))


def test_a_model_onnx_runtime_does_not_reproduce_is_refused(exported):
    model, x, y, out, _ = exported
    ort_model = OrtModel((out / ONNX_FILE).read_bytes(), threads=1)
    other = build_model("cnn", 10, 1, 8, widths=[8, 16], hidden=32).eval()  # other weights: other logits
    with pytest.raises(ModelError, match="ONNX Runtime does not reproduce the student"):
        check_against_torch(ort_model, other, [(x, y)], accuracy(other, x, y))
    with pytest.raises(ModelError, match=r"accuracy 0\.\d+ vs PyTorch 1\.0000"):
        check_against_torch(ort_model, model, [(x, y)], 1.0)


class Svd(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = x.flatten(1)
        u, _, _ = torch.linalg.svd(x.T @ x)
        return self.head(x @ u)


def test_an_op_without_onnx_translation_is_one_line_naming_it():
    with pytest.raises(ModelError) as err:
        check_onnx_exportable(Svd(), torch.randn(2, 1, 8, 8))
    msg = str(err.value)
    assert "\n" not in msg and "aten._linalg_svd" in msg and "remove onnx from deploy.formats" in msg


def test_deploy_formats_is_validated():
    assert config.load(None, {"deploy.formats": ["pt2", "onnx"]}).deploy.formats == ["pt2", "onnx"]
    assert config.load(None, {"deploy.formats": ["onnx_int8"]}).deploy.formats == ["onnx_int8"]
    with pytest.raises(ConfigError, match="did you mean 'onnx'"):
        config.load(None, {"deploy.formats": ["pt2", "onx"]})
    for bad in ([], ["onnx", "onnx"]):
        with pytest.raises(ConfigError, match="each format once"):
            config.load(None, {"deploy.formats": bad})

