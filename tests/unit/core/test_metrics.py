"""Tests for raydistill.core.metrics on tiny hand-built models with known answers."""

import time

import pytest
import torch
from torch import nn

from raydistill.core import metrics


class PickColumns(nn.Module):
    """Logits = the first K input columns, so predictions are argmax(x[:, :K])."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.scale = nn.Parameter(torch.ones(()))  # gives the model a device and a param

    def forward(self, x):
        return x[:, : self.k] * self.scale


def test_accuracy_matches_known_predictions_across_batches_and_restores_modes():
    torch.manual_seed(0)
    k = 3
    predictions = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    x = torch.nn.functional.one_hot(predictions, k).float()
    y = predictions.clone()
    y[:3] = (y[:3] + 1) % k  # exactly 3 of 10 wrong
    model = PickColumns(k)
    frozen = nn.BatchNorm1d(1)
    model.frozen = frozen
    model.train()
    frozen.eval()  # a deliberately frozen submodule must stay frozen

    assert metrics.accuracy(model, x, y, batch_size=3) == pytest.approx(0.7)
    assert model.training and not frozen.training


def test_accuracy_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="3 inputs but 2 labels"):
        metrics.accuracy(PickColumns(2), torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))


def test_count_params_matches_manual_count():
    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 2, bias=False))
    assert metrics.count_params(model) == 10 * 5 + 5 + 5 * 2


def test_count_macs_linear_and_conv_batch_of_one():
    assert metrics.count_macs(nn.Linear(10, 5), torch.randn(4, 10)) == 50
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    # out_channels * in_channels * k * k * output pixels
    assert metrics.count_macs(conv, torch.randn(2, 3, 8, 8)) == 8 * 3 * 9 * 8 * 8


def test_latency_is_positive_and_restores_thread_count():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # not the measurement's 1 (the suite's processes start with 1: tests/conftest.py)
    try:
        model = nn.Linear(16, 4)
        ms = metrics.latency_ms(model, (16,), batch_size=2, repeats=3, warmup=1, num_threads=1)
        assert ms > 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_latency_budget_caps_the_timed_runs():
    """A forward slower than the budget: one warm-up and 3 timed runs (budget 0 or spent), never the 5 + 30."""
    calls = []

    class Slow(nn.Module):
        def forward(self, x):
            calls.append(1)
            time.sleep(0.002)
            return x

    for budget in (0.0, 0.001):
        calls.clear()
        assert metrics.latency_ms(Slow(), (4,), batch_size=1, budget_s=budget) >= 2.0
        assert len(calls) == 4, (budget, len(calls))
    calls.clear()
    metrics.latency_ms(Slow(), (4,), batch_size=1, budget_s=60.0)
    assert len(calls) == 35  # within the budget: every warm-up and timed run
    with pytest.raises(ValueError, match="budget_s >= 0"):
        metrics.latency_ms(Slow(), (4,), batch_size=1, budget_s=-1.0)


def test_size_bytes_grows_with_params():
    assert metrics.size_bytes(nn.Linear(100, 100)) > metrics.size_bytes(nn.Linear(10, 10)) + 30000


def test_weight_sparsity_counts_zeroed_weights_only():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 10))  # 36 + 40 weights
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[2].weight.fill_(1.0)
        model[0].weight.view(-1)[:18] = 0.0  # half of the conv
        model[2].bias.zero_()  # biases don't count
    assert metrics.weight_sparsity(model) == pytest.approx(18 / 76)


def test_model_summary_has_exact_keys():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(6, 1, 2, 2)
    y = torch.randint(0, 3, (6,))
    summary = metrics.model_summary(model, x[:1], x, y)
    assert set(summary) == {
        "accuracy",
        "params",
        "macs",
        "latency_ms_b1",
        "latency_ms_b64",
        "size_bytes",
        "sparsity",
    }
    assert summary["macs"] == 12 and summary["params"] == 15
