"""prune.kind reaches the loop: the phases a kind gets, and the pruner the loop builds for them."""

import torch

from raydistill import config
from raydistill import job as jobs
from raydistill.core.pruning import ChannelPruner, MagnitudePruner
from raydistill.models import build_model
from raydistill.worker import make_pruner, prune_step_


def test_channel_pruning_removes_channels_and_unstructured_holds_its_mask_through_the_finetune():
    channel = jobs.prune_phases(config.load(None, {"prune.kind": "channel"}))
    assert channel[0].remove_after and channel[0].prune.kind == "channel" and channel[1].prune is None
    un = jobs.prune_phases(config.load(None, {"prune.kind": "unstructured", "prune.ratio": 0.5}))
    assert not un[0].remove_after and un[0].prune.kind == "unstructured"
    assert un[1].prune == jobs.PruneSchedule(0.5, "l1", "oneshot", "unstructured")  # holds the final ratio


def test_the_loop_builds_the_pruner_of_the_kind_and_the_finetune_keeps_the_zeros():
    cfg = config.load(None, {"prune.kind": "unstructured", "prune.ratio": 0.5, "prune.epochs": 2})
    prune, finetune = jobs.prune_phases(cfg)
    model = build_model("cnn", 10, 1, 8, widths=(8, 16), hidden=32)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    assert isinstance(make_pruner(model, x[:2], jobs.prune_phases(config.load(None, {}))[0]), ChannelPruner)
    assert make_pruner(model, x[:2], jobs.kd_phases(cfg)[0]) is None
    pruner = make_pruner(model, x[:2], prune)
    assert isinstance(pruner, MagnitudePruner)
    ratios = [prune_step_(pruner, prune, e, model, x, y, torch.device("cpu"), 1) for e in range(prune.epochs)]
    assert ratios[-1] == 0.5
    zeros = {n: (m.weight == 0).clone() for n, m in model.named_modules() if n in pruner.masks}
    with torch.no_grad():  # an optimizer step would move them; the fine-tune's pruner puts the same ones back
        for n, m in model.named_modules():
            if n in zeros:
                m.weight.add_(0.01 * torch.randn_like(m.weight) * zeros[n])
    hold = make_pruner(model, x[:2], finetune)
    prune_step_(hold, finetune, 0, model, x, y, torch.device("cpu"), 1)
    assert all(torch.equal(dict(model.named_modules())[n].weight == 0, z) for n, z in zeros.items())
