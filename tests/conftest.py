"""Fixtures for both tiers.

tests/unit/ never asks for ``ray_local``: it runs without Ray. tests/integration/ shares one real local Ray
for the whole session (``ray_local``); the job-submission and fault tests start their own Ray heads and
``raydistill`` processes, which never join this one (a Ray started by ``ray.init`` writes no
``ray_current_cluster`` file).
"""

import pytest
from smoke import SMOKE


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
    """A teacher.pt for the smoke data (digits 8×8, 10 classes, SMOKE's teacher kwargs), trained here with plain
    torch for one epoch. Ray tests that are not about training the teacher pass it as ``teacher.checkpoint`` and
    skip a Ray Train start-up (~20 s each on 2 cores)."""
    import torch
    import torch.nn.functional as F

    from raydistill.checkpoints import build_from_spec, model_spec, save_model
    from raydistill.data import load_splits

    torch.manual_seed(0)
    splits = load_splits("digits", limit=SMOKE["data.limit"])
    spec = model_spec("cnn", SMOKE["teacher.kwargs"], splits.num_classes, (1, 8, 8))
    model = build_from_spec(spec)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(splits.train.x), torch.from_numpy(splits.train.y)
    for i in range(0, len(x), 32):
        opt.zero_grad()
        F.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
        opt.step()
    path = tmp_path_factory.mktemp("tiny_teacher") / "teacher.pt"
    save_model(path, model.eval(), spec, {"stage": "teacher", "trained_by": "tests/conftest.py"})
    return str(path)
