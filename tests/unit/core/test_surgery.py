"""Tests for raydistill.core.surgery."""

import math

import pytest
import torch
import torch.nn as nn

from raydistill.core.surgery import _set_module, init_from_teacher_, low_rank_factorize_


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- init_from_teacher_


def test_init_from_teacher_copies_matching_tensors_and_reports_the_rest():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.Linear(8, 3))
    student = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    teacher[1].running_mean.normal_()  # a buffer that must be copied too
    student_before = {k: v.clone() for k, v in student.state_dict().items()}

    report = init_from_teacher_(student, teacher)

    t_state, s_state = teacher.state_dict(), student.state_dict()
    copied = ["0.weight", "0.bias"]
    copied += ["1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert report["copied"] == copied
    for name in copied:
        assert torch.equal(s_state[name], t_state[name])
    # student "2" is Linear(8, 3), teacher "2" is Linear(8, 8): weight and bias differ in shape
    assert report["skipped_shape"] == [("2.weight", (3, 8), (8, 8)), ("2.bias", (3,), (8,))]
    assert torch.equal(s_state["2.weight"], student_before["2.weight"])
    assert report["missing_in_teacher"] == []
    assert report["copied_numel"] == sum(t_state[n].numel() for n in copied)
    # The copy wrote into the live parameters, not into a detached state_dict copy.
    assert torch.equal(student[0].weight, teacher[0].weight)
    assert student[0].weight.requires_grad


def test_init_from_teacher_reports_missing_names_and_casts_dtype():
    teacher = nn.Sequential(nn.Linear(3, 3))
    student = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)).double()
    report = init_from_teacher_(student, teacher)
    assert report["missing_in_teacher"] == ["1.weight", "1.bias"]
    assert student[0].weight.dtype == torch.float64
    torch.testing.assert_close(student[0].weight, teacher[0].weight.double())


# --------------------------------------------------------------------------- low_rank_factorize_


def test_set_module_replaces_nested_child():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    new = nn.Identity()
    _set_module(model, "0.1", new)
    assert model[0][1] is new


def test_low_rank_exact_for_rank_8_weight():
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        a, b = torch.randn(64, 8, generator=gen), torch.randn(8, 64, generator=gen)
        model[0].weight.copy_(a @ b / 8)  # rank exactly 8
    x = torch.randn(5, 64, generator=gen)
    before = model(x)
    params_before = _num_params(model)

    report = low_rank_factorize_(model, rank_ratio=0.125, skip=["2"])

    entry = report["0"]
    assert entry["rank"] == 8
    assert entry["rel_error"] < 1e-5
    assert entry["params_before"] == 64 * 64 + 64
    assert entry["params_after"] == 8 * (64 + 64) + 64
    assert report["skipped"] == ["2"]
    assert isinstance(model[0], nn.Sequential)
    assert [tuple(layer.weight.shape) for layer in model[0]] == [(8, 64), (64, 8)]
    assert model[0][0].bias is None and model[0][1].bias is not None
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    assert params_before - _num_params(model) == entry["params_before"] - entry["params_after"]


def test_low_rank_rel_error_is_eckart_young_and_params_drop():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(48, 32, bias=False))
    weight = model[0].weight.detach().clone()  # random, full rank
    singular = torch.linalg.svdvals(weight.double())
    params_before = _num_params(model)

    report = low_rank_factorize_(model, rank_ratio=0.25)

    r = report["0"]["rank"]
    assert r == 8
    expected = math.sqrt((singular[r:] ** 2).sum() / (singular**2).sum())
    assert report["0"]["rel_error"] == pytest.approx(expected, abs=1e-4)
    # The installed factors really are the truncated SVD: same error measured from the model.
    installed = model[0][1].weight @ model[0][0].weight
    measured = (torch.linalg.matrix_norm(weight - installed) / torch.linalg.matrix_norm(weight)).item()
    assert measured == pytest.approx(expected, abs=1e-4)
    assert _num_params(model) == r * (48 + 32) < params_before


def test_low_rank_skips_layers_it_cannot_shrink():
    torch.manual_seed(3)
    attention = nn.MultiheadAttention(16, 2, batch_first=True)
    model = nn.ModuleDict({"big": nn.Linear(16, 16), "small": nn.Linear(4, 16), "attn": attention})
    before = {name: module for name, module in model.named_modules()}

    # rank_ratio=1: r = 16, 16 * 32 >= 16 * 16, no parameter saving.
    report = low_rank_factorize_(model, rank_ratio=1.0)
    assert sorted(report["skipped"]) == ["attn.out_proj", "big", "small"]
    assert set(report) == {"skipped"}
    assert all(model.get_submodule(name) is module for name, module in before.items())

    # "small" has min(in, out) = 4 < min_features; out_proj is a Linear subclass read by its parent.
    report = low_rank_factorize_(model, rank_ratio=0.25)
    assert sorted(report["skipped"]) == ["attn.out_proj", "small"]
    assert isinstance(model["big"], nn.Sequential)
    x = torch.randn(2, 3, 16)
    attention(x, x, x)  # still runs


def test_low_rank_keeps_frozen_layers_frozen_and_validates():
    model = nn.Sequential(nn.Linear(32, 32))
    model.requires_grad_(False)
    low_rank_factorize_(model, rank_ratio=0.25)
    assert not any(p.requires_grad for p in model.parameters())
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="rank_ratio"):
            low_rank_factorize_(model, rank_ratio=bad)
    with pytest.raises(ValueError, match="'0.0'"):
        low_rank_factorize_(nn.Sequential(nn.Sequential(nn.Linear(32, 32))), 0.5, skip=["0.O"])
