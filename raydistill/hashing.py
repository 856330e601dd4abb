"""Seeded integer hashing on numpy arrays (splitmix64), shared by the augmentation's per-sample views and the
streamed data's split carving. Kept free of torch: Ray Data's read tasks import it to carve splits, and a worker
process that imported torch only for this would pay seconds of start-up on every fresh worker."""

from __future__ import annotations

import numpy as np

_M64 = [np.uint64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)]


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on uint64 arrays (wrap-around arithmetic, as in the C original)."""
    z = z + _M64[0]
    z = (z ^ (z >> np.uint64(30))) * _M64[1]
    z = (z ^ (z >> np.uint64(27))) * _M64[2]
    return z ^ (z >> np.uint64(31))


def hash_ints(*parts) -> np.ndarray:
    """uint64 hash of integer arrays/scalars broadcast together: chained splitmix64 over the parts."""
    arrays = np.broadcast_arrays(*[np.atleast_1d(np.asarray(p)).astype(np.int64).view(np.uint64) for p in parts])
    h = np.zeros(arrays[0].shape, np.uint64)
    for a in arrays:
        h = _splitmix64(h ^ a)
    return h
