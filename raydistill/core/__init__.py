"""Plain-torch core of raydistill: KD losses, pruning, model surgery, metrics.

Nothing in this package imports Ray (tests/unit/core/test_no_ray.py proves it), so every
function here can be unit-tested, reused, or called from any training loop.
"""
