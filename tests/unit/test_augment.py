"""raydistill.augment: per-sample crop/flip views regenerated from (seed, id, view), checked against torchvision."""

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from raydistill.augment import Augment, augment_batch, epoch_views, make_augment, resolve_pad, view_params


def _reference(x, dy, dx, flip, pad):
    """torchvision, one sample at a time: zero pad, crop at (dy, dx), then horizontal flip."""
    out = []
    for i in range(len(x)):
        img = TF.crop(TF.pad(x[i], [pad, pad, pad, pad], fill=0), int(dy[i]), int(dx[i]), x.shape[2], x.shape[3])
        out.append(TF.horizontal_flip(img) if flip[i] else img)
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["crop", "crop_flip"])
@pytest.mark.parametrize("shape,pad", [((16, 3, 8, 8), 1), ((16, 3, 8, 8), 3), ((9, 2, 12, 10), 2)])
def test_matches_torchvision_per_sample(kind, shape, pad):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ids = np.arange(len(x)) * 13 + 5
    views = np.arange(len(x)) % 3
    dy, dx, flip = view_params(ids, views, seed=7, pad=pad, flip=kind == "crop_flip")
    out = Augment(kind, pad, 7)(x, ids, views)
    assert torch.equal(out, _reference(x, dy, dx, flip, pad))
    assert len(set(zip(dy.tolist(), dx.tolist()))) > 1  # samples of one batch get different crops


def test_every_crop_offset_and_flip_matches_torchvision():
    """All (dy, dx, flip) combinations of a pad, not just the ones the hash happens to pick."""
    pad, x = 2, torch.randn(1, 3, 6, 6)
    combos = [(dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in (False, True)]
    dy, dx, flip = (np.array(c) for c in zip(*combos))
    xs = x.expand(len(combos), -1, -1, -1)
    assert torch.equal(augment_batch(xs, dy, dx, flip, pad), _reference(xs, dy, dx, flip, pad))


def test_views_are_a_pure_function_of_seed_id_and_view():
    ids = np.arange(200)
    a = view_params(ids, 1, seed=3, pad=4, flip=True)
    b = view_params(ids.copy(), np.ones(200, np.int64), seed=3, pad=4, flip=True)  # scalar view == array view
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    other_view, other_seed = view_params(ids, 2, 3, 4, True), view_params(ids, 1, 4, 4, True)
    for other in (other_view, other_seed):
        assert np.mean((a[0] != other[0]) | (a[1] != other[1]) | (a[2] != other[2])) > 0.5
    # the order of samples in a batch does not matter: a sample's view depends on its id only
    perm = np.random.default_rng(0).permutation(200)
    shuffled = view_params(ids[perm], 1, 3, 4, True)
    assert all(np.array_equal(u[perm], v) for u, v in zip(a, shuffled))
    dy, dx, flip = a
    assert dy.min() == 0 and dy.max() == 8 and dx.min() == 0 and dx.max() == 8 and 0.3 < flip.mean() < 0.7


def test_no_augmentation_and_zero_offsets_are_no_ops():
    x = torch.randn(5, 3, 8, 8)
    assert make_augment("none", 0, 0, 8)(x, np.arange(5), 0) is x
    zeros = np.zeros(5, np.int64)
    assert torch.equal(augment_batch(x, zeros, zeros, np.zeros(5, bool), pad=0), x)
    centre = np.full(5, 2)  # the unshifted crop of a 2-pixel pad
    assert torch.equal(augment_batch(x, centre, centre, np.zeros(5, bool), pad=2), x)


def test_flip_only_for_crop_flip():
    ids = np.arange(500)
    assert not view_params(ids, 0, 0, 1, flip=False)[2].any()
    assert not make_augment("crop", 0, 0, 8).params(ids, 0)[2].any()
    assert make_augment("crop_flip", 0, 0, 8).params(ids, 0)[2].any()
    x = torch.arange(8.0).expand(500, 1, 8, 8)  # every row reads 0..7
    out = make_augment("crop_flip", 0, 0, 8)(x, ids, 0)
    rows = out[:, 0, 4, 1:-1]  # inner columns are never padding
    assert (rows.diff(dim=1) < 0).any(dim=1).float().mean() > 0.3  # some images read right to left
    assert (make_augment("crop", 0, 0, 8)(x, ids, 0)[:, 0, 4, 1:-1].diff(dim=1) > 0).all()


def test_pad_is_resolved_from_the_image_size():
    assert resolve_pad(0, 32) == 4 and resolve_pad(0, 8) == 1 and resolve_pad(0, 4) == 1 and resolve_pad(3, 32) == 3
    assert make_augment("crop", 0, 1, 32) == Augment("crop", 4, 1)
    assert make_augment("none", 5, 1, 32).transform == "none"
    assert make_augment("crop", 0, 1, 32).transform != make_augment("crop", 0, 2, 32).transform  # seed defines views
    assert make_augment("crop", 0, 1, 32).transform != make_augment("crop_flip", 0, 1, 32).transform
    with pytest.raises(ValueError, match="data.augment must be one of"):
        make_augment("flip", 0, 0, 8)


def test_epoch_views_cycle_through_every_cached_view():
    ids, V = np.arange(1000) * 3, 4
    seen = np.stack([epoch_views(ids, e, seed=0, views=V) for e in range(V)])  # (V epochs, N)
    assert seen.min() == 0 and seen.max() == V - 1
    assert (np.sort(seen, axis=0) == np.arange(V)[:, None]).all()  # each sample: every view exactly once in V epochs
    assert (seen[1] != seen[0]).all()  # consecutive epochs differ
    assert len(np.unique(seen[0])) == V  # samples are not in step: epoch 0 already uses every view
    assert (epoch_views(ids, 5, 0, views=1) == 0).all()
    assert (epoch_views(ids, 5, 0, views=None) == 5).all()  # a live teacher: a fresh view every epoch
