"""Deployable artifacts and the deploy gate.

``export_model`` writes a folder that predicts in a fresh Python process with only torch
installed (no raydistill, no torchao, no numpy):

* ``student.pt2``: a ``torch.export`` program (``torch.export.save``), batch size dynamic;
* ``student.torchscript.pt``: the same model traced with TorchScript, when tracing works
  (a fallback for runtimes without ``torch.export.load``; TorchScript is in maintenance mode);
* ``predict.py``: loads the artifact and prints one predicted class per input row;
* ``artifact.json``: formats, input shape, the input's normalization (scale, per-channel mean and std), sha256
  of each file, torch version.

Each artifact is loaded back and checked against the model before it is written; every
file is written atomically (temporary file, then ``os.replace``).

``deploy_gate`` decides whether a student may be exported (``deploy.min_accuracy``,
``deploy.min_ratio_to_teacher``); ``export_if_gate_passes`` exports only when it passed and
writes nothing otherwise.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from raydistill.checkpoints import atomic_write_bytes
from raydistill.errors import ConfigError, ModelError

__all__ = [
    "ARTIFACT_FILES",
    "DEPLOY_FORMATS",
    "PREDICT_SCRIPT",
    "deploy_gate",
    "export_if_gate_passes",
    "export_model",
]

PT2_FILE = "student.pt2"
TORCHSCRIPT_FILE = "student.torchscript.pt"
PREDICT_FILE = "predict.py"
META_FILE = "artifact.json"
ARTIFACT_FILES = (PT2_FILE, TORCHSCRIPT_FILE, PREDICT_FILE, META_FILE)
# deploy.formats: export_model's torch artifacts; onnx_export.export_onnx; onnx_export.export_onnx_int8
DEPLOY_FORMATS = ("pt2", "onnx", "onnx_int8")

# Tolerance when checking a reloaded artifact against the in-process model (same kernels,
# but export may reorder float ops).
_CHECK_ATOL = 1e-4

PREDICT_SCRIPT = '''"""Predict with the exported student, using only torch (no raydistill, no numpy).

    python predict.py INPUT [--artifact student.pt2|student.torchscript.pt] [--logits]

INPUT is a .pt file (a tensor saved with torch.save, or a dict with key "x") or a .npy
file of shape (N, C, H, W) or (C, H, W). Prints one predicted class per row, or with
--logits one JSON list of logits per row. Float input is taken as the model's input (already
normalized); uint8 input is raw 8-bit samples (image pixels 0..255, digits 0..16), normalized here as the
run normalized its data (artifact.json's input_normalization: / (1 / scale), then (x - mean) / std per channel).
"""

import argparse
import ast
import importlib
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
NPY_DTYPES = {"f4": torch.float32, "f8": torch.float64, "f2": torch.float16, "i8": torch.int64,
              "i4": torch.int32, "i2": torch.int16, "i1": torch.int8, "u1": torch.uint8}


def load_npy(path):
    """Read a C-ordered little-endian .npy array without numpy."""
    data = Path(path).read_bytes()
    if data[:6] != b"\\x93NUMPY":
        raise SystemExit(f"{path} is not a .npy file; save it with numpy.save or torch.save")
    major = data[6]
    size_bytes = 2 if major == 1 else 4
    header_len = int.from_bytes(data[8:8 + size_bytes], "little")
    start = 8 + size_bytes
    header = ast.literal_eval(data[start:start + header_len].decode("latin1"))
    descr = header["descr"]
    if header.get("fortran_order") or descr[0] == ">" or descr[1:] not in NPY_DTYPES:
        raise SystemExit(f"{path}: unsupported .npy layout {descr!r} (fortran={header.get('fortran_order')}); "
                         "save a C-ordered float32 array")
    payload = bytearray(data[start + header_len:])
    return torch.frombuffer(payload, dtype=NPY_DTYPES[descr[1:]]).reshape(header["shape"])


def load_input(path, input_shape, normalization=None):
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"input {path} does not exist; pass a .npy file or a tensor saved with torch.save")
    if path.suffix == ".npy":
        x = load_npy(path)
    else:
        try:
            x = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # not a torch.save file (pickle, zip or weights-only errors)
            raise SystemExit(f"input {path} is not a tensor saved with torch.save ({str(e).splitlines()[0][:100]}); "
                             "pass a .npy file or torch.save(tensor)")
        if isinstance(x, dict):
            if "x" not in x:
                raise SystemExit(f"input {path} holds a dict without key 'x' (keys: {sorted(map(str, x))[:5]}); "
                                 "save the samples as {'x': tensor} or as the tensor itself")
            x = x["x"]
        if not isinstance(x, torch.Tensor):
            raise SystemExit(f"input {path} holds a {type(x).__name__}, not a tensor; save the samples as a tensor")
    raw = torch.as_tensor(x)
    x = raw.float()
    if input_shape and list(x.shape) == list(input_shape):
        x = x.unsqueeze(0)  # a single sample
    if input_shape and list(x.shape[1:]) != list(input_shape):
        expected = ", ".join(map(str, input_shape))
        raise SystemExit(f"input {path} has shape {tuple(x.shape)}; the model expects (N, {expected})")
    if raw.dtype == torch.uint8:  # raw 8-bit samples: normalized as the run normalized its data
        if not normalization:
            raise SystemExit(f"input {path} is uint8 but this model takes its inputs as stored (no "
                             "input_normalization in artifact.json); pass float32 inputs")
        per_channel = (1, -1) + (1,) * (x.dim() - 2)
        mean = torch.tensor(normalization["mean"], dtype=torch.float32).reshape(per_channel)
        std = torch.tensor(normalization["std"], dtype=torch.float32).reshape(per_channel)
        x = (x / float(round(1 / normalization["scale"])) - mean) / std  # the training data's float32 operations
    return x


def load_model(path):
    path = Path(path)
    if path.suffix == ".pt2":
        try:  # int8 PT2E graphs use quantized_decomposed ops, registered by this torch module
            importlib.import_module("torch.ao.quantization.fx._decomposed")
        except ImportError:
            pass
        return torch.export.load(str(path)).module()
    return torch.jit.load(str(path), map_location="cpu").eval()


def main(argv=None):
    meta_path = HERE / "artifact.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    parser = argparse.ArgumentParser(description="Predict with the exported student (torch only).")
    parser.add_argument("input")
    parser.add_argument("--artifact", default=str(HERE / meta.get("primary", "student.pt2")))
    parser.add_argument("--logits", action="store_true")
    args = parser.parse_args(argv)
    model = load_model(args.artifact)
    x = load_input(args.input, meta.get("input_shape"), meta.get("input_normalization"))
    with torch.no_grad():
        logits = torch.cat([model(chunk) for chunk in torch.split(x, 1024)]) if len(x) else torch.empty(0)
    for row in logits:
        print(json.dumps([round(v, 6) for v in row.tolist()]) if args.logits else int(row.argmax()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _example_batch(example_input: Tensor) -> Tensor:
    """A batch of >= 2 rows: torch.export specializes a size-1 dimension to a constant."""
    x = torch.as_tensor(example_input).detach().cpu().float()
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"example_input must be a batch (N, ...) with N >= 1, got shape {tuple(x.shape)}; "
                         "pass e.g. x_test[:2]")
    return x[:2] if x.shape[0] >= 2 else torch.cat([x, x])


def _has_tensor_subclass(model: nn.Module) -> bool:
    return any(type(t) not in (Tensor, nn.Parameter) for t in list(model.parameters()) + list(model.buffers()))


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"


# Op namespaces a stock torch can deserialize (quantized_decomposed: int8 PT2E graphs, registered
# by torch.ao.quantization.fx._decomposed, which predict.py imports).
_TORCH_OP_NAMESPACES = {"aten", "prims", "quantized_decomposed", "higher_order"}


def _torch_only_problem(program: torch.export.ExportedProgram) -> str | None:
    """Why ``program`` would not load with plain torch (torchao tensor subclasses or ops), or None."""
    for name, value in list(program.state_dict.items()) + list(program.constants.items()):
        if isinstance(value, Tensor) and type(value) not in (Tensor, nn.Parameter):
            return f"it stores {name} as {type(value).__name__}, which only loads with torchao installed"
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            namespace = getattr(node.target, "namespace", None)
            if namespace is not None:
                if namespace not in _TORCH_OP_NAMESPACES:
                    return f"it calls {namespace} op {node.target}, which only loads with that library installed"
            elif not str(getattr(node.target, "__module__", "") or "").startswith(
                    ("_operator", "operator", "builtins", "math", "torch")):
                return f"it calls {node.target}, which is not part of torch"
    return None


def _export_pt2(model: nn.Module, example: Tensor, expected: Tensor) -> bytes:
    # AUTO: the batch dimension stays dynamic unless the model pins it; the batch-1 check
    # below catches a pinned one.
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    problem = _torch_only_problem(program)
    if problem:
        raise RuntimeError(f"the exported program would not load with torch only: {problem}")
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    data = buffer.getvalue()
    reloaded = torch.export.load(io.BytesIO(data)).module()
    with torch.no_grad():
        _check_same(reloaded(example), expected, "torch.export")
        _check_same(reloaded(example[:1]), expected[:1], "torch.export at batch 1")
    return data


def _export_torchscript(model: nn.Module, example: Tensor, expected: Tensor) -> bytes:
    if _has_tensor_subclass(model):
        # Measured: torch.jit.save segfaults on a trace holding torchao tensor subclasses (torch 2.14).
        raise RuntimeError("TorchScript cannot save torchao tensor subclasses")
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.14 marks TorchScript deprecated (FutureWarning) and warns about traced
        # asserts; the reload check below is what tells whether the trace is right.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, (example,), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        data = buffer.getvalue()
        reloaded = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
        _check_same(reloaded(example), expected, "TorchScript")
        _check_same(reloaded(example[:1]), expected[:1], "TorchScript at batch 1")
    return data


def _check_same(actual: Tensor, expected: Tensor, what: str) -> None:
    if actual.shape != expected.shape or not torch.allclose(actual, expected, atol=_CHECK_ATOL, rtol=1e-4):
        raise RuntimeError(f"the reloaded {what} artifact predicts differently from the model")


def export_model(model: nn.Module, example_input: Tensor, out_dir: str | os.PathLike,
                 normalization: dict | None = None) -> dict[str, Any]:
    """Write a torch-only deployable artifact of ``model`` into ``out_dir``; return its description.

    ``example_input`` is a batch (N, C, H, W) of real or random inputs (only its shape and
    first two rows are used). Returns ``{"artifact": path of the primary file, "sha256": its
    digest, "format": "torch.export" or "torchscript", "files": {name: sha256}, "errors":
    {format: reason} for a format that could not be written}``. Raises ``ValueError`` when
    neither format works for this model.
    """
    out = Path(out_dir)
    model = copy.deepcopy(model).cpu()
    model.eval()
    if _has_tensor_subclass(model):
        # torchao int8 weights (tensor subclasses) are pickled as torchao classes; torchao's
        # unwrap turns Linear ones into plain tensors + aten ops so torch.export output loads
        # with torch alone (checked: weight_only yes; dynamic/conv weights still need torchao).
        from torchao.utils import unwrap_tensor_subclass

        model = unwrap_tensor_subclass(model)
    example = _example_batch(example_input)
    with torch.no_grad():
        expected = model(example)
        # The single-row output is checked too: the artifact must serve batch 1 as well as N.
        expected_one = model(example[:1])
    if not torch.allclose(expected[:1], expected_one, atol=_CHECK_ATOL, rtol=1e-4):
        raise ModelError("the model's output for a sample depends on the rest of its batch (train-mode "
                         "BatchNorm?); put it in eval mode before exporting")

    artifacts: dict[str, bytes] = {}
    errors: dict[str, str] = {}
    for fmt, filename, write in (("torch.export", PT2_FILE, _export_pt2),
                                 ("torchscript", TORCHSCRIPT_FILE, _export_torchscript)):
        try:
            artifacts[filename] = write(model, example, expected)
        except Exception as e:  # one format failing is fine as long as the other works
            errors[fmt] = _first_line(e)
    if not artifacts:
        raise ModelError(f"the model could not be exported ({'; '.join(f'{k}: {v}' for k, v in errors.items())}); "
                         "export the fp32 model or a weight_only / pt2e_x86 int8 one, with a traceable forward")
    primary = PT2_FILE if PT2_FILE in artifacts else TORCHSCRIPT_FILE
    files = {name: _sha256(data) for name, data in artifacts.items()}
    files[PREDICT_FILE] = _sha256(PREDICT_SCRIPT.encode())
    meta = {"primary": primary, "format": "torch.export" if primary == PT2_FILE else "torchscript",
            "input_shape": list(example.shape[1:]), "input_dtype": "float32",
            # what a raw sample goes through before the model (data.input_normalization); None: taken as stored
            "input_normalization": normalization,
            "num_outputs": int(expected.shape[-1]), "torch": torch.__version__, "files": files, "errors": errors}

    out.mkdir(parents=True, exist_ok=True)
    for stale in (PT2_FILE, TORCHSCRIPT_FILE):
        # A format that failed this time must not leave an older model's file behind.
        if stale not in artifacts and (out / stale).exists():
            (out / stale).unlink()
    for name, data in artifacts.items():
        atomic_write_bytes(out / name, data)
    atomic_write_bytes(out / PREDICT_FILE, PREDICT_SCRIPT.encode())
    atomic_write_bytes(out / META_FILE, json.dumps(meta, indent=2).encode())
    return {"artifact": str(out / primary), "sha256": files[primary], "format": meta["format"],
            "files": files, "errors": errors}


# ---- deploy gate --------------------------------------------------------------------------------------------
def _check_fraction(label: str, value: float | None, allow_none: bool, upper: float = 1.0) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= upper:
        raise ConfigError(f"{label} must be a number in [0, {upper:g}], got {value!r}; fix it in the config")


def _bound_check(bound: str, required: float, actual: float, subject: str) -> dict[str, Any]:
    # A hair of slack so 0.95 required vs 0.95 measured (two float computations) passes.
    passed = actual >= required - 1e-12
    short_by = 0.0 if passed else required - actual
    message = (f"{subject} {actual:.3f} meets deploy.{bound} {required:.3f}" if passed else
               f"{subject} {actual:.3f} is below deploy.{bound} {required:.3f} by {short_by:.3f}")
    return {"bound": bound, "required": required, "actual": actual, "passed": passed, "short_by": short_by,
            "message": message}


def deploy_gate(student_acc: float, teacher_acc: float, min_accuracy: float | None,
                min_ratio_to_teacher: float | None) -> dict[str, Any]:
    """Whether the student may be deployed: every configured bound must hold.

    ``min_accuracy``: the student's test accuracy must be >= it. ``min_ratio_to_teacher``:
    student accuracy / teacher accuracy must be >= it (1.0 = match the teacher). A bound
    that is ``None`` is not checked; with no bound the gate passes. Returns
    ``{"passed", "checks": [{"bound", "required", "actual", "passed", "short_by",
    "message"}], "message"}`` where ``message`` names each failed bound and by how much.
    """
    _check_fraction("student accuracy", student_acc, allow_none=False)
    _check_fraction("teacher accuracy", teacher_acc, allow_none=min_ratio_to_teacher is None)
    _check_fraction("deploy.min_accuracy", min_accuracy, allow_none=True)
    if min_ratio_to_teacher is not None:
        _check_fraction("deploy.min_ratio_to_teacher", min_ratio_to_teacher, allow_none=False, upper=10.0)
    checks = []
    if min_accuracy is not None:
        checks.append(_bound_check("min_accuracy", float(min_accuracy), float(student_acc), "student accuracy"))
    if min_ratio_to_teacher is not None:
        if not teacher_acc:
            raise ConfigError("deploy.min_ratio_to_teacher needs a teacher accuracy above 0; "
                             "check the teacher or drop the bound")
        checks.append(_bound_check("min_ratio_to_teacher", float(min_ratio_to_teacher),
                                   float(student_acc) / float(teacher_acc), "student/teacher accuracy ratio"))
    passed = all(c["passed"] for c in checks)
    failed = [c["message"] for c in checks if not c["passed"]]
    if not checks:
        message = "no deploy bound is set (deploy.min_accuracy, deploy.min_ratio_to_teacher); exporting"
    elif passed:
        message = "; ".join(c["message"] for c in checks)
    else:
        message = "; ".join(failed) + "; not exported"
    return {"passed": passed, "checks": checks, "message": message}


def export_if_gate_passes(model: nn.Module, example_input: Tensor, out_dir: str | os.PathLike,
                          gate: dict[str, Any], normalization: dict | None = None) -> dict[str, Any] | None:
    """``export_model`` when ``gate["passed"]``; otherwise write nothing and return None."""
    if not gate.get("passed"):
        return None
    return export_model(model, example_input, out_dir, normalization)
