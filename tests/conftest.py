import pytest

# Smoke settings shared by the Ray integration tests: tiny data, one epoch per stage.
SMOKE = {
    "data.limit": 200, "teacher.epochs": 1, "distill.epochs": 1, "prune.epochs": 1,
    "prune.finetune_epochs": 1, "teacher.kwargs": {"widths": [16, 32], "hidden": 64},
}


@pytest.fixture(scope="module")
def ray_local():
    """One real local Ray per test module (Ray tests share it), shut down afterwards."""
    import ray

    from raydistill.pipeline import init_ray

    init_ray(None, quiet=True)
    yield ray
    ray.shutdown()
