"""Fixtures for both tiers.

tests/unit/ never asks for ``ray_local``: it runs without Ray. tests/integration/ shares one real local Ray
for the whole session (``ray_local``); the job-submission and fault tests start their own Ray heads and
``raydistill`` processes, which never join this one (a Ray started by ``ray.init`` writes no
``ray_current_cluster`` file).
"""

import pytest
from smoke import SMOKE, train_smoke_teacher


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
