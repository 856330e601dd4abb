"""Tests for raydistill.core.pruning: magnitude masks, channel pruning, schedules.

Everything is tiny, seeded and on CPU. The structured tests check the one property that
matters for training-with-masks: the masked model computes what the physically pruned
model computes, and a model rebuilt from the plan loads the pruned weights.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
import torchvision

from raydistill.core.pruning import (
    ChannelPruner,
    apply_masks_,
    apply_pruning_plan_,
    magnitude_masks,
    remove_masks_,
    sparsity,
    sparsity_schedule,
)

X_SHAPE = (2, 3, 32, 32)
NUM_CLASSES = 10


# --------------------------------------------------------------------------- models


def _randomize_bn(model: nn.Module) -> nn.Module:
    # Default BN (gamma=1, beta=0, mean=0, var=1) is nearly the identity and would hide
    # mistakes in BN handling; also makes bn_scale rankings free of ties.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def small_cnn() -> nn.Module:
    # AdaptiveAvgPool2d(2) + Flatten: each conv channel feeds 4 Linear inputs (flatten index mapping).
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(48, NUM_CLASSES),
    )


def resnet() -> nn.Module:
    return torchvision.models.resnet18(num_classes=NUM_CLASSES)


def dw_sigmoid_net() -> nn.Module:
    # Depthwise conv (coupled in/out channels) and a Sigmoid (f(0) = 0.5 != 0): masking
    # must zero the consumer's input columns, not only the producer's outputs.
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.BatchNorm2d(8),
        nn.Sigmoid(),
        nn.Conv2d(8, 16, 1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, NUM_CLASSES),
    )


FACTORIES = {"cnn": small_cnn, "resnet18": resnet, "dw_sigmoid": dw_sigmoid_net}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomize_bn(FACTORIES[name]())


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(*X_SHAPE, generator=torch.Generator().manual_seed(seed))


def _backward(model: nn.Module, x: torch.Tensor) -> None:
    y = torch.arange(x.shape[0]) % NUM_CLASSES
    F.cross_entropy(model(x), y).backward()


def _masked_tensors_zero(pruner: ChannelPruner) -> bool:
    return all(bool((getattr(m, p).index_select(d, i) == 0).all())
               for s in pruner._zero_plan.values() for m, p, d, i in s)


# --------------------------------------------------------------------------- unstructured


def _mlp_conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 7), nn.ReLU(),
                         nn.Linear(7, 3))


def test_magnitude_masks_layer_exact_and_smallest():
    model = _mlp_conv()
    masks = magnitude_masks(model, 0.3, scope="layer")
    assert set(masks) == {"0", "3", "5"}
    for name, mask in masks.items():
        w = model.get_submodule(name).weight.detach()
        assert mask.shape == w.shape and mask.dtype == torch.bool
        assert int((~mask).sum()) == round(0.3 * w.numel())
        assert w[~mask].abs().max() <= w[mask].abs().min()


def test_magnitude_masks_global_threshold_is_global():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 10))  # 400 + 200 weights
    with torch.no_grad():
        model[1].weight.mul_(0.01)  # a layer of small weights
    masks = magnitude_masks(model, 0.4, scope="global")
    total = 600
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.4 * total)
    # One threshold: every pruned |w| <= every kept |w|, across layers.
    w = {n: model.get_submodule(n).weight.detach().abs() for n in masks}
    pruned_max = max(float(w[n][~m].max()) for n, m in masks.items() if (~m).any())
    kept_min = min(float(w[n][m].min()) for n, m in masks.items() if m.any())
    assert pruned_max <= kept_min
    # The small layer (200 weights < 240 to prune) is pruned entirely, the big one by 40/400.
    assert int((~masks["1"]).sum()) == 200
    assert int((~masks["0"]).sum()) == 40
    # Per-layer scope would have pruned both at 40 %.
    layer = magnitude_masks(model, 0.4, scope="layer")
    assert int((~layer["1"]).sum()) == 80


def test_magnitude_masks_ties_exact_and_skip():
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)  # all tied
    masks = magnitude_masks(model, 0.5, skip=("1",))
    assert set(masks) == {"0"}
    assert int((~masks["0"]).sum()) == 10
    assert torch.equal(masks["0"], magnitude_masks(model, 0.5, skip=("1",))["0"])  # deterministic


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
def test_apply_masks_survive_optimizer_steps(opt_name):
    model = _mlp_conv()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    params = list(model.parameters())
    opt = (
        torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2)
        if opt_name == "sgd_momentum"
        else torch.optim.Adam(params, lr=0.01)
    )
    # One dense step first so momentum / Adam moments are non-zero at soon-masked weights.
    model(x).square().mean().backward()
    opt.step()
    masks = magnitude_masks(model, 0.5, scope="global")
    apply_masks_(model, masks)  # the optimizer was built before: the Parameter objects must survive
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    lin = model[3]
    # The optimizer really moved the hidden original at masked positions...
    assert (lin.weight_orig.detach()[~masks["3"]] != 0).any()
    y = model(x)
    for name, mask in masks.items():
        assert (model.get_submodule(name).weight[~mask] == 0).all()
    # ...but the forward uses them as exact zeros.
    with torch.no_grad():
        h = F.relu(F.conv2d(x, model[0].weight_orig * masks["0"], model[0].bias)).flatten(1)
        h = F.relu(F.linear(h, lin.weight_orig * masks["3"], lin.bias))
        ref = F.linear(h, model[5].weight_orig * masks["5"], model[5].bias)
    torch.testing.assert_close(y, ref)
    assert sparsity(model) == pytest.approx(0.5, abs=1 / 300)

    remove_masks_(model)
    assert not hasattr(lin, "weight_orig") and isinstance(lin.weight, nn.Parameter)
    assert lin.weight is params[2]  # same object: optimizers stay valid
    for name, mask in masks.items():
        assert (model.get_submodule(name).weight[~mask] == 0).all()
    assert set(model.state_dict()) == set(_mlp_conv().state_dict())


def test_apply_masks_again_replaces_cleanly():
    model = _mlp_conv()
    apply_masks_(model, magnitude_masks(model, 0.3, scope="global"))
    first = {n: model.get_submodule(n).weight == 0 for n in ("0", "3", "5")}
    masks = magnitude_masks(model, 0.6, scope="global")
    apply_masks_(model, masks)
    for n in ("0", "3", "5"):
        m = model.get_submodule(n)
        hooks = [h for h in m._forward_pre_hooks.values() if isinstance(h, torch.nn.utils.prune.BasePruningMethod)]
        assert len(hooks) == 1 and isinstance(hooks[0], torch.nn.utils.prune.CustomFromMask)
        assert torch.equal(m.weight_mask.bool(), masks[n])
        assert (first[n] <= (m.weight == 0)).all()  # old zeros stay zero (nested)
    total = sum(model.get_submodule(n).weight.numel() for n in masks)
    assert sparsity(model) == round(0.6 * total) / total


def test_unstructured_bad_args():
    model = _mlp_conv()
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_masks(model, 1.0)
    with pytest.raises(ValueError, match="scope"):
        magnitude_masks(model, 0.5, scope="net")
    with pytest.raises(ValueError, match="skip"):
        magnitude_masks(model, 0.5, skip="3")
    with pytest.raises(ValueError, match="skip"):
        magnitude_masks(model, 0.5, skip=("fc",))
    with pytest.raises(ValueError, match="layer_types"):
        magnitude_masks(model, 0.5, layer_types=(nn.LSTM,))
    with pytest.raises(ValueError, match="shape"):
        apply_masks_(model, {"3": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not a module"):
        apply_masks_(model, {"nope": torch.ones(1)})
    with pytest.raises(ValueError, match="layer_types"):
        sparsity(model, layer_types=(nn.BatchNorm2d,))


# --------------------------------------------------------------------------- structured


@pytest.mark.parametrize("importance", ["l1", "bn_scale", "taylor"])
@pytest.mark.parametrize("arch", ["cnn", "resnet18", "dw_sigmoid"])
def test_masked_equals_pruned_and_plan_replays(arch, importance):
    model = build(arch)
    x = _x()
    pruner = ChannelPruner(model, x[:1], importance=importance)
    assert pruner.channels, "no prunable group found"
    if importance == "taylor":
        _backward(model, x)
    info = pruner.mask_(0.5)
    assert info["ratio"] == 0.5
    assert info["total_channels"] == sum(pruner.channels.values())
    assert info["masked_channels"] == sum(round(0.5 * n) for n in pruner.channels.values())
    assert _masked_tensors_zero(pruner)

    width_before = count_channels(model)
    macs0, params0 = tp.utils.count_ops_and_params(model, x[:1])
    model.eval()
    with torch.no_grad():
        y_masked = model(x)
    plan = pruner.remove_()
    with torch.no_grad():
        y_pruned = model(x)
    assert y_pruned.shape == (X_SHAPE[0], NUM_CLASSES)
    torch.testing.assert_close(y_pruned, y_masked, atol=1e-5, rtol=0)
    macs1, params1 = tp.utils.count_ops_and_params(model, x[:1])
    assert macs1 < 0.6 * macs0 and params1 < 0.6 * params0

    # Exactly round(ratio * n) channels removed from every group's root.
    width_after = count_channels(model)
    for name, n in pruner.channels.items():
        assert width_after[name] == n - round(0.5 * n)
    assert [e["module"] for e in plan] == list(pruner.channels)
    for name in count_channels(model, (nn.Linear,)):
        assert width_after[name] == width_before[name]  # classifier output untouched

    # Plan is plain JSON; a fresh model + plan loads the pruned weights (weights_only).
    plan = json.loads(json.dumps(plan))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = apply_pruning_plan_(build(arch, seed=123), plan, x[:1])
    fresh.load_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y_pruned, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["cnn", "resnet18"])
def test_progressive_masks_are_supersets(arch):
    model = build(arch)
    pruner = ChannelPruner(model, _x()[:1], importance="l1")
    pruner.mask_(0.25)
    first = {k: list(v) for k, v in pruner.masked.items()}
    for name, n in pruner.channels.items():
        assert len(first[name]) == round(0.25 * n)
    pruner.mask_(0.5)
    for name, n in pruner.channels.items():
        assert set(first[name]) <= set(pruner.masked[name])
        assert len(pruner.masked[name]) == round(0.5 * n)
    # A lower ratio never un-masks.
    info = pruner.mask_(0.1)
    assert info["masked_channels"] == sum(round(0.5 * n) for n in pruner.channels.values())
    # Producer rows and BN gamma/beta of masked channels are zero.
    for name, idxs in pruner.masked.items():
        root = model.get_submodule(name)
        assert (root.weight[idxs] == 0).all()


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
def test_reapply_masks_after_optimizer_step(opt_name):
    model = build("cnn")
    model.train()
    x = _x()
    pruner = ChannelPruner(model, x[:1])
    assert model.training and all(m.training for m in model.modules())  # tracing left flags alone
    params = list(model.parameters())
    opt = (
        torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)
        if opt_name == "sgd_momentum"
        else torch.optim.Adam(params, lr=0.01)
    )
    _backward(model, x)  # momentum / moments everywhere before masking
    opt.step()
    pruner.mask_(0.5)
    for _ in range(2):
        opt.zero_grad()
        _backward(model, x)
        opt.step()
    assert not _masked_tensors_zero(pruner), "the optimizer should have revived something"
    pruner.reapply_masks_()
    assert _masked_tensors_zero(pruner)
    bn = model[1]
    idxs = pruner.masked["0"]
    assert (bn.weight[idxs] == 0).all() and (bn.bias[idxs] == 0).all()
    # After training with masks, masked still equals pruned.
    model.eval()
    with torch.no_grad():
        y_masked = model(x)
    pruner.remove_()
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_masked, atol=1e-5, rtol=0)


def test_mlp_linear_groups_and_bn_scale_needs_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, NUM_CLASSES))
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))
    assert ChannelPruner(model, x[:1], importance="bn_scale").channels == {}
    pruner = ChannelPruner(model, x[:1], importance="l1")
    assert dict(pruner.channels) == {"0": 16, "2": 8}
    pruner.mask_(0.5)
    with torch.no_grad():
        y_masked = model(x)
    plan = pruner.remove_()
    # Plan order is the graph's group order (the same order channels lists).
    assert [(e["module"], e["kind"], len(e["idxs"])) for e in plan] == [
        (n, "linear_out", {"0": 8, "2": 4}[n]) for n in pruner.channels
    ]
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_masked, atol=1e-5, rtol=0)
    torch.manual_seed(7)
    fresh = apply_pruning_plan_(
        nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, NUM_CLASSES)), plan, x[:1]
    )
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_round_to_keeps_multiples():
    model = build("resnet18")
    pruner = ChannelPruner(model, _x()[:1], round_to=16)
    pruner.mask_(0.3)
    for name, n in pruner.channels.items():
        kept = n - len(pruner.masked[name])
        assert kept % 16 == 0 and kept >= 16
        assert kept == (n - round(0.3 * n)) // 16 * 16


def test_the_skipped_classifier_is_named_as_such():
    """The report's pruning coverage says why a group stays whole: the default ignored layer is the classifier
    (it said "ignored layer '8'"); a layer the caller ignores stays "ignored layer"."""
    x = _x()
    default = ChannelPruner(small_cnn(), x[:1])
    assert default.skipped == {"8": "the classifier '8' (the last Linear: its outputs are the class logits)"}
    model = small_cnn()
    chosen = ChannelPruner(model, x[:1], ignored_layers=[model[3]])
    assert chosen.skipped == {"3": "ignored layer '3'", "8": "changes the model output (8)"}


def test_output_layer_is_protected_without_classifier():
    # Fully convolutional: the last conv produces the output; nothing to ignore by default.
    torch.manual_seed(0)
    model = _randomize_bn(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 1))
    )
    x = _x()
    pruner = ChannelPruner(model, x[:1], ignored_layers=[])
    assert list(pruner.channels) == ["0"]
    assert "output" in pruner.skipped["3"]
    pruner.mask_(0.5)
    model.eval()
    with torch.no_grad():
        y_masked = model(x)
    pruner.remove_()
    with torch.no_grad():
        y = model(x)
    assert y.shape == (X_SHAPE[0], 5, 32, 32)
    torch.testing.assert_close(y, y_masked, atol=1e-5, rtol=0)


def test_grouped_conv_groups_are_skipped():
    torch.manual_seed(0)
    model = _randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=2),  # grouped, not depthwise
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 6, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, NUM_CLASSES),
        )
    )
    x = _x()
    pruner = ChannelPruner(model, x[:1])
    assert list(pruner.channels) == ["6"]
    assert "Conv2d" in pruner.skipped["0"] and "Conv2d" in pruner.skipped["3"]
    pruner.mask_(0.5)
    model.eval()
    with torch.no_grad():
        y_masked = model(x)
    pruner.remove_()
    assert model[6].out_channels == 3 and model[3].out_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_masked, atol=1e-5, rtol=0)


def test_channel_pruner_bad_args():
    model = build("cnn")
    x = _x()[:1]
    with pytest.raises(ValueError, match="importance"):
        ChannelPruner(model, x, importance="l2")
    with pytest.raises(ValueError, match="round_to"):
        ChannelPruner(model, x, round_to=0)
    with pytest.raises(ValueError, match="ignored_layers"):
        ChannelPruner(model, x, ignored_layers=model[8])
    pruner = ChannelPruner(model, x, importance="taylor")
    with pytest.raises(ValueError, match="backward"):
        pruner.mask_(0.5)
    with pytest.raises(ValueError, match="ratio"):
        pruner.mask_(1.0)
    pruner = ChannelPruner(model, x)
    pruner.mask_(0.5)
    plan = pruner.remove_()
    with pytest.raises(RuntimeError):
        pruner.mask_(0.6)
    fresh = build("cnn")
    with pytest.raises(ValueError, match="module"):
        apply_pruning_plan_(fresh, [{"module": "99", "kind": "conv_out", "idxs": [0]}], x)
    with pytest.raises(ValueError, match="kind"):
        apply_pruning_plan_(fresh, [{"module": "8", "kind": "conv_out", "idxs": [0]}], x)
    with pytest.raises(ValueError, match="idxs"):
        apply_pruning_plan_(fresh, [{"module": "0", "kind": "conv_out", "idxs": list(range(8))}], x)
    with pytest.raises(ValueError, match="plan"):
        apply_pruning_plan_(fresh, plan[0], x)


# --------------------------------------------------------------------------- schedule


def test_sparsity_schedule_values():
    # oneshot: initial before start, final from start on
    assert sparsity_schedule(0, 100, 0.8, "oneshot") == 0.8
    assert sparsity_schedule(9, 100, 0.8, "oneshot", start=10) == 0.0
    assert sparsity_schedule(10, 100, 0.8, "oneshot", start=10) == 0.8
    # linear
    assert sparsity_schedule(0, 100, 0.8, "linear") == 0.0
    assert sparsity_schedule(50, 100, 0.8, "linear") == pytest.approx(0.4)
    assert sparsity_schedule(100, 100, 0.8, "linear") == pytest.approx(0.8)
    # cubic (Zhu & Gupta): s_f + (s_i - s_f)(1 - x)^3
    assert sparsity_schedule(10, 100, 0.8, "cubic", initial=0.2, start=10, end=90) == pytest.approx(0.2)
    assert sparsity_schedule(50, 100, 0.8, "cubic", initial=0.2, start=10, end=90) == pytest.approx(0.8 - 0.6 / 8)
    assert sparsity_schedule(90, 100, 0.8, "cubic", initial=0.2, start=10, end=90) == pytest.approx(0.8)
    assert sparsity_schedule(5, 100, 0.8, "cubic", initial=0.2, start=10, end=90) == 0.2
    assert sparsity_schedule(99, 100, 0.8, "cubic", initial=0.2, start=10, end=90) == 0.8
    assert sparsity_schedule(25, 100, 0.5) == pytest.approx(0.5 - 0.5 * 0.75**3)
    values = [sparsity_schedule(t, 100, 0.9) for t in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(step=-1), "step"),
        (dict(total_steps=0), "total_steps"),
        (dict(final=1.0), "final"),
        (dict(final=-0.1), "final"),
        (dict(schedule="exp"), "schedule"),
        (dict(initial=0.9), "initial"),
        (dict(start=50, end=50), "start"),
        (dict(end=200), "end"),
        (dict(step=1.5), "step"),
    ],
)
def test_sparsity_schedule_bad_args(kwargs, match):
    args = dict(step=0, total_steps=100, final=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sparsity_schedule(**args)


def count_channels(model: nn.Module, layer_types=(nn.Conv2d, nn.Linear)) -> dict[str, int]:
    """{module name: output channels} of every Conv2d / Linear: the widths before and after remove_()."""
    return {name: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for name, m in model.named_modules() if isinstance(m, tuple(layer_types))}
