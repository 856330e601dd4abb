"""int8 post-training quantization (raydistill.core.quantize): tiny seeded CPU models."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from raydistill.core.metrics import size_bytes
from raydistill.core.quantize import (
    DEFAULT_SCHEME,
    SCHEMES,
    _inner_tensors,
    choose_scheme,
    int8_fraction,
    load_quantized,
    quantize_int8,
)
from raydistill.models import build_model

warnings.filterwarnings("ignore", module="torchao")


def student() -> nn.Module:
    torch.manual_seed(0)
    return build_model("cnn", num_classes=10, in_channels=1, image_size=8, widths=[16, 32], hidden=64).eval()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", num_classes=10, in_channels=1, image_size=8, hidden=[256]).eval()


def inputs(n: int = 128) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_quantized_predictions_agree_with_fp32(scheme):
    model, x = student(), inputs()
    quantized = quantize_int8(model, scheme, calibration_data=x[:64])
    with torch.no_grad():
        reference, out = model(x), quantized(x)
    agreement = (out.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agreement >= 0.95, f"{scheme}: top-1 agreement {agreement:.3f}"
    # Not a no-op: int8 rounding must change the logits a little.
    assert not torch.equal(out, reference)
    assert int8_fraction(quantized) > 0.5


def test_input_model_is_untouched():
    model, x = student(), inputs(8)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        expected = model(x)
    for scheme in SCHEMES:
        quantize_int8(model, scheme, calibration_data=x)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(type(after[k]) is torch.Tensor and torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert int8_fraction(model) == 0.0


def test_linear_heavy_model_really_shrinks():
    model = mlp()
    fp32 = size_bytes(model)
    for scheme in ("weight_only", "dynamic"):
        quantized = quantize_int8(model, scheme)
        assert size_bytes(quantized) * 3 < fp32, scheme  # 4x fewer weight bytes, minus metadata
        # int8 weights plus one int8 zero point per output row (torchao stores them as int8)
        assert bytes_by_dtype(quantized).get("int8", 0) == 64 * 256 + 256 * 10 + 256 + 10


def test_linear_only_schemes_leave_conv_in_fp32():
    # torchao's quantize_ filters to nn.Linear; weight_only_conv also stores Conv2d weights in int8.
    model = student()
    # int8 bytes = weights + int8 zero points: one per Linear output row, and for a conv
    # one per (output channel, kernel position) since IntxWeightOnlyConfig groups over C_in.
    linear = 128 * 64 + 64 * 10 + 64 + 10
    # The stem conv (one input channel) stays fp32: torchao 0.18 cannot pick its qparams.
    conv2 = 32 * 16 * 3 * 3 + 32 * 3 * 3
    assert bytes_by_dtype(quantize_int8(model, "weight_only"))["int8"] == linear
    assert bytes_by_dtype(quantize_int8(model, "weight_only_conv"))["int8"] == linear + conv2
    assert size_bytes(quantize_int8(model, "weight_only_conv")) < size_bytes(quantize_int8(model, "weight_only"))


def test_unknown_scheme_names_the_options():
    options = "auto, weight_only, weight_only_conv, dynamic, pt2e_x86"
    with pytest.raises(ValueError, match=f"unknown int8 scheme 'int4'; use one of: {options}"):
        quantize_int8(student(), "int4")


def test_pt2e_needs_calibration_data():
    with pytest.raises(ValueError, match="calibration_data"):
        quantize_int8(student(), "pt2e_x86")
    with pytest.raises(ValueError, match="at least one sample"):
        quantize_int8(student(), "pt2e_x86", calibration_data=torch.empty(0, 1, 8, 8))


def test_model_without_linear_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    with pytest.raises(ValueError, match="found no layer to quantize"):
        quantize_int8(model, "weight_only")


def test_pt2e_handles_any_batch_size_and_keeps_no_fp32_copy():
    model, x = student(), inputs(64)
    quantized = quantize_int8(model, "pt2e_x86", calibration_data=[(x[:32], None), (x[32:], None)])
    with torch.no_grad():
        assert quantized(x[:1]).shape == (1, 10) and quantized(x[:7]).shape == (7, 10)
    # convert_pt2e leaves the original fp32 weights attached; they must be stripped.
    assert bytes_by_dtype(quantized).get("float32", 0) < 4 * 1000
    quantized.eval()  # allowed (metrics call it)


@pytest.mark.parametrize("scheme", ["weight_only", "weight_only_conv", "dynamic"])
def test_state_round_trips_with_weights_only(scheme, tmp_path):
    model, x = student(), inputs(16)
    quantized = quantize_int8(model, scheme)
    path = tmp_path / "int8.pt"
    torch.save(quantized.state_dict(), path)
    # A differently initialized fp32 skeleton: the loaded values must come from the file.
    torch.manual_seed(123)
    skeleton = build_model("cnn", num_classes=10, in_channels=1, image_size=8, widths=[16, 32], hidden=64)
    loaded = load_quantized(path, skeleton, scheme)
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized(x))
    # The same from a checkpoint payload's already loaded state dict.
    state = torch.load(path, weights_only=True)
    with torch.no_grad():
        assert torch.equal(load_quantized(state, skeleton, scheme)(x), quantized(x))


def test_load_quantized_refuses_garbage_and_pt2e():
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_quantized(b"not a checkpoint", student(), "weight_only")
    with pytest.raises(ValueError, match="export_model"):
        load_quantized(b"", student(), "pt2e_x86")
    buffer = io.BytesIO()
    torch.save(quantize_int8(mlp(), "weight_only").state_dict(), buffer)
    with pytest.raises(ValueError, match="does not fit"):
        load_quantized(buffer.getvalue(), student(), "weight_only")


def test_default_scheme_is_a_scheme():
    assert DEFAULT_SCHEME in SCHEMES


def test_auto_quantizes_convs_when_the_model_has_them():
    scheme, reason = choose_scheme(student())
    assert scheme == "weight_only_conv" and "1 Conv2d" in reason  # the 1-input-channel stem cannot be int8
    assert choose_scheme(mlp()) == ("weight_only", "auto: the model has no Conv2d with more than one input "
                                                   "channel per group")
    assert choose_scheme(student(), "dynamic") == ("dynamic", "set by quantize.scheme")
    model = student()
    assert bytes_by_dtype(quantize_int8(model, "auto")) == bytes_by_dtype(quantize_int8(model, "weight_only_conv"))
    assert bytes_by_dtype(quantize_int8(mlp(), "auto")) == bytes_by_dtype(quantize_int8(mlp(), "weight_only"))
    buffer = io.BytesIO()
    torch.save(quantize_int8(model, "auto").state_dict(), buffer)
    x = inputs(4)
    with torch.no_grad():  # rebuilt with the scheme auto resolves to
        assert torch.equal(load_quantized(buffer.getvalue(), model, "auto")(x),
                           quantize_int8(model, "weight_only_conv")(x))


def test_auto_makes_a_resnet18_at_least_3_5x_smaller():
    # The case: weight_only (Linear only) leaves torchvision's ResNet-18 at 1.0x its fp32 size.
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    assert choose_scheme(model)[0] == "weight_only_conv"
    assert size_bytes(model) / size_bytes(quantize_int8(model, "auto")) >= 3.5


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_pt2e_quantizes_torchvision_cnns(name):
    # ResNet's BasicBlock calls one ReLU module twice; torchao's X86InductorQuantizer refused it ("Input
    # partition has more than one output node") until each call got its own partition.
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # BatchNorm statistics of real activations, so the eval-mode logits are not ~constant
        model.train()(x)
    model.eval()
    quantized = quantize_int8(model, "pt2e_x86", calibration_data=x[:8])
    with torch.no_grad():
        expected, got = model(x), quantized(x)
        assert quantized(x[:1]).shape == (1, 10)
    error = float((got - expected).norm() / expected.norm())
    assert 0 < error < 0.2, error
    assert int8_fraction(quantized) > 0.9


def bytes_by_dtype(model) -> dict[str, int]:
    """Bytes of the model's state per stored dtype (torchao subclasses counted by their parts)."""
    totals: dict[str, int] = {}
    for value in model.state_dict().values():
        for inner in _inner_tensors(value) if isinstance(value, torch.Tensor) else []:
            key = str(inner.dtype).removeprefix("torch.")
            totals[key] = totals.get(key, 0) + inner.numel() * inner.element_size()
    return totals
