"""The shared TeacherServer actor: correct logits, merged batches, no lost requests."""

import numpy as np
import pytest
import torch

from raydistill.checkpoints import build_from_spec, model_spec
from raydistill.config import ScaleConfig
from raydistill.teacher import get_teacher_server, start_teacher_server

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def server(ray_local):
    spec = model_spec("cnn", {"widths": [8, 16], "hidden": 32}, 10, (1, 8, 8))
    torch.manual_seed(0)
    model = build_from_spec(spec).eval()
    actor = start_teacher_server("teacher-test", spec, model.state_dict(),
                                 ScaleConfig(teacher_cpus=0.5, teacher_batch_window_ms=20.0, teacher_max_batch=4096))
    yield actor, model
    ray_local.kill(actor)


def test_concurrent_requests_get_their_own_logits(server, ray_local):
    actor, model = server
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((n, 1, 8, 8)).astype(np.float32) for n in (3, 7, 1, 16, 5, 9)]
    ray_local.get(actor.reset_stats.remote())
    refs = [actor.logits.remote(x, i % 2) for i, x in enumerate(xs)]  # all in flight at once
    outs = ray_local.get(refs)
    for x, out in zip(xs, outs):
        with torch.inference_mode():
            expected = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    stats = ray_local.get(actor.get_stats.remote())
    assert stats["requests"] == len(xs) and stats["samples"] == sum(len(x) for x in xs)
    assert stats["forward_passes"] < len(xs)  # the 20 ms window merged requests
    assert stats["requests_by_rank"] == {0: 3, 1: 3}


def test_requests_arriving_during_a_forward_are_not_lost(server, ray_local):
    actor, _ = server
    x = np.zeros((64, 1, 8, 8), np.float32)
    # Waves of requests: later ones land while earlier forwards are running in the executor.
    refs = []
    for _ in range(20):
        refs += [actor.logits.remote(x) for _ in range(5)]
    done, pending = ray_local.wait(refs, num_returns=len(refs), timeout=60)
    assert not pending and len(done) == 100


def test_reachable_by_name_and_reused(server, ray_local):
    actor, _ = server
    same = get_teacher_server("teacher-test")
    pid = ray_local.get(actor.pid.remote())
    assert ray_local.get(same.pid.remote()) == pid
    # get_if_exists: no second teacher
    again = start_teacher_server("teacher-test", {}, {}, ScaleConfig(teacher_cpus=0.5, teacher_batch_window_ms=1,
                                                                     teacher_max_batch=1))
    assert ray_local.get(again.pid.remote()) == pid
