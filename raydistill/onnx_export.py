"""ONNX export of the final student (``deploy.formats: [pt2, onnx]``), checked with ONNX Runtime.

``export_onnx`` converts the model with torch's own exporter (``torch.onnx.export(..., dynamo=True)``: it
``torch.export``s the model and translates the graph with onnxscript; batch dimension dynamic), runs the ONNX
model with ONNX Runtime on the whole test split and refuses it unless its logits are within
``ATOL`` + ``RTOL`` · |logit| of PyTorch's and its accuracy is the same. It writes ``deploy/student.onnx``
(atomically; the run's manifest then records its sha256, which ``raydistill verify`` checks) and returns the
figures for the report: accuracy, the largest logit difference, and ONNX Runtime's CPU latency at batch 1
and 64 measured exactly as every report row is (``core.metrics.latency_ms`` on ``LATENCY_THREADS`` threads),
next to PyTorch's.

``deploy.formats`` with ``onnx_int8``: ``export_onnx_int8`` quantizes that ONNX model to static int8 with ONNX
Runtime's own tool (``onnxruntime.quantization.quantize_static``: QDQ format, per-channel int8 weights, uint8
activations, ranges calibrated by MinMax on ``quantize.calibration_samples`` validation samples read through a
``CalibrationDataReader``; ``reduce_range`` on CPUs without VNNI, as ONNX Runtime advises). It writes
``deploy/student_int8.onnx`` and reports its accuracy, its top-1 agreement with the fp32 PyTorch model, size and
latency. int8 logits cannot match fp32 to the fp32 tolerance, so it is not refused on them; the report shows
the accuracy drop.

A model the exporter cannot convert is a ``ModelError`` naming the op (``check_onnx_exportable`` runs the
export on the untrained student before any training, so it fails in seconds, not after the run).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from raydistill.checkpoints import atomic_write_bytes
from raydistill.core.metrics import LATENCY_BUDGET_S
from raydistill.errors import ConfigError, ModelError

ONNX_FILE = "student.onnx"
ONNX_INT8_FILE = "student_int8.onnx"
META_FILE = "artifact.json"  # export.META_FILE: the deploy folder's description, shared with the pt2 export
# ONNX Runtime vs PyTorch on the same fp32 weights: kernels differ (fused conv/BN, other summation order), so
# logits agree to ~1e-6 relative, not bit for bit; a wrong graph misses by orders of magnitude more.
ATOL, RTOL = 1e-4, 1e-3


def _problem(error: BaseException) -> str:
    """The op the exporter could not convert (named from its error chain), or the error's first line."""
    seen, chain = set(), []
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = "\n".join(str(c) for c in chain)
    op = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)", text)
    if op:
        return f"op {op.group(1)}.{op.group(2)} has no ONNX translation"
    node = re.search(r"target=(torch\.ops\.[\w.]+|<[^>]+>)", text)
    if node:
        return f"op {node.group(1).removeprefix('torch.ops.')} could not be translated"
    last = chain[-1]
    first = (str(last).strip().splitlines() or [type(last).__name__])[0]
    return f"{type(last).__name__}: {first[:160]}"


def to_onnx(model: nn.Module, example: Tensor, optimize: bool = True) -> bytes:
    """``model`` as a serialized ONNX ModelProto (input ``input`` (batch, ...), output ``logits``), or a
    ``ModelError`` naming the op that does not convert. ``optimize``: onnxscript's graph optimizer (constant
    folding, ...), about half the export time; the check before training leaves it out."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # exporter deprecation notes; the ONNX Runtime check says if it is right
            program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, input_names=["input"],
                                        output_names=["logits"], dynamic_shapes=({0: torch.export.Dim.AUTO},),
                                        optimize=optimize)
    except Exception as e:  # torch.onnx.OnnxExporterError, or torch.export's own errors for its step
        raise ModelError(f"the student cannot be exported to ONNX: {_problem(e)}; use a model without that op "
                         "or remove onnx from deploy.formats") from e
    return program.model_proto.SerializeToString()


class OrtModel(nn.Module):
    """An ONNX Runtime CPU session behind the ``nn.Module`` call the metrics take (tensor in, logits out), so
    accuracy and latency are measured by the same functions as every other report row."""

    def __init__(self, onnx_bytes: bytes, threads: int):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: its warnings are not the user's to act on
        self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        x = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0])


class _Batches:
    """ONNX Runtime's ``CalibrationDataReader`` protocol (``get_next`` -> feed dict, ``None`` at the end) over
    (N, ...) float32 batches; quantize_static accepts any object with ``get_next`` (its ``__subclasshook__``)."""

    def __init__(self, input_name: str, batches: list[np.ndarray]):
        self.input_name, self.batches = input_name, iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def to_onnx_int8(onnx_bytes: bytes, calibration: Tensor, batch_size: int = 64) -> bytes:
    """The fp32 ONNX model ``onnx_bytes`` as a static int8 ONNX model (QDQ), calibrated on ``calibration``
    ((N, ...) inputs; MinMax over all of them, ``batch_size`` rows per calibration run)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from raydistill.core.quantize import needs_reduced_range

    if calibration.shape[0] == 0:
        raise ValueError("onnx_int8 needs at least one calibration sample")
    x = np.ascontiguousarray(calibration.detach().cpu().numpy(), dtype=np.float32)
    input_name = onnx.load_from_string(onnx_bytes).graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="raydistill-onnx-int8-") as tmp:
        fp32, prepared, int8 = (Path(tmp) / n for n in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        fp32.write_bytes(onnx_bytes)
        # ONNX Runtime's recommended first step: shape inference and graph optimization (e.g. BatchNorm folded
        # into the conv) so that the quantizer sees the ops it has int8 kernels for.
        quant_pre_process(str(fp32), str(prepared))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(str(prepared), str(int8), _Batches(input_name, list(np.array_split(
                x, max(1, -(-len(x) // batch_size))))), quant_format=QuantFormat.QDQ, per_channel=True,
                reduce_range=needs_reduced_range(), activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        return int8.read_bytes()


def export_onnx_int8(model: nn.Module, onnx_bytes: bytes | None, test_batches: Callable[[], Iterable[tuple[Tensor,
                     Tensor]]], example: Tensor, calibration: Tensor, out_dir: str | Path,
                     torch_row: dict[str, Any], normalization: dict | None = None,
                     latency_budget_s: float = LATENCY_BUDGET_S) -> dict[str, Any]:
    """Quantize the ONNX export of ``model`` (``onnx_bytes``, or exported here when ``None``) to static int8 with
    ONNX Runtime, calibrated on ``calibration`` (validation inputs), and write ``out_dir/student_int8.onnx``.

    Returns ``{"file", "sha256", "size_bytes", "fp32_onnx_size_bytes", "accuracy", "torch_accuracy",
    "agreement", "max_abs_diff", "calibration_samples", "reduce_range", "latency_ms_b1", "latency_ms_b64",
    "torch_latency_ms_b1", "torch_latency_ms_b64", "onnxruntime"}``: ``agreement`` is the fraction of test
    samples whose top-1 class equals the fp32 PyTorch model's."""
    import hashlib

    import onnxruntime as ort

    from raydistill.core.quantize import needs_reduced_range
    from raydistill.evaluate import LATENCY_THREADS, latencies

    model = model.cpu().eval()
    example = example[:2] if len(example) >= 2 else torch.cat([example, example])
    fp32 = onnx_bytes if onnx_bytes is not None else to_onnx(model, example)
    data = to_onnx_int8(fp32, calibration)
    ort_model = OrtModel(data, threads=LATENCY_THREADS)
    diff, agree, correct, total = 0.0, 0, 0, 0
    with torch.no_grad():
        for x, y in test_batches():
            expected, got = model(x), ort_model(x)
            diff = max(diff, float((got - expected).abs().max()))
            agree += int((got.argmax(1) == expected.argmax(1)).sum())
            correct += int((got.argmax(1) == y).sum())
            total += len(y)
    shape = tuple(example.shape[1:])
    b1, b64 = latencies(ort_model, shape, latency_budget_s)
    out = Path(out_dir)
    atomic_write_bytes(out / ONNX_INT8_FILE, data)
    sha = hashlib.sha256(data).hexdigest()
    _record_in_artifact_json(out, ONNX_INT8_FILE, sha, shape, normalization)
    return {"file": str(out / ONNX_INT8_FILE), "sha256": sha, "size_bytes": len(data),
            "fp32_onnx_size_bytes": len(fp32), "accuracy": correct / max(total, 1),
            "torch_accuracy": torch_row["accuracy"], "agreement": agree / max(total, 1), "max_abs_diff": diff,
            "calibration_samples": int(calibration.shape[0]), "reduce_range": needs_reduced_range(),
            "latency_ms_b1": b1, "latency_ms_b64": b64, "torch_latency_ms_b1": torch_row["latency_ms_b1"],
            "torch_latency_ms_b64": torch_row["latency_ms_b64"], "onnxruntime": ort.__version__}


def check_onnx_exportable(model: nn.Module, example: Tensor) -> None:
    """Before training: the ONNX packages are installed and the (untrained) student converts to ONNX (pruning
    removes channels, never ops)."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"deploy.formats has onnx but {', '.join(missing)} is not installed; "
                          "pip install 'raydistill[onnx]' or remove onnx from deploy.formats")
    to_onnx(model.eval(), example, optimize=False)


def check_against_torch(ort_model: nn.Module, model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                        torch_acc: float) -> tuple[float, float]:
    """(largest logit difference, ONNX Runtime's accuracy) over the (x, y) ``batches``; a ``ModelError`` unless
    every logit is within ``ATOL`` + ``RTOL`` · |logit| of ``model``'s and the accuracy equals ``torch_acc``."""
    diff, close, correct, total = 0.0, True, 0, 0
    with torch.no_grad():
        for x, y in batches:
            expected, got = model(x), ort_model(x)
            diff = max(diff, float((got - expected).abs().max()))
            close = close and torch.allclose(got, expected, atol=ATOL, rtol=RTOL)
            correct += int((got.argmax(1) == y).sum())
            total += len(y)
    onnx_acc = correct / max(total, 1)
    if not close or onnx_acc != torch_acc:
        raise ModelError(f"ONNX Runtime does not reproduce the student on the test split (largest logit "
                         f"difference {diff:.3g}, tolerance {ATOL:g} + {RTOL:g}·|logit|; accuracy {onnx_acc:.4f} "
                         f"vs PyTorch {torch_acc:.4f}); remove onnx from deploy.formats and report it")
    return diff, onnx_acc


def export_onnx(model: nn.Module, test_batches: Callable[[], Iterable[tuple[Tensor, Tensor]]], example: Tensor,
                out_dir: str | Path, torch_row: dict[str, Any], normalization: dict | None = None,
                latency_budget_s: float = LATENCY_BUDGET_S) -> dict[str, Any]:
    """Export ``model`` to ``out_dir/student.onnx`` once ONNX Runtime reproduces it on the test split.

    ``test_batches()`` yields the test split's (x, y) batches (read batch by batch: the split may be streamed);
    ``example`` is a batch of test inputs (two rows are used). ``torch_row`` is the model's report row
    (``evaluate_on_test``): its accuracy and latency are the PyTorch side of the comparison. Returns ``{"file",
    "sha256", "size_bytes", "accuracy", "torch_accuracy", "max_abs_diff", "atol", "rtol", "latency_ms_b1",
    "latency_ms_b64", "torch_latency_ms_b1", "torch_latency_ms_b64", "onnxruntime", "opset"}``."""
    import hashlib

    import onnxruntime as ort

    from raydistill.evaluate import LATENCY_THREADS, latencies

    model = model.cpu().eval()
    example = example[:2] if len(example) >= 2 else torch.cat([example, example])  # a size-1 batch would be pinned
    data = to_onnx(model, example)
    ort_model = OrtModel(data, threads=LATENCY_THREADS)
    torch_acc = torch_row["accuracy"]
    diff, onnx_acc = check_against_torch(ort_model, model, test_batches(), torch_acc)
    shape = tuple(example.shape[1:])
    b1, b64 = latencies(ort_model, shape, latency_budget_s)
    import onnx

    proto = onnx.load_from_string(data)
    out = Path(out_dir)
    atomic_write_bytes(out / ONNX_FILE, data)
    sha = hashlib.sha256(data).hexdigest()
    _record_in_artifact_json(out, ONNX_FILE, sha, shape, normalization)
    return {"file": str(out / ONNX_FILE), "sha256": sha, "size_bytes": len(data), "accuracy": onnx_acc,
            "torch_accuracy": torch_acc, "max_abs_diff": diff, "atol": ATOL, "rtol": RTOL,
            "latency_ms_b1": b1, "latency_ms_b64": b64, "torch_latency_ms_b1": torch_row["latency_ms_b1"],
            "torch_latency_ms_b64": torch_row["latency_ms_b64"], "onnxruntime": ort.__version__,
            "opset": max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None)}


def _record_in_artifact_json(out: Path, name: str, sha: str, shape: tuple[int, ...],
                             normalization: dict | None = None) -> None:
    """Add ``name`` (an ONNX file) to the deploy folder's ``artifact.json`` (written by the pt2 export), or write
    one; either way it says the input's normalization (``data.input_normalization``), as the pt2 export's does."""
    path = out / META_FILE
    meta = json.loads(path.read_text()) if path.is_file() else {
        "primary": name, "format": "onnx", "input_shape": list(shape), "input_dtype": "float32", "files": {}}
    meta["files"][name] = sha
    meta.setdefault("input_normalization", normalization)
    atomic_write_bytes(path, json.dumps(meta, indent=2).encode())


def remove_stale_onnx(out_dir: str | Path) -> None:
    """A run that no longer asks for ONNX must not leave an older model's ``student.onnx`` or
    ``student_int8.onnx`` behind."""
    for name in (ONNX_FILE, ONNX_INT8_FILE):
        stale = Path(out_dir) / name
        if stale.exists():
            stale.unlink()
