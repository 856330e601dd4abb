"""Fixtures for both tiers.

tests/unit/ never asks for ``ray_local``: it runs without Ray. tests/integration/ shares one real local Ray
for the whole session (``ray_local``); the job-submission and fault tests start their own Ray heads and
``raydistill`` processes, which never join this one (a Ray started by ``ray.init`` writes no
``ray_current_cluster`` file).
"""

import os

import pytest
from smoke import SMOKE, train_smoke_teacher

# One OpenMP thread per process: the suite runs two pytest workers on 2 cores, and every test process that does
# torch work in its own default of 2 threads (the unit tier's in-process training, evaluation and export) left a
# second thread spinning for work beside the other worker's. Measured on the 2-core test machine (2026-12-05,
# `pytest tests/unit` 3 times each way, alternately): 79-80 busy CPU-s and 42 s with it against 93-100 CPU-s and
# 49-53 s without. (In the whole suite the pytest workers had been on one thread anyway after their first
# in-process run, whose training loop left its setting behind; since 20be794 the loop gives the caller's back, and
# this keeps them on one.) Set before any test module imports torch (OpenMP reads it once, at load); children (the
# commands the tests start, their Ray workers) inherit it. A value the caller set wins. raydistill's own training
# loop pins its threads itself (``scale.torch_threads``, default 1), so what the tests check does not change.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The integration files by wall time, longest first (one process, quiet 2-core machine, 2026-12-01, seconds):
# with two pytest workers (pyproject's addopts) these start first and the short files fill in around them, so
# neither worker ends with a long file alone. Only the order of files changes; an unlisted file goes after them.
LONGEST_FIRST = [
    "test_jobs.py",  # 110
    "test_streaming.py",  # 105
    "test_faults.py",  # 94
    "test_shared_cluster.py",  # 85
    "test_sweep.py",  # 77
    "test_local_mode.py",  # 51
    "test_teacher_modes.py",  # 20
]


def pytest_collection_modifyitems(session, config, items):
    """Under pytest-xdist, the long Ray files first (LONGEST_FIRST), then everything else in collection order
    (the fast tier first). In one process the order is left as collected: the fast tier first."""
    if config.getoption("dist", "no") == "no" and not hasattr(config, "workerinput"):
        return
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session, started the way `raydistill run` starts it; shut down at the end."""
    import ray

    from raydistill.cluster import init_ray

    init_ray(None, quiet=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """A teacher.pt for the smoke data (a CNN with SMOKE's teacher kwargs), trained here with plain torch for one
    epoch. Ray tests that are not about training the teacher pass it as ``teacher.checkpoint`` and skip a Ray Train
    start-up (~20 s each on 2 cores)."""
    return train_smoke_teacher(tmp_path_factory.mktemp("tiny_teacher") / "teacher.pt", "cnn", SMOKE["teacher.kwargs"],
                               seed=0, meta={"stage": "teacher", "trained_by": "tests/conftest.py"})
