"""Tests for raydistill.core.losses against naive references written out here."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from raydistill.core.losses import (
    LOGIT_LOSSES,
    TOPK_LOSSES,
    FeatureHooks,
    HintAdapter,
    average_teacher_logits,
    dist_loss,
    dkd_loss,
    hard_kd_loss,
    hint_loss,
    soft_kd_loss,
    sparse_topk_kd_loss,
    sparse_topk_log_probs,
    standardize_logits,
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


# --------------------------------------------------------------------------- the owners of the choice lists


def test_choice_lists():
    assert LOGIT_LOSSES == ("kd", "dkd", "dist")
    assert TOPK_LOSSES == {"tail_filled": topk_log_probs, "sparse": sparse_topk_log_probs}


# --------------------------------------------------------------------------- DKD


def _naive_dkd(student, teacher, target, temperature, alpha, beta):
    """DKD one sample at a time in float64: the binary (target, rest) distributions and the non-target
    distribution renormalised explicitly (p_c / (1 - p_target)), where the loss masks the target logit."""

    def probs(row):
        m = max(v / temperature for v in row)
        e = [math.exp(v / temperature - m) for v in row]
        return [v / sum(e) for v in e]

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)

    tckd = nckd = 0.0
    for s_row, t_row, y in zip(student.tolist(), teacher.tolist(), target.tolist()):
        p_s, p_t = probs(s_row), probs(t_row)
        tckd += kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
        rest = [c for c in range(len(s_row)) if c != y]
        nckd += kl([p_t[c] / (1 - p_t[y]) for c in rest], [p_s[c] / (1 - p_s[y]) for c in rest])
    scale = temperature**2 / len(student)
    return alpha * tckd * scale + beta * nckd * scale


@pytest.mark.parametrize("temperature,alpha,beta", [(1.0, 1.0, 1.0), (4.0, 1.0, 8.0), (2.0, 0.5, 2.0)])
def test_dkd_matches_naive_reference(temperature, alpha, beta):
    student, teacher = _logits(6, 7, seed=20), _logits(6, 7, seed=21)
    target = torch.tensor([0, 3, 6, 2, 2, 5])
    got = dkd_loss(student.float(), teacher.float(), target, temperature, alpha, beta)
    assert got.ndim == 0 and got.dtype == torch.float32
    expected = _naive_dkd(student, teacher, target, temperature, alpha, beta)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dkd_terms_are_separate_and_add_up_to_kd():
    student, teacher = _logits(5, 6, seed=22).float(), _logits(5, 6, seed=23).float()
    target = torch.tensor([1, 0, 5, 3, 1])
    tckd = dkd_loss(student, teacher, target, 3.0, 1.0, 0.0)
    nckd = dkd_loss(student, teacher, target, 3.0, 0.0, 1.0)
    torch.testing.assert_close(dkd_loss(student, teacher, target, 3.0, 0.7, 0.0), 0.7 * tckd)  # beta=0: alpha*TCKD
    torch.testing.assert_close(dkd_loss(student, teacher, target, 3.0, 0.7, 2.5), 0.7 * tckd + 2.5 * nckd)
    # Zhao et al., eq. (1): per sample KD = TCKD + (1 - p_T[target]) * NCKD
    for b in range(5):
        s, t, y = student[b:b + 1], teacher[b:b + 1], target[b:b + 1]
        p_target = F.softmax(t / 3.0, dim=-1)[0, y]
        decomposed = dkd_loss(s, t, y, 3.0, 1.0, 0.0) + (1 - p_target) * dkd_loss(s, t, y, 3.0, 0.0, 1.0)
        torch.testing.assert_close(decomposed, soft_kd_loss(s, t, 3.0).reshape(1))


def test_dkd_of_a_student_equal_to_the_teacher_is_zero():
    logits = _logits(4, 9, seed=24).float()
    assert dkd_loss(logits, logits.clone(), torch.tensor([0, 1, 2, 8]), 4.0, 1.0, 8.0).abs().item() < 1e-5


def test_dkd_with_a_top_k_teacher_is_finite():
    """-inf teacher classes (a top-k expansion): the target outside the top-k, or no mass besides the target."""
    student = (_logits(4, 6, seed=25).float() * 3).requires_grad_()
    teacher = _logits(4, 6, seed=26).float()
    one_hot = topk_log_probs(torch.ones(4, 1), teacher.argmax(1, keepdim=True), 6)  # residual 0: the rest -inf
    sparse = sparse_topk_log_probs(*teacher_topk(teacher, 2), 6)
    for t, target in ((one_hot, teacher.argmax(1)), (one_hot, (teacher.argmax(1) + 1) % 6),
                      (sparse, teacher.argmin(1))):
        loss = dkd_loss(student, t, target, 4.0, 1.0, 8.0)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # no non-target mass: NCKD has nothing to match and is 0 (mdistiller's -1000 mask alone would give ~1000 T^2)
    assert dkd_loss(student, one_hot, teacher.argmax(1), 4.0, 0.0, 1.0).item() == 0.0


def test_dkd_extreme_logits_and_fp16_inputs():
    student = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, 1e4, 1e4, -1e4]], requires_grad=True)
    teacher = torch.tensor([[-1e4, 1e4, 0.0, 3.0], [0.0, 2.0, 1e4, -1e4]])
    loss = dkd_loss(student, teacher, torch.tensor([0, 2]), 2.0, 1.0, 8.0)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    s, t, y = _logits(3, 5, seed=27), _logits(3, 5, seed=28), torch.tensor([4, 0, 1])
    half = dkd_loss(s.half(), t.half(), y, 4.0, 1.0, 8.0)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(_naive_dkd(s.half().double(), t.half().double(), y, 4.0, 1.0, 8.0), rel=1e-4)


def test_dkd_rejects_bad_inputs():
    s, t = torch.zeros(2, 3), torch.zeros(2, 3)
    for target in (torch.zeros(3, dtype=torch.long), torch.zeros(2), torch.zeros(2, 1, dtype=torch.long)):
        with pytest.raises(ValueError, match="target must be"):
            dkd_loss(s, t, target, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        dkd_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        dkd_loss(s, t, torch.zeros(2, dtype=torch.long), 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="same"):
        dkd_loss(s, t[:, :2], torch.zeros(2, dtype=torch.long), 1.0, 1.0, 1.0)


# --------------------------------------------------------------------------- DIST


def _naive_dist(student, teacher, temperature, beta, gamma):
    """DIST with numpy's own Pearson correlation (np.corrcoef, no eps) over rows and over columns."""
    def softmax(z):
        e = np.exp(z / temperature - (z / temperature).max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    y_s, y_t = softmax(student.numpy()), softmax(teacher.numpy())
    inter = np.mean([np.corrcoef(y_s[b], y_t[b])[0, 1] for b in range(y_s.shape[0])])
    intra = np.mean([np.corrcoef(y_s[:, c], y_t[:, c])[0, 1] for c in range(y_s.shape[1])])
    return temperature**2 * (beta * (1 - inter) + gamma * (1 - intra))


@pytest.mark.parametrize("temperature,beta,gamma", [(1.0, 1.0, 1.0), (4.0, 1.0, 2.0), (2.0, 0.0, 1.0)])
def test_dist_matches_numpy_reference(temperature, beta, gamma):
    student, teacher = _logits(8, 6, seed=30), _logits(8, 6, seed=31)
    got = dist_loss(student.float(), teacher.float(), temperature, beta, gamma)
    assert got.ndim == 0 and got.dtype == torch.float32
    assert got.item() == pytest.approx(_naive_dist(student, teacher, temperature, beta, gamma), rel=1e-4)


def test_dist_of_a_student_equal_to_the_teacher_is_zero():
    logits = _logits(8, 10, seed=32).float()
    for temperature in (1.0, 4.0):
        assert abs(dist_loss(logits, logits.clone(), temperature, 1.0, 1.0).item()) < 1e-3


def test_dist_gradients_fp16_and_a_batch_of_one():
    student = (_logits(6, 5, seed=33).float() * 10).requires_grad_()
    teacher = _logits(6, 5, seed=34).float()
    teacher[:, 0] = -float("inf")  # a class the teacher rules out (top-k expansion)
    loss = dist_loss(student, teacher, 2.0, 1.0, 1.0)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    half = dist_loss(student.detach().half(), teacher.half(), 2.0, 1.0, 1.0)
    assert half.dtype == torch.float32 and half.item() == pytest.approx(loss.item(), rel=1e-2)
    # one sample: each class column is a single value, its correlation 0, so the intra-class term is T^2
    one = student[:1]
    loss1 = dist_loss(one, teacher[:1], 2.0, 0.0, 1.0)
    (grad1,) = torch.autograd.grad(loss1, one)
    assert loss1.item() == pytest.approx(4.0) and torch.isfinite(grad1).all()


def test_dist_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same"):
        dist_loss(torch.zeros(2, 3), torch.zeros(3, 3), 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        dist_loss(torch.zeros(2, 3), torch.zeros(2, 3), float("nan"), 1.0, 1.0)


# --------------------------------------------------------------------------- logit standardization


def test_standardize_logits_matches_numpy_and_is_a_z_score():
    logits = _logits(5, 9, seed=40)
    got = standardize_logits(logits.half())
    assert got.dtype == torch.float32 and got.shape == (5, 9)
    z = logits.half().double().numpy()
    expected = (z - z.mean(axis=1, keepdims=True)) / z.std(axis=1, ddof=1, keepdims=True)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.mean(dim=1), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.std(dim=1), torch.ones(5))


def test_standardize_logits_ignores_shift_and_scale():
    logits = _logits(4, 7, seed=41).float()
    shifted_scaled = 3.5 * logits + torch.tensor([[10.0], [-4.0], [0.0], [100.0]])
    torch.testing.assert_close(standardize_logits(shifted_scaled), standardize_logits(logits), rtol=1e-5, atol=1e-5)
    # so KD on standardized logits does not see a teacher's logit range, only its logit relations
    s = standardize_logits(_logits(4, 7, seed=42).float())
    torch.testing.assert_close(soft_kd_loss(s, standardize_logits(shifted_scaled), 2.0),
                               soft_kd_loss(s, standardize_logits(logits), 2.0))


def test_standardize_logits_constant_row_gradients_and_bad_inputs():
    logits = torch.cat([torch.full((1, 4), 3.0), _logits(1, 4, seed=43).float()]).requires_grad_()
    out = standardize_logits(logits)
    assert (out[0] == 0).all()  # a constant row: (z - mean) = 0, std 0 + eps
    (grad,) = torch.autograd.grad(soft_kd_loss(out, torch.randn(2, 4), 2.0), logits)
    assert torch.isfinite(grad).all()
    with pytest.raises(ValueError, match="at least 2"):
        standardize_logits(torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        standardize_logits(torch.zeros(3))


# --------------------------------------------------------------------------- sparse top-k


def _naive_sparse_topk_kd(student, probs, indices, temperature):
    """Reference, one sample at a time: the cached classes' p^(1/T) renormalised over those k classes, against the
    student's full softmax at T read at the same classes; the other classes do not appear."""
    total = 0.0
    for b in range(student.shape[0]):
        tempered = [float(q) ** (1.0 / temperature) for q in probs[b].float()]
        p_t = [q / sum(tempered) for q in tempered]
        s = [float(v) / temperature for v in student[b]]
        log_z = math.log(sum(math.exp(v) for v in s))
        total += sum(p * (math.log(p) - (s[int(c)] - log_z)) for p, c in zip(p_t, indices[b]) if p > 0)
    return total / student.shape[0] * temperature**2


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_sparse_topk_matches_naive_reference_and_its_expansion(k, temperature):
    student, teacher = _logits(6, 10, seed=50).float(), _logits(6, 10, seed=51).float()
    probs, indices = teacher_topk(teacher, k)
    probs = probs.half()  # as the cache stores them
    got = sparse_topk_kd_loss(student, probs, indices, temperature)
    assert got.ndim == 0 and got.dtype == torch.float32
    assert got.item() == pytest.approx(_naive_sparse_topk_kd(student, probs, indices, temperature), rel=1e-5, abs=1e-6)
    # the worker's path (cache.topk_loss: sparse): soft_kd_loss on the -inf-tailed expansion is the same loss
    expansion = sparse_topk_log_probs(probs, indices, 10)
    assert torch.isneginf(expansion).sum() == 6 * (10 - k)
    torch.testing.assert_close(expansion.exp().sum(dim=1), torch.ones(6))
    torch.testing.assert_close(soft_kd_loss(student, expansion, temperature), got, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_sparse_topk_with_all_classes_equals_soft_kd(temperature):
    student, teacher = _logits(5, 8, seed=52).float(), _logits(5, 8, seed=53).float()
    probs, indices = teacher_topk(teacher, 8)
    got = sparse_topk_kd_loss(student, probs, indices, temperature)
    torch.testing.assert_close(got, soft_kd_loss(student, teacher, temperature), rtol=1e-5, atol=1e-5)


def test_sparse_topk_ignores_the_tail_unlike_tail_filled():
    """The tail-filled loss differs from the sparse one when the top-k leave residual mass; the sparse one sees
    the student's tail classes only through its softmax normaliser."""
    student = _logits(4, 10, seed=54).float()
    probs, indices = teacher_topk(_logits(4, 10, seed=55).float(), 3)
    sparse = sparse_topk_kd_loss(student, probs, indices, 2.0)
    tail_filled = soft_kd_loss(student, topk_log_probs(probs, indices, 10), 2.0)
    assert abs(sparse.item() - tail_filled.item()) > 1e-3
    # the student's tail matters only through its normalisation: move mass among tail classes, same loss
    tail = torch.ones(4, 10, dtype=torch.bool).scatter_(1, indices, False)
    moved = student.clone()
    for b in range(4):
        cls = torch.nonzero(tail[b]).flatten()
        moved[b, cls] = torch.logsumexp(student[b, cls], 0) - math.log(len(cls))  # same tail mass, spread evenly
    torch.testing.assert_close(sparse_topk_kd_loss(moved, probs, indices, 1.0),
                               sparse_topk_kd_loss(student, probs, indices, 1.0))


def test_sparse_topk_gradients_zero_probabilities_and_bad_inputs():
    student = (_logits(3, 6, seed=56).float() * 5).requires_grad_()
    probs = torch.tensor([[0.9, 0.1, 0.0], [1.0, 0.0, 0.0], [0.5, 0.3, 0.2]]).half()  # fp16 underflow: zeros
    indices = torch.tensor([[0, 1, 2], [5, 4, 3], [2, 0, 1]])
    loss = sparse_topk_kd_loss(student, probs, indices, 4.0)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert loss.item() == pytest.approx(_naive_sparse_topk_kd(student.detach(), probs, indices, 4.0), rel=1e-5)
    bad = [(probs[:2], indices[:2], "rows for a batch"), (probs, indices[:, :2], "topk_indices must be"),
           (probs, indices.float(), "topk_indices must be"), (probs, indices + 4, "class indices in"),
           (torch.ones(3, 7), torch.zeros(3, 7, dtype=torch.long), "k must be")]
    for p, i, match in bad:
        with pytest.raises(ValueError, match=match):
            sparse_topk_kd_loss(student, p, i, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        sparse_topk_kd_loss(student, probs, indices, 0.0)
