"""Random crop / flip augmentation whose every view can be regenerated from (seed, sample id, view id).

FKD (Shen & Xing 2021, "A Fast Knowledge Distillation Framework for Visual Recognition") stores the
teacher's soft labels for a fixed number of augmented *views* per sample and trains the student on
exactly those views. That only works if the student's pixels are the very pixels the teacher labelled,
so a view is not drawn from an RNG but computed:

    h            = splitmix64 hash of (seed, sample id, view id)
    dy, dx       = two slices of h mod (2 * pad + 1)       # crop offset inside the zero-padded image
    flip         = one bit of h (crop_flip only)

Why hand-written rather than torchvision's ``RandomCrop(padding=p)`` / ``RandomHorizontalFlip``: those
draw one parameter set per call from the global torch RNG, so a batch shares one crop unless it is
augmented sample by sample, and a view cannot be re-created later from its id. Here the parameters are
a pure function of (seed, id, view), and ``augment_batch`` applies a different crop and flip to every
sample of a batch in one gather. ``tests/unit/test_augment.py`` checks it against
``torchvision.transforms.v2.functional`` (pad + crop + hflip) applied per sample.

Zero padding happens on the already-normalized data (data.py standardizes per channel), so the border
is the mean colour, as with torchvision's usual crop after normalization would be.

Plain numpy and torch: no Ray import (the cache's Ray Data actors and the worker both use it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from raydistill.errors import ConfigError
from raydistill.hashing import hash_ints

AUGMENTS = ("none", "crop", "crop_flip")

_PARAMS, _OFFSET = 1, 2  # domain tags: a view's crop/flip and a sample's view offset are unrelated hashes

def resolve_pad(pad: int, image_size: int) -> int:
    """``data.augment_pad``: 0 means auto, max(1, image_size // 8) (4 px for CIFAR's 32, 1 px for digits' 8)."""
    return pad if pad > 0 else max(1, image_size // 8)


def view_params(ids, views, seed: int, pad: int, flip: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop offsets and flips of samples ``ids`` (B,) in views ``views`` (B,) or one view for all.

    Returns dy, dx (B,) int64 in [0, 2 * pad] (top-left corner of the crop in the padded image) and
    flip (B,) bool (all False unless ``flip``).
    """
    h = hash_ints(seed, _PARAMS, ids, views)  # (B,) uint64
    span = np.uint64(2 * pad + 1)
    dy = (h % span).astype(np.int64)
    dx = ((h >> np.uint64(24)) % span).astype(np.int64)
    flips = ((h >> np.uint64(48)) & np.uint64(1)).astype(bool) & flip
    return dy, dx, flips


def epoch_views(ids, epoch: int, seed: int, views: int | None) -> np.ndarray:
    """Which view each sample ``ids`` (N,) is trained on in ``epoch``: (N,) int64.

    With a cache of ``views`` = V views (FKD) every sample cycles through its V cached views from its own
    offset, (epoch + offset(seed, id)) % V, so all V get used and neighbouring samples are not in step.
    With a teacher that labels whatever it is shown (``views`` None) every epoch is a fresh view: its id
    is the epoch.
    """
    ids = np.atleast_1d(np.asarray(ids))
    if views is None:
        return np.full(len(ids), epoch, np.int64)
    offset = (hash_ints(seed, _OFFSET, ids) % np.uint64(views)).astype(np.int64)
    return (epoch + offset) % views


def augment_batch(x: torch.Tensor, dy, dx, flip, pad: int) -> torch.Tensor:
    """Per-sample random crop after zero padding, then horizontal flip, for a whole batch at once.

    x (B, C, H, W); dy, dx (B,) crop corners in [0, 2 * pad] of the padded (H + 2p, W + 2p) image;
    flip (B,) bool. Returns a new (B, C, H, W) tensor: pad once, gather every sample's rows and
    columns with index arithmetic (flipped samples read their columns right to left).
    """
    B, C, H, W = x.shape
    dev = x.device
    dy, dx = torch.as_tensor(dy, device=dev).long(), torch.as_tensor(dx, device=dev).long()
    flip = torch.as_tensor(flip, device=dev).bool()
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x  # (B, C, H + 2p, W + 2p), zeros around
    rows = dy[:, None] + torch.arange(H, device=dev)  # (B, H)
    cols = dx[:, None] + torch.arange(W, device=dev)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    b = torch.arange(B, device=dev)[:, None, None, None]
    c = torch.arange(C, device=dev)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


@dataclass(frozen=True)
class Augment:
    """``data.augment`` resolved for one data set: the kind, the pad in pixels and the seed of the views."""

    kind: str = "none"  # none | crop | crop_flip
    pad: int = 0  # pixels of zero padding (resolved: never 0 for crop / crop_flip)
    seed: int = 0  # with the sample id and view id, defines every view

    @property
    def transform(self) -> str:
        """What the logit cache's fingerprint records: the same string means the same views."""
        return "none" if self.kind == "none" else f"{self.kind} pad={self.pad} seed={self.seed} splitmix64-v1"

    def params(self, ids, views):
        return view_params(ids, views, self.seed, self.pad, flip=self.kind == "crop_flip")

    def __call__(self, x: torch.Tensor, ids, views) -> torch.Tensor:
        """x (B, C, H, W) of samples ``ids`` (B,), each in its view ``views`` (B,); ``none`` returns x."""
        if self.kind == "none":
            return x
        return augment_batch(x, *self.params(ids, views), self.pad)


def make_augment(kind: str, pad: int, seed: int, image_size: int) -> Augment:
    """The ``Augment`` for config values ``data.augment``, ``data.augment_pad`` and ``seed``."""
    if kind not in AUGMENTS:
        raise ConfigError(f"data.augment must be one of {', '.join(AUGMENTS)}, got {kind!r}")
    return Augment(kind, resolve_pad(pad, image_size) if kind != "none" else 0, seed)
