"""Unstructured magnitude pruning in a training loop, SVD ranks by rank or energy, the sparse size, and the
teacher ensemble: the core pieces behind prune.kind, lowrank.* and teacher.ensemble."""

import io

import pytest
import torch
import torch.nn as nn

from raydistill.core.losses import average_teacher_logits
from raydistill.core.metrics import size_bytes, sparse_size_bytes, weight_sparsity
from raydistill.core.pruning import MagnitudePruner
from raydistill.core.surgery import low_rank_factorize_, low_rank_ranks


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 32), nn.ReLU(),
                         nn.Linear(32, 10))


def test_magnitude_pruner_zeroes_the_smallest_weights_per_layer_and_keeps_the_classifier_dense():
    model = _net()
    before = {n: m.weight.detach().abs().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    pruner = MagnitudePruner(model)
    info = pruner.mask_(0.5)
    assert set(pruner.masks) == {"0", "3"}  # "5", the classifier, stays dense
    for name in ("0", "3"):
        w = dict(model.named_modules())[name].weight
        zeros = w == 0
        assert int(zeros.sum()) == round(0.5 * w.numel())
        # naive reference: every zeroed weight was no larger than every kept one
        assert before[name][zeros].max() <= before[name][~zeros].min()
    assert (model[5].weight != 0).all()
    assert info["masked_weights"] == sum(round(0.5 * model[i].weight.numel()) for i in (0, 3))
    assert pruner.remove_() == []  # nothing is removed: same dense shapes


def test_masks_survive_optimizer_steps_grow_nested_and_hold_at_the_same_ratio():
    model = _net()
    pruner = MagnitudePruner(model)
    pruner.mask_(0.3)
    first = {n: m.clone() for n, m in pruner.masks.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 10, (16,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.reapply_masks_()
        assert all((dict(model.named_modules())[n].weight[~m] == 0).all() for n, m in pruner.masks.items())
    pruner.mask_(0.3)  # the same ratio again (the fine-tune phase): the same mask
    assert all(torch.equal(first[n], pruner.masks[n]) for n in first)
    pruner.mask_(0.6)  # a higher ratio: a superset of the zeros (nothing zeroed before is kept now)
    assert all(((~first[n]) & pruner.masks[n]).sum() == 0 for n in first)


def test_sparse_size_is_smaller_only_when_weights_are_zero():
    model = _net()
    dense = sparse_size_bytes(model)
    MagnitudePruner(model).mask_(0.8)
    assert weight_sparsity(model) > 0.5
    sparse = sparse_size_bytes(model)
    assert sparse < 0.5 * size_bytes(model) and sparse < dense
    assert dense > size_bytes(model)  # a dense model stored sparse is larger: the bitmap is overhead, honestly


def test_low_rank_ranks_by_rank_and_by_energy_against_a_naive_svd():
    model = _net()
    assert low_rank_ranks(model, rank=4, skip=["5"]) == {"3": 4}
    with pytest.raises(ValueError, match=r"rank 40 is larger than layer '3' \(Linear 128->32, rank at most 32\)"):
        low_rank_ranks(model, rank=40, skip=["5"])
    s2 = torch.linalg.svdvals(model[3].weight.detach()) ** 2
    for energy in (0.5, 0.9):
        naive = next(r for r in range(1, len(s2) + 1) if s2[:r].sum() / s2.sum() >= energy)
        ranks = low_rank_ranks(model, energy=energy, skip=["5"])
        assert ranks.get("3", None) == (naive if naive * (128 + 32) < 128 * 32 else None)
    with pytest.raises(ValueError, match="exactly one"):
        low_rank_ranks(model, rank=2, energy=0.5)


def test_factorizing_by_ranks_rebuilds_the_same_structure_for_a_checkpoint():
    from raydistill.checkpoints import build_from_spec, model_spec

    spec = model_spec("cnn", {"widths": [4, 8], "hidden": 32}, 10, (1, 8, 8))
    model = build_from_spec(spec)
    ranks = low_rank_ranks(model, rank=3, skip=["12"])
    report = low_rank_factorize_(model, ranks=ranks)
    assert report["9"]["rank"] == 3 and report["9"]["params_after"] < report["9"]["params_before"]
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    again = build_from_spec({**spec, "lowrank": ranks}, torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(again.eval()(x), model.eval()(x))


def test_teacher_ensemble_serves_the_weighted_average_and_rebuilds_from_its_spec():
    from raydistill.checkpoints import build_from_spec, model_spec
    from raydistill.ensemble import TeacherEnsemble, ensemble_spec

    specs = [model_spec("cnn", {"widths": [4, 8], "hidden": 16}, 10, (1, 8, 8)),
             model_spec("mlp", {"hidden": [16]}, 10, (1, 8, 8))]
    torch.manual_seed(0)
    members = [build_from_spec(s).eval() for s in specs]
    ens = TeacherEnsemble(members, [1.0, 3.0]).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        naive = (1.0 * members[0](x) + 3.0 * members[1](x)) / 4.0
        assert torch.allclose(ens(x), naive, atol=1e-6)
        assert torch.allclose(ens(x), average_teacher_logits([m(x) for m in members], [1, 3]))
        rebuilt = build_from_spec(ensemble_spec(specs, [1.0, 3.0]), ens.state_dict()).eval()
        assert torch.allclose(rebuilt(x), ens(x))
