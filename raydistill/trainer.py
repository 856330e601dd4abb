"""Run one ``job.StageJob`` on Ray Train: a ``TorchTrainer`` over ``worker.train_fn_per_worker``.

The run is named from the stage and its key, so rerunning the same stage resumes from its last epoch
checkpoint. A user error raised in a worker (a NaN loss, a cache that does not fit) comes back by type
out of Ray Train's wrappers; anything else is re-raised as the bug it is.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable

from raydistill.errors import first_user_error
from raydistill.job import StageJob


def fit(job: StageJob, key: str, out: Path):
    """Train ``job`` with ``job.config.scale`` workers; returns (final train state, ray.train.Result)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydistill.worker import load_train_state, train_fn_per_worker

    # Train V2's controller polls its workers every 2 s by default, so every stage ended up to 2 s after
    # its last epoch and paid more polls on the way in (measured with an empty train function on 2 workers:
    # 5.0 s from the train function's return to fit() returning at 2 s, 1.0 s at 0.25 s). Train propagates
    # this variable to its controller; a value the user set wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    s = job.config.scale
    resources = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config=job.to_plain(),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"{job.stage}-{key[:12]}",  # deterministic: a rerun resumes from the last epoch checkpoint
            storage_path=str((Path(out) / "ray_train").resolve()),
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),  # our own per-epoch line is the progress
        ),
    )
    try:
        result = off_main_thread(trainer.fit)
    except Exception as e:  # Train V2 raises TrainingFailedError from fit()
        user_error = first_user_error(e)
        if user_error is None:
            raise
        raise user_error from None
    if result.error is not None:
        raise first_user_error(result.error) or result.error
    return load_train_state(result.checkpoint), result


def off_main_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a helper thread while the main thread waits.

    Why: called on the main thread, TorchTrainer.fit installs its own SIGINT handler, which aborts
    only that trainer and is never removed, so Ctrl-C during a later stage (or while the baseline
    runs beside the teacher) would be swallowed. From a helper thread it installs none, and Ctrl-C
    raises KeyboardInterrupt in the main thread; the CLI then disconnects from Ray, which ends this
    driver's Train runs, and exits 130.
    """
    if threading.current_thread() is not threading.main_thread():
        return fn()
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raydistill-fit")
    try:
        return pool.submit(fn).result()
    finally:
        pool.shutdown(wait=False)
