"""Which private local Rays start Ray's dashboard (raydistill/pipeline.py: ``open_run``; ``cluster.init_ray``): a
sweep's (Ray Tune needs its State API) and a ``--verbose`` command's; ``run`` and ``cache-logits`` otherwise start
theirs without it, its largest part that nothing they do uses. Ray's start is replaced by a recorder: no Ray starts,
and a Ray that this pytest process already runs (an integration test's, before these) is hidden from the code."""

from concurrent.futures import Future

import pytest

from raydistill import cluster, config, pipeline


@pytest.mark.parametrize("sweep, verbose, dashboard", [(False, False, False), (False, True, True),
                                                       (True, False, True)])
def test_a_private_ray_starts_the_dashboard_for_a_sweep_or_verbose_only(sweep, verbose, dashboard, tmp_path,
                                                                       monkeypatch):
    started = []

    def record(address, quiet, verbose, dashboard):  # the pipeline's own start of a private Ray beside the teacher
        started.append((address, dashboard))
        future = Future()
        future.set_result(0.0)
        return future

    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(pipeline, "init_ray_in_background", record)
    cfg = config.load(None, {"data.limit": 100})
    ctx = pipeline.open_run(cfg, tmp_path / "run", None, quiet=True, uses_cache=False, verbose=verbose,
                            run_stages=not sweep, sweep=sweep)
    assert ctx.cfg.scale.num_workers == 0 and started == [(None, dashboard)]


@pytest.mark.parametrize("dashboard", [False, True])
def test_init_ray_hands_the_choice_to_a_private_rays_start(dashboard, monkeypatch):
    import ray

    asked = []

    def init(**kwargs):
        asked.append(kwargs)
        raise KeyboardInterrupt  # stop here: what Ray was asked is what is checked

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster, "_started_locally", cluster._started_locally)  # put back afterwards
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(KeyboardInterrupt):
        cluster.init_ray(None, quiet=True, dashboard=dashboard)
    assert asked[0]["address"] == "local" and asked[0]["include_dashboard"] is dashboard
