"""Model quality and cost metrics: accuracy, parameters, MACs, latency, size, sparsity.

Everything here is plain torch, so a report row can be computed for any ``nn.Module``
(teacher, distilled student, pruned or quantized model) the same way.
"""

from __future__ import annotations

import contextlib
import copy
import io
import statistics
import time
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "accuracy",
    "count_params",
    "count_macs",
    "latency_ms",
    "size_bytes",
    "weight_sparsity",
    "model_summary",
]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore each submodule's own train flag afterwards.

    Restoring per submodule (not ``model.train(previous)``) keeps deliberately frozen
    parts, e.g. a BatchNorm left in eval inside a training model, exactly as they were.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _device_of(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer; CPU for a stateless model."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``x`` (N, ...) with labels ``y`` (N,), in [0, 1].

    Runs in eval mode under ``no_grad`` on the model's device, ``batch_size`` rows at a
    time, and restores the previous train/eval mode of every submodule.
    """
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"accuracy got {x.shape[0]} inputs but {y.shape[0]} labels; "
            "pass x and y of equal length"
        )
    if x.shape[0] == 0:
        raise ValueError("accuracy got an empty evaluation set; pass at least one sample")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}; pass a positive batch size")
    device = _device_of(model)
    correct = 0
    with _eval_mode(model), torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            correct += int((model(xb).argmax(dim=1) == yb).sum().item())
    return correct / x.shape[0]


def accuracy_over(model: nn.Module, batches) -> float:
    """Top-1 accuracy of ``model`` over an iterable of (x (B, ...), y (B,)) batches (array-likes), in [0, 1]:
    for data that is read batch by batch and never held whole. Eval mode, ``no_grad``, modes restored."""
    device = _device_of(model)
    correct = total = 0
    with _eval_mode(model), torch.no_grad():
        for xb, yb in batches:
            xb, yb = torch.as_tensor(xb).to(device), torch.as_tensor(yb).to(device)
            correct += int((model(xb).argmax(dim=1) == yb).sum().item())
            total += len(yb)
    if total == 0:
        raise ValueError("accuracy got an empty evaluation set; pass at least one sample")
    return correct / total


def count_params(model: nn.Module) -> int:
    """Number of parameter entries (trainable or not; shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_input: Tensor) -> int:
    """Multiply-accumulates of one forward pass for a batch of 1.

    ``example_input`` is (B, ...) with B >= 1; only its first row is used. Counted with
    ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) rather than torch-pruning's
    hook-based counter: it traces the aten ops actually executed, so functional calls
    (``F.linear``, matmuls in attention) are counted, and it reports the textbook MACs of
    matmuls/convolutions only (Linear(10, 5) -> 50), while torch-pruning also adds bias,
    BatchNorm and activation terms. Elementwise ops, pooling and norms count as 0.
    """
    example_input = torch.as_tensor(example_input)
    if example_input.dim() == 0 or example_input.shape[0] < 1:
        raise ValueError(
            "count_macs needs an example input with a batch dimension, e.g. shape (1, C, H, W)"
        )
    x = example_input[:1].to(_device_of(model))
    counter = FlopCounterMode(display=False)
    with _eval_mode(model), torch.no_grad(), counter:
        model(x)
    return int(counter.get_total_flops() // 2)


LATENCY_BUDGET_S = 2.0  # latency_ms's default time cap (seconds per model and batch size)


def latency_ms(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int,
    repeats: int = 30,
    warmup: int = 5,
    num_threads: int | None = None,
    budget_s: float = LATENCY_BUDGET_S,
) -> float:
    """Median wall-clock ms of one CPU forward pass on a random (batch_size, *input_shape) input.

    Uses eval mode and ``torch.inference_mode``; timing is ``time.perf_counter`` around
    each call. A model living on another device is timed on a CPU copy, so the caller's
    model is never moved. ``num_threads`` pins ``torch.set_num_threads`` for the
    measurement (restored afterwards) so numbers are comparable across machines.
    ``budget_s`` caps the time spent: a big model stops after at least 3 timed runs once the
    budget is used (a ResNet-18 at batch 64 on 2 CPU cores would otherwise take a minute); with
    ``budget_s=0`` every model gets one warm-up run and 3 timed runs.
    """
    if batch_size < 1 or repeats < 1 or warmup < 0 or budget_s < 0:
        raise ValueError(
            f"latency_ms needs batch_size >= 1, repeats >= 1, warmup >= 0, budget_s >= 0; "
            f"got {batch_size}, {repeats}, {warmup}, {budget_s}"
        )
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
    if _device_of(model).type != "cpu":
        model = copy.deepcopy(model).cpu()
    x = torch.randn(batch_size, *tuple(input_shape))
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    timings = []
    try:
        with _eval_mode(model), torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(warmup):
                model(x)
                if time.perf_counter() - t0 > budget_s / 2:
                    break
            t0 = time.perf_counter()
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                timings.append((time.perf_counter() - start) * 1000.0)
                if len(timings) >= 3 and time.perf_counter() - t0 > budget_s:
                    break
    finally:
        torch.set_num_threads(previous_threads)
    return float(statistics.median(timings))


def size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``, i.e. the checkpoint size on disk."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def sparse_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save`` of the state dict with every Linear/Conv weight stored sparse: a bitmap of its
    non-zeros (``numpy.packbits``, one bit per weight) plus the non-zero values; every other tensor dense.

    What an unstructured-pruned model costs on disk in a simple sparse encoding (at 50 % sparsity a float32
    weight takes 1/2 + 1/32 of its dense bytes). Its forward pass is as dense as before: unstructured
    sparsity saves storage, not dense compute.
    """
    import numpy as np

    weights = {f"{name}.weight" for name, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(m.weight, torch.Tensor)}
    state = {}
    for key, t in model.state_dict().items():
        t = t.detach().cpu()
        if key in weights:
            nonzero = t != 0
            state[key] = {"shape": list(t.shape), "dtype": str(t.dtype),
                          "bitmap": torch.from_numpy(np.packbits(nonzero.flatten().numpy())), "values": t[nonzero]}
        else:
            state[key] = t
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries among the weights of Linear and Conv layers.

    Biases, norms and embeddings are excluded: pruning zeroes layer weights, and those
    dominate the cost. ``module.weight`` also works for ``torch.nn.utils.prune``-masked
    layers. Returns 0.0 for a model without such layers.
    """
    zeros = 0
    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            weight = module.weight
            if weight is None or isinstance(weight, nn.parameter.UninitializedParameter):
                continue
            if type(weight) not in (torch.Tensor, nn.Parameter):  # a quantized tensor subclass (torchao)
                weight = weight.dequantize() if hasattr(weight, "dequantize") else None
                if weight is None:
                    continue
            zeros += int((weight == 0).sum().item())
            total += weight.numel()
    return zeros / total if total else 0.0


def model_summary(
    model: nn.Module, example_input: Tensor, x_test: Tensor, y_test: Tensor
) -> dict:
    """One report row for ``model``.

    ``example_input`` is (B, C, H, W) (only its per-sample shape and first row are used);
    ``x_test`` (N, C, H, W), ``y_test`` (N,). Keys: accuracy, params, macs (batch 1),
    latency_ms_b1, latency_ms_b64 (CPU), size_bytes, sparsity.
    """
    return {"accuracy": accuracy(model, x_test, y_test), **model_costs(model, example_input)}


def model_costs(model: nn.Module, example_input: Tensor, latency_budget_s: float = LATENCY_BUDGET_S) -> dict:
    """What ``model`` costs: params, macs (batch 1), latency_ms_b1, latency_ms_b64 (CPU, ``latency_ms`` with
    ``budget_s=latency_budget_s``), size_bytes, sparsity; ``example_input`` (B, ...) gives the sample shape."""
    example_input = torch.as_tensor(example_input)
    input_shape = tuple(example_input.shape[1:])
    return {
        "params": count_params(model),
        "macs": count_macs(model, example_input),
        "latency_ms_b1": latency_ms(model, input_shape, batch_size=1, budget_s=latency_budget_s),
        "latency_ms_b64": latency_ms(model, input_shape, batch_size=64, budget_s=latency_budget_s),
        "size_bytes": size_bytes(model),
        "sparsity": weight_sparsity(model),
    }
