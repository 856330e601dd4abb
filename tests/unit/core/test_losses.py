"""Tests for raydistill.core.losses against naive references written out here."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from raydistill.core.losses import (
    FeatureHooks,
    HintAdapter,
    average_teacher_logits,
    hard_kd_loss,
    hint_loss,
    soft_kd_loss,
    teacher_topk,
    topk_log_probs,
)


def _logits(*shape, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def _naive_soft_kd(student, teacher, temperature):
    """Hinton KD written with explicit probabilities and loops, in float64."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        t_exp = [math.exp(t / temperature) for t in t_row]
        p_t = [e / sum(t_exp) for e in t_exp]
        s_max = max(s / temperature for s in s_row)
        log_z = s_max + math.log(sum(math.exp(s / temperature - s_max) for s in s_row))
        log_q = [s / temperature - log_z for s in s_row]
        total += sum(p * (math.log(p) - lq) for p, lq in zip(p_t, log_q) if p > 0)
    return total / len(student) * temperature**2


# --------------------------------------------------------------------------- soft / hard


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soft_kd_matches_naive_reference(temperature):
    student, teacher = _logits(5, 7, seed=1), _logits(5, 7, seed=2)
    got = soft_kd_loss(student.float(), teacher.float(), temperature)
    assert got.ndim == 0 and got.dtype == torch.float32
    assert got.item() == pytest.approx(_naive_soft_kd(student, teacher, temperature), rel=1e-5)


def test_soft_kd_identical_logits_is_zero():
    logits = _logits(4, 10)
    assert soft_kd_loss(logits, logits.clone(), 3.0).abs().item() < 1e-6


def test_soft_kd_extreme_and_neg_inf_logits_are_finite():
    student = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, 1e4, 1e4, -1e4]], requires_grad=True)
    teacher = torch.tensor([[-1e4, 1e4, 0.0, -float("inf")], [0.0, -float("inf"), 1e4, -float("inf")]])
    for temperature in (0.5, 1.0, 4.0):
        loss = soft_kd_loss(student, teacher, temperature)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and loss > 0
        assert torch.isfinite(grad).all()


def test_soft_kd_neg_inf_teacher_class_contributes_nothing():
    # A -inf teacher class has p = 0: its term is 0 * log 0 = 0, the rest is unchanged.
    student = _logits(3, 5, seed=3).float()
    teacher = _logits(3, 5, seed=4).float()
    teacher[:, -1] = -float("inf")
    expected = _naive_soft_kd(student.double(), teacher.double(), 2.0)
    assert soft_kd_loss(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-5)


def test_soft_kd_classes_masked_in_both_models_are_ignored():
    # Vocabulary masking: a class at -inf for teacher and student is outside the support.
    student = _logits(3, 5, seed=3).float().requires_grad_()
    teacher = _logits(3, 5, seed=4).float()
    mask = torch.tensor([False, False, True, False, True])
    neg_inf = -float("inf")
    masked = soft_kd_loss(student.masked_fill(mask, neg_inf), teacher.masked_fill(mask, neg_inf), 2.0)
    (grad,) = torch.autograd.grad(masked, student)
    expected = soft_kd_loss(student[:, ~mask], teacher[:, ~mask], 2.0)
    torch.testing.assert_close(masked, expected)
    assert torch.isfinite(grad).all() and (grad[:, mask] == 0).all()


def test_soft_kd_gradient_reaches_teacher_when_not_detached():
    student = _logits(2, 4, seed=5).float().requires_grad_()
    teacher = _logits(2, 4, seed=6).float().requires_grad_()
    soft_kd_loss(student, teacher, 2.0).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "student_shape,teacher_shape", [((2, 3), (2, 4)), ((2, 3), (3, 3)), ((6,), (6,)), ((2, 3, 4), (2, 3, 4))]
)
def test_soft_kd_rejects_bad_shapes(student_shape, teacher_shape):
    with pytest.raises(ValueError, match="logits"):
        soft_kd_loss(torch.zeros(student_shape), torch.zeros(teacher_shape), 1.0)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_soft_kd_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        soft_kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature)


def test_hard_kd_is_cross_entropy_on_teacher_argmax():
    student, teacher = _logits(6, 5, seed=7).float(), _logits(6, 5, seed=8).float()
    expected = F.cross_entropy(student, teacher.argmax(1))
    torch.testing.assert_close(hard_kd_loss(student, teacher), expected)
    with pytest.raises(ValueError):
        hard_kd_loss(student, teacher[:, :4])


# --------------------------------------------------------------------------- top-k


def test_teacher_topk_shapes_and_dtypes():
    teacher = _logits(4, 9, seed=9).half()
    probs, indices = teacher_topk(teacher, 3)
    assert probs.shape == indices.shape == (4, 3)
    assert probs.dtype == torch.float32 and indices.dtype == torch.int64
    full = F.softmax(teacher.float(), dim=-1)
    torch.testing.assert_close(probs, full.gather(1, indices))
    assert (indices[:, 0] == teacher.argmax(1)).all()
    assert (probs[:, :-1] >= probs[:, 1:]).all()  # sorted, most likely first
    for k in (0, 10):
        with pytest.raises(ValueError, match="k must be"):
            teacher_topk(teacher, k)



def _topk_kd(student, probs, indices, temperature):
    """KD against a top-k cache as the worker computes it: the rebuilt distribution used as teacher logits."""
    return soft_kd_loss(student, topk_log_probs(probs, indices, student.shape[1]), temperature)


def _naive_topk_kd(student, probs, indices, temperature):
    """Reference, one sample and one class at a time: the cached head, the residual mass spread evenly over the
    other classes, tempered as p^(1/T) renormalised, then T^2 * mean_b KL(p_T || softmax(s / T))."""
    batch, num_classes = student.shape
    total = 0.0
    for b in range(batch):
        head = {int(i): float(q) for i, q in zip(indices[b], probs[b].float())}
        fill = max(0.0, 1.0 - sum(head.values())) / (num_classes - len(head)) if len(head) < num_classes else 0.0
        full = [head.get(c, fill) for c in range(num_classes)]
        tempered = [q ** (1.0 / temperature) for q in full]
        p_t = [q / sum(tempered) for q in tempered]
        s = [float(v) / temperature for v in student[b]]
        log_z = math.log(sum(math.exp(v) for v in s))
        total += sum(p * (math.log(p) - (s[c] - log_z)) for c, p in enumerate(p_t) if p > 0)
    return total / batch * temperature ** 2

@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_topk_with_all_classes_equals_soft_kd(temperature):
    student, teacher = _logits(5, 8, seed=10).float(), _logits(5, 8, seed=11).float()
    probs, indices = teacher_topk(teacher, 8)
    got = _topk_kd(student, probs, indices, temperature)
    expected = soft_kd_loss(student, teacher, temperature)
    assert abs(got.item() - expected.item()) < 1e-5


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_topk_is_exact_when_the_teacher_tail_is_uniform(temperature):
    # Top-3 distinct, the other 7 classes equal: the uniform residual rebuilds it exactly.
    student = _logits(4, 10, seed=17).float()
    teacher = torch.zeros(4, 10)
    teacher[:, :3] = torch.tensor([5.0, 3.0, 2.0])
    teacher = teacher[:, torch.randperm(10, generator=torch.Generator().manual_seed(0))]
    probs, indices = teacher_topk(teacher, 3)
    got = _topk_kd(student, probs, indices, temperature)
    torch.testing.assert_close(got, soft_kd_loss(student, teacher, temperature))


def test_topk_with_fewer_classes_is_finite_and_close():
    # Confident teacher (scale 6) over 100 classes, fp16 cache as stored on disk.
    student = _logits(16, 100, seed=12).float().requires_grad_()
    teacher = _logits(16, 100, scale=6.0, seed=13).float()

    def rel_error(k, temperature):
        probs, indices = teacher_topk(teacher, k)
        got = _topk_kd(student, probs.half(), indices, temperature)
        (grad,) = torch.autograd.grad(got, student)
        assert torch.isfinite(got) and torch.isfinite(grad).all()
        exact = soft_kd_loss(student, teacher, temperature).item()
        return abs(got.item() - exact) / exact

    # T=1: the flattened tail barely matters once the top-k hold most of the mass.
    assert rel_error(10, 1.0) < 0.02
    # T>1 amplifies the flattened tail (documented); more cached classes must help.
    for temperature in (2.0, 4.0):
        assert rel_error(50, temperature) < rel_error(10, temperature)
    # k = 1 with a one-hot cache (residual 0, C - 1 classes at -inf) stays finite.
    one_hot = _topk_kd(student, torch.ones(16, 1), teacher.argmax(1, keepdim=True), 2.0)
    assert torch.isfinite(one_hot)


# --------------------------------------------------------------------------- multi-teacher


def test_average_teacher_logits_uniform_and_weighted():
    a, b, c = _logits(3, 4, seed=14), _logits(3, 4, seed=15), _logits(3, 4, seed=16)
    torch.testing.assert_close(average_teacher_logits([a, b, c]), (a + b + c) / 3)
    # weights are normalized: (1, 3) means 0.25 / 0.75
    torch.testing.assert_close(average_teacher_logits([a, b], weights=[1.0, 3.0]), 0.25 * a + 0.75 * b)
    torch.testing.assert_close(average_teacher_logits([a]), a)


def test_average_teacher_logits_rejects_bad_inputs():
    a = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="shape"):
        average_teacher_logits([a, torch.zeros(3, 5)])
    with pytest.raises(ValueError, match="at least one"):
        average_teacher_logits([])
    with pytest.raises(ValueError, match="weights"):
        average_teacher_logits([a, a], weights=[1.0])
    with pytest.raises(ValueError, match="weights"):
        average_teacher_logits([a, a], weights=[0.0, 0.0])


# --------------------------------------------------------------------------- features


def _tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )


def test_feature_hooks_capture_module_outputs_and_remove():
    model = _tiny_cnn()
    x = torch.randn(2, 3, 8, 8)
    with FeatureHooks(model, ["2.0", "4"]) as hooks:
        model(x)
    expected_conv = model[2][0](model[1](model[0](x)))
    expected_flat = model[4](model[3](model[2](model[1](model[0](x)))))
    torch.testing.assert_close(hooks.features["2.0"], expected_conv)
    torch.testing.assert_close(hooks.features["4"], expected_flat)
    assert hooks.features["2.0"].shape == (2, 6, 4, 4)
    # Removed on exit: a new forward does not overwrite the captured tensor.
    captured = hooks.features["2.0"]
    model(torch.randn(2, 3, 8, 8))
    assert hooks.features["2.0"] is captured
    assert all(not m._forward_hooks for m in model.modules())


def test_feature_hooks_keep_graph_and_take_first_tuple_element():
    class Block(nn.Module):
        def forward(self, x):
            return x * 2, "aux"

    model = nn.Sequential(nn.Linear(3, 3), Block())
    hooks = FeatureHooks(model, ["1"])
    x = torch.randn(2, 3)
    model(x)
    feature = hooks.features["1"]
    torch.testing.assert_close(feature, model[0](x) * 2)
    assert feature.requires_grad  # not detached: usable for a student hint loss
    hooks.remove()
    assert not model[1]._forward_hooks


def test_feature_hooks_missing_name_suggests_close_name():
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"encoder\.0"):
        FeatureHooks(model, ["encoder.O"])
    with pytest.raises(ValueError, match="wrap it in a list"):
        FeatureHooks(model, "encoder")


def test_hint_adapter_conv_and_linear_shapes():
    conv = HintAdapter((4, 8, 8), (16, 4, 4))
    assert isinstance(conv.proj, nn.Conv2d)
    assert conv(torch.randn(2, 4, 8, 8)).shape == (2, 16, 4, 4)
    same_hw = HintAdapter((4, 8, 8), (16, 8, 8))
    assert same_hw.out_hw is None and same_hw(torch.randn(2, 4, 8, 8)).shape == (2, 16, 8, 8)
    linear = HintAdapter((6,), (10,))
    assert isinstance(linear.proj, nn.Linear)
    assert linear(torch.randn(3, 6)).shape == (3, 10)
    tokens = HintAdapter((5, 6), (5, 10))
    assert tokens(torch.randn(3, 5, 6)).shape == (3, 5, 10)
    with pytest.raises(ValueError, match="cannot map"):
        HintAdapter((4, 8, 8), (10,))
    with pytest.raises(ValueError, match="student_feature"):
        linear(torch.randn(3, 7))


def test_hint_adapter_for_models_probes_shapes_without_side_effects():
    student = _tiny_cnn()
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Dropout(0.5))
    teacher.train()
    teacher[2].eval()  # a per-module mode that must survive the probe
    adapter = HintAdapter.for_models(student, teacher, "2.0", "1", torch.randn(2, 3, 8, 8))
    assert adapter.student_shape == (6, 4, 4) and adapter.teacher_shape == (8, 8, 8)
    assert adapter(torch.randn(2, 6, 4, 4)).shape == (2, 8, 8, 8)
    assert student.training and teacher.training and teacher[1].training and not teacher[2].training
    # The probe ran in eval mode: BatchNorm statistics are untouched.
    assert teacher[1].num_batches_tracked.item() == 0
    assert torch.equal(teacher[1].running_mean, torch.zeros(8))

    class WithUnusedLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="did not run"):
        HintAdapter.for_models(student, WithUnusedLayer(), "2.0", "unused", torch.randn(2, 3, 8, 8))


def test_hint_loss_zero_for_identity_adapter_and_gradients():
    adapter = HintAdapter((4, 3, 3), (4, 3, 3))
    with torch.no_grad():
        adapter.proj.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        adapter.proj.bias.zero_()
    feature = torch.randn(2, 4, 3, 3)
    assert hint_loss(feature, feature.clone(), adapter).item() < 1e-12

    student_feature = torch.randn(2, 4, 3, 3, requires_grad=True)
    teacher_feature = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = hint_loss(student_feature, teacher_feature, adapter)
    expected = F.mse_loss(student_feature, teacher_feature)  # identity adapter
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert adapter.proj.weight.grad.abs().sum() > 0
    assert student_feature.grad.abs().sum() > 0
    assert teacher_feature.grad is None  # teacher feature is detached


def test_hint_loss_rejects_mismatched_adapter():
    adapter = HintAdapter((6,), (10,))
    with pytest.raises(ValueError, match="teacher_feature"):
        hint_loss(torch.randn(2, 6), torch.randn(2, 9), adapter)


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_topk_log_probs_as_logits_give_the_topk_loss(k, temperature):
    """A reader may rebuild the top-k distribution once (topk_log_probs) and use the plain soft loss on it."""
    torch.manual_seed(k)
    student, teacher = torch.randn(8, 10) * 3, torch.randn(8, 10) * 3
    probs, indices = teacher_topk(teacher, k)
    got = soft_kd_loss(student, topk_log_probs(probs.half(), indices, 10), temperature)
    assert got.item() == pytest.approx(_naive_topk_kd(student, probs.half(), indices, temperature), rel=1e-4, abs=1e-6)
    if k == 10:
        torch.testing.assert_close(got, soft_kd_loss(student, teacher, temperature), rtol=1e-4, atol=1e-5)
