"""Post-training int8 quantization of a trained model with torchao (plain torch, no Ray).

``quantize_int8(model, scheme)`` returns a quantized deep copy; the input model is never
modified. Schemes, and what each stores as int8 (torch 2.14, torchao 0.18):

* ``auto`` (the default): chosen by what the model contains (``choose_scheme``): ``weight_only_conv``
  when it has a Conv2d whose weights can be int8, else ``weight_only``. A CNN's weights are
  mostly conv weights, so a Linear-only scheme leaves it near fp32 size (torchvision ResNet-18:
  44,803,531 -> 44,789,255 bytes with ``weight_only``, 3.9x smaller with ``weight_only_conv``).
* ``weight_only``: ``quantize_`` + ``Int8WeightOnlyConfig``; Linear weights; runs eagerly.
* ``weight_only_conv``: ``quantize_`` + ``IntxWeightOnlyConfig(weight_dtype=torch.int8)``;
  Linear and Conv2d weights; runs eagerly (weights dequantized per call).
* ``dynamic``: ``quantize_`` + ``Int8DynamicActivationInt8WeightConfig``; Linear weights,
  activations quantized per token at run time (int8 matmul); runs eagerly.
* ``pt2e_x86``: ``prepare_pt2e``/``convert_pt2e`` with ``X86InductorQuantizer``; static
  int8 activations and weights for Conv2d and Linear (BatchNorm folded), calibrated; an
  exported graph (``torch.fx.GraphModule``). Works on torchvision ResNet-18 and MobileNetV2:
  a module called twice (ResNet's BasicBlock applies one ``self.relu`` after conv1 and after the
  residual add) is split into one partition per call first (``_split_repeated_module_calls``).

``quantize_`` filters to ``nn.Linear`` by default, and ``Int8Tensor`` (behind the first and
third scheme) has no conv kernel, so for a CNN those schemes leave every Conv2d in fp32.
``weight_only_conv`` uses ``IntxUnpackedToInt8Tensor``, which implements conv2d by
dequantizing the weight; torchao 0.18 fails to pick qparams for a conv with one input
channel (a 3x3x1 kernel per output channel), so such convs (tiny: the digits stem has 144
weights) stay fp32. ``pt2e_x86`` needs ``calibration_data`` and returns a
``torch.fx.GraphModule`` in PT2E reference form (quantize/dequantize around fp32 ops): its
activation scales are constants in the graph, so it is saved as an exported program
(``raydistill.export.export_model``), not as a state dict.

What we measured on a 2-core AMD EPYC (AVX2, no VNNI), torch 2.14.1, torchao 0.18.0, one
thread (``benchmarks/quantization.py``; numbers in ``docs/deploy.md``): no int8 scheme is
reliably faster than fp32 for the digits student, eagerly or under ``torch.compile``; the
checkpoint shrinks 1.7x to 2.9x. For a CIFAR-shaped torchvision ResNet-18 (3x32x32):
``weight_only`` 1.00x, ``weight_only_conv`` 3.90x and ``pt2e_x86`` 3.97x smaller, no accuracy
lost, both slower than fp32 eagerly. ``DEFAULT_SCHEME`` is the scheme chosen from those measurements.
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_SCHEME",
    "SCHEMES",
    "choose_scheme",
    "int8_fraction",
    "load_quantized",
    "needs_reduced_range",
    "quantize_int8",
]

SCHEMES: dict[str, str] = {
    "auto": "chosen by the model: weight_only_conv if it has convolutions, else weight_only",
    "weight_only": "int8 per-channel weights for Linear layers (torchao Int8WeightOnlyConfig)",
    "weight_only_conv": "int8 per-channel weights for Linear and Conv2d layers (torchao IntxWeightOnlyConfig)",
    "dynamic": "int8 dynamic per-token activations + int8 weights for Linear layers "
               "(torchao Int8DynamicActivationInt8WeightConfig)",
    "pt2e_x86": "static int8 activations + weights for Conv2d and Linear, calibrated "
                "(torchao PT2E flow, X86InductorQuantizer)",
}
# Chosen by measurement (benchmarks/quantization.py, docs/deploy.md): on this CPU no scheme is
# faster than fp32, so the default shrinks the weights at the smallest latency and accuracy cost
# and saves/loads as a plain state dict, and for a CNN that means quantizing the convs too.
DEFAULT_SCHEME = "auto"

# Batches of calibration data used for pt2e_x86 when the caller passes more.
_MAX_CALIBRATION_BATCHES = 16


def _check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown int8 scheme {scheme!r}; use one of: {', '.join(SCHEMES)}")
    return scheme


def _is_linear(module: nn.Module, fqn: str = "") -> bool:
    return isinstance(module, nn.Linear)


def _is_linear_or_conv(module: nn.Module, fqn: str = "") -> bool:
    # A Conv2d with one input channel is skipped: torchao 0.18's IntxUnpackedToInt8Tensor
    # fails to reshape its scales ("shape [C,1,k,k] is invalid for input of size 1").
    if isinstance(module, nn.Conv2d):
        return module.in_channels // module.groups > 1
    return isinstance(module, nn.Linear)


def choose_scheme(model: nn.Module, scheme: str = "auto") -> tuple[str, str]:
    """(the concrete scheme for ``model``, why): ``scheme`` itself unless it is ``auto``.

    ``auto`` quantizes conv weights whenever the model has convolutions torchao can quantize
    (``weight_only_conv``), and Linear weights otherwise (``weight_only``): both run eagerly and
    save as a state dict, so ``auto`` changes what is int8, not how the model is stored.
    """
    _check_scheme(scheme)
    if scheme != "auto":
        return scheme, "set by quantize.scheme"
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and _is_linear_or_conv(m)]
    if convs:
        conv_weights = sum(m.weight.numel() for m in convs)
        all_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        layers = f"{len(convs)} Conv2d layer{'s' * (len(convs) != 1)}"
        return "weight_only_conv", (f"auto: the model has {layers} with int8-capable weights, "
                                    f"{conv_weights / max(all_weights, 1):.1%} of its Conv2d/Linear weights")
    return "weight_only", "auto: the model has no Conv2d with more than one input channel per group"


def needs_reduced_range() -> bool:
    """True on CPUs without VNNI, where full-range int8 products can overflow (torchao's advice)."""
    from torchao.utils import should_reduce_range

    return bool(should_reduce_range(torch.device("cpu")))


def _calibration_batches(calibration_data: Tensor | Iterable[Tensor]) -> list[Tensor]:
    """Normalize ``calibration_data`` (one (N, ...) tensor or an iterable of them) to batches."""
    if isinstance(calibration_data, Tensor):
        batches = list(torch.split(calibration_data, 64)) if calibration_data.dim() > 0 else []
    else:
        batches = []
        for item in calibration_data:
            # Accept (x, y) pairs as well, e.g. straight from a DataLoader.
            x = item[0] if isinstance(item, (tuple, list)) else item
            batches.append(torch.as_tensor(x))
            if len(batches) >= _MAX_CALIBRATION_BATCHES:
                break
    batches = [b for b in batches[:_MAX_CALIBRATION_BATCHES] if b.dim() > 0 and b.shape[0] > 0]
    if not batches:
        raise ValueError("pt2e_x86 needs calibration_data with at least one sample, "
                         "e.g. quantize_int8(model, 'pt2e_x86', calibration_data=x_val[:256])")
    return batches


def _strip_unused_state(gm: torch.fx.GraphModule) -> None:
    """Delete parameters/buffers the graph no longer reads.

    ``convert_pt2e`` folds the int8 weights into new constants but leaves the original fp32
    weights attached; keeping them would make the "int8" checkpoint bigger than fp32.
    """
    used = {str(node.target) for node in gm.graph.nodes if node.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner_name, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            delattr(owner, attr)


def _split_repeated_module_calls(gm: torch.fx.GraphModule) -> None:
    """Give each call of a module called more than once its own source partition (in place).

    The PT2E quantizers find patterns by source partition; with non-strict ``torch.export`` a
    partition is every node whose innermost ``nn_module_stack`` entry names the same module. A
    module called twice (torchvision's BasicBlock uses one ``self.relu`` after ``conv1`` and after
    the residual add) is one partition with two outputs, and X86InductorQuantizer stops with
    "Input partition has more than one output node". export already keys each call apart
    (``...relu`` and ``...relu@1``); we carry that suffix into the module name the partitions use.
    """
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        key, (fqn, cls) = next(reversed(stack.items()))
        call = key.rpartition("@")[2] if "@" in key else ""
        if call.isdigit():
            stack[key] = (f"{fqn}@{call}", cls)


def _pt2e_x86(model: nn.Module, calibration_data: Tensor | Iterable[Tensor]) -> nn.Module:
    """Static int8 via torchao's PT2E flow: export, insert observers, calibrate, convert."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    batches = _calibration_batches(calibration_data)
    example = batches[0][:2] if batches[0].shape[0] >= 2 else batches[0].repeat(2, *([1] * (batches[0].dim() - 1)))
    # The batch size is dynamic so the quantized graph serves batch 1 and 64 alike; the
    # example has 2 rows because export specializes a size-1 dimension to a constant.
    dynamic = ({0: torch.export.Dim.AUTO},)
    try:
        exported = torch.export.export(model, (example,), dynamic_shapes=dynamic).module()
    except Exception as e:  # data-dependent control flow, unsupported ops, ...
        raise ValueError(f"pt2e_x86 could not export the model with torch.export "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                         "use scheme 'weight_only' or 'dynamic' instead") from None
    _split_repeated_module_calls(exported)
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config(reduce_range=needs_reduced_range()))
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    converted = convert_pt2e(prepared)
    _strip_unused_state(converted)
    # Exported modules refuse .eval()/.train() unless allowed; our metrics call .eval().
    allow_exported_model_train_eval(converted)
    return converted


def quantize_int8(model: nn.Module, scheme: str = DEFAULT_SCHEME, *,
                  calibration_data: Tensor | Iterable[Tensor] | None = None) -> nn.Module:
    """A post-training int8 copy of ``model`` (eval mode, CPU); ``model`` itself is untouched.

    ``scheme`` is one of ``SCHEMES`` (``auto``: ``choose_scheme``). ``calibration_data`` (a (N, C, H, W) tensor, or an
    iterable of such batches or (x, y) pairs; up to 16 batches are used) is required for
    ``pt2e_x86`` and ignored otherwise. Raises ``ValueError`` for an unknown scheme, missing
    calibration data, or a model that has nothing the scheme can quantize.
    """
    scheme, _ = choose_scheme(model, scheme)
    if scheme == "pt2e_x86" and calibration_data is None:
        raise ValueError("scheme 'pt2e_x86' needs calibration_data (a few batches of real inputs); "
                         "pass calibration_data=x_val[:256] or use scheme 'weight_only'")
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        quantize_,
    )

    quantized = copy.deepcopy(model).cpu().eval()
    if scheme == "pt2e_x86":
        return _pt2e_x86(quantized, calibration_data)
    filter_fn = _is_linear_or_conv if scheme == "weight_only_conv" else _is_linear
    if not any(filter_fn(m) for m in quantized.modules()):
        raise ValueError(f"scheme {scheme!r} found no layer to quantize in {type(model).__name__} "
                         "(it quantizes nn.Linear" + (" and nn.Conv2d" if scheme == "weight_only_conv" else "")
                         + "); use scheme 'pt2e_x86' or keep the model in fp32")
    if scheme == "weight_only":
        config: Any = Int8WeightOnlyConfig()
    elif scheme == "weight_only_conv":
        config = IntxWeightOnlyConfig(weight_dtype=torch.int8)
    else:
        config = Int8DynamicActivationInt8WeightConfig(reduce_range=needs_reduced_range())
    quantize_(quantized, config, filter_fn=filter_fn)
    return quantized


def _inner_tensors(tensor: Tensor) -> list[Tensor]:
    """The plain tensors a (possibly torchao subclass) tensor is stored as."""
    if type(tensor) is Tensor or type(tensor) is nn.Parameter or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    out: list[Tensor] = []
    for name in names:
        inner = getattr(tensor, name)
        if isinstance(inner, Tensor):
            out.extend(_inner_tensors(inner))
    return out


def int8_fraction(model: nn.Module) -> float:
    """Fraction of the model's stored tensor elements that are int8 (0.0 for an fp32 model)."""
    elements = {"int8": 0, "all": 0}
    for value in model.state_dict().values():
        if isinstance(value, Tensor):
            for inner in _inner_tensors(value):
                elements["all"] += inner.numel()
                elements["int8"] += inner.numel() if inner.dtype == torch.int8 else 0
    return elements["int8"] / elements["all"] if elements["all"] else 0.0


def load_quantized(source: str | os.PathLike | bytes | Mapping[str, Tensor], model: nn.Module,
                   scheme: str) -> nn.Module:
    """Rebuild a quantized model from its saved state dict (``torch.save(q.state_dict())``), weights only.

    ``source`` is a file path, the bytes, or an already loaded state dict (e.g. the
    ``state_dict`` entry of a checkpoint payload). ``model`` is an fp32 model of the same
    architecture (its values are irrelevant); it is quantized with ``scheme`` to get the
    structure, then the saved int8 state is assigned. Loading uses
    ``torch.load(weights_only=True)``: importing torchao makes its tensor subclasses
    loadable that way, no ``add_safe_globals`` needed (checked on torchao 0.18).
    ``pt2e_x86`` models bake activation scales into the graph and cannot be rebuilt
    from a state dict: save them with ``raydistill.export.export_model``.
    """
    scheme, _ = choose_scheme(model, scheme)
    if scheme == "pt2e_x86":
        raise ValueError("a pt2e_x86 model cannot be rebuilt from a state dict (its activation scales live "
                         "in the graph); save it with raydistill.export.export_model and load the .pt2 "
                         "with torch.export.load")
    import torchao  # noqa: F401  registers the tensor subclasses that weights_only must rebuild

    if isinstance(source, Mapping):
        what, state = "dict", dict(source)
    else:
        what = "bytes" if isinstance(source, (bytes, bytearray)) else str(source)
        stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        try:
            state = torch.load(stream, map_location="cpu", weights_only=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"quantized state {what} cannot be loaded ({first[:160]}); "
                             "re-quantize the fp32 checkpoint") from None
    skeleton = quantize_int8(model, scheme)
    try:
        # assign=True keeps the saved torchao tensors instead of copying into the skeleton's.
        skeleton.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise ValueError(f"quantized state {what} does not fit the model for scheme {scheme!r} "
                         f"({str(e).splitlines()[0][:160]}); pass the matching fp32 model and scheme") from None
    return skeleton.eval()
