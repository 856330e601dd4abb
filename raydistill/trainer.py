"""Run one ``job.StageJob`` on Ray Train: a ``TorchTrainer`` over ``worker.train_fn_per_worker``.

The run is named from the stage and its key, so rerunning the same stage resumes from its last epoch
checkpoint. A user error raised in a worker (a NaN loss, a cache that does not fit) comes back by type
out of Ray Train's wrappers; anything else is re-raised as the bug it is.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

from raydistill.cluster import private_ray, started_locally
from raydistill.console import line, log
from raydistill.errors import first_user_error, message_line
from raydistill.job import StageJob


def fit(job: StageJob, key: str, out: Path):
    """Train ``job`` on Ray Train; returns (final train state, ray.train.Result).

    ``scale.num_workers: 0`` is Ray Train's local mode: the loop runs in this process with the same
    ``ray.train`` API and no worker start-up. Local mode keeps no checkpoints of its own, so the loop keeps its
    epoch checkpoints in ``ray_train/<run name>/local`` and a rerun resumes from the last one, as a multi-worker
    run resumes from Train's storage. With workers, rank 0's epoch lines come back through a queue and are
    printed here, once (workers' own output is shown only with ``--verbose``); a failed worker group restarts
    from its last epoch checkpoint unless the error was bad input (``should_restart``)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    from raydistill.worker import load_train_state, train_fn_per_worker

    # Train V2's controller polls its workers every 2 s by default, and what it collects then is also each
    # worker's last ``ray.train.report``: a worker hands its report over through a queue of one slot
    # (ray/train/v2/_internal/execution/context.py: _wait_then_report), so its next report, one an epoch here,
    # waits for that poll. Epochs were held to the interval (0.51 s apart at 0.5 s, 0.21 s at 0.2 s, in the
    # journals of the default run on 2 workers: 73-75 s at 0.5 s, 55 s at 0.2 s, and no faster at 0.1 s), and every
    # stage ended up to an interval after its last epoch (an empty train function on 2 workers: 5.0 s from its
    # return to fit() returning at 2 s, 1.0 s at 0.25 s). The busy CPU stays the same (the 2-worker smoke run:
    # 75-82 CPU-s at 2, 0.5 and 0.2 s): a poll is one small actor call per worker, and one that has not answered is
    # simply awaited at the next (Train marks a worker dead only after 10 min of that). Train propagates this
    # variable to its controller; a value the user set wins. docs/benchmarks.md, the overhead section.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if started_locally():
        # A Ray this command started is one node, this machine: none of its nodes is ever drained or preempted, so
        # Train's preemption watcher (an actor per multi-worker Train run that polls Ray's drain state every 5 s for
        # ``ray.train.get_preemption_info``, which raydistill does not call) would only cost a process start beside
        # every stage's workers (2.5 s from its start to ready in a Train V2 task timeline on 2 cores). Propagated
        # to the controller like the variable above; a cluster keeps its watcher, and a value the user set wins.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    s = job.config.scale
    name = f"{job.stage}-{key[:12]}"  # deterministic: a rerun resumes from the last epoch checkpoint
    storage = (Path(out) / "ray_train").resolve()
    local = s.num_workers == 0
    progress = None
    if local:
        job = dataclasses.replace(job, checkpoint_dir=str(storage / name / "local"))
    elif job.verbose:
        progress = progress_queue()
        job = dataclasses.replace(job, progress=progress)
    resources = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
    from raydistill.stream import StreamData, ingest_options, train_dataset

    # streamed data: Ray Data reads the train split and Train gives every worker an equal shard of it
    streamed, buffer_mb = isinstance(job.data, StreamData), job.config.data.stream_buffer_mb

    def attempt():
        datasets = {"train": train_dataset(job.data, job.config.seed, buffer_mb=buffer_mb)} if streamed else None
        trainer = lean_trainer_class()(
            train_fn_per_worker,
            train_loop_config=job.to_plain(),
            datasets=datasets,
            dataset_config=DataConfig(execution_options=ingest_options(buffer_mb)) if streamed else None,
            scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu and not local,
                                         resources_per_worker=None if local else resources),
            run_config=RunConfig(
                name=name,
                storage_path=str(storage),
                # no restarts inside Train: fit() itself restarts the stage (below), after it has looked at the error
                failure_config=FailureConfig(max_failures=0),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                logging_config=LoggingConfig(log_level="WARNING"),  # our own per-epoch line is the progress
            ),
        )
        # local mode runs the loop right here: on the main thread Ctrl-C interrupts it at once
        return trainer.fit() if local else off_main_thread(trainer.fit)

    printer = ProgressPrinter(progress) if progress is not None else None
    restarts = 0
    try:
        while True:
            try:
                result = attempt()
                break
            except Exception as e:  # Train V2 raises TrainingFailedError from fit()
                user_error = first_user_error(e)
                if local or not should_restart(e, user_error, restarts, s.max_failures):
                    if user_error is None:
                        raise
                    raise user_error from None
                restarts += 1
                of = "" if s.max_failures == -1 else f" of {s.max_failures}"
                log(f"stage {job.stage}: {failure_summary(e, user_error)}; restarting its workers from the last "
                    f"epoch checkpoint (restart {restarts}{of})", quiet=not job.verbose)
    finally:
        if printer is not None:
            printer.stop()
    if result.error is not None:
        raise first_user_error(result.error) or result.error
    return load_train_state(result.checkpoint), result


@functools.cache
def lean_trainer_class():
    """``TorchTrainer`` less two of the helper actors Ray Train V2 starts beside every multi-worker run (each a
    process of its own) where they have nothing to do (``unused_train_callback``)."""
    from ray.train.torch import TorchTrainer

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            private = private_ray()
            return [c for c in callbacks if not unused_train_callback(c, bool(self.datasets), private)]

    return LeanTorchTrainer


def unused_train_callback(callback, has_datasets: bool, private: bool) -> bool:
    """Whether a default callback of Ray Train V2's ``TorchTrainer`` would only start an actor with nothing to do:
    - ``DatasetsCallback`` when the stage has no Ray Datasets (in-memory data): it starts a ``DatasetManager``
      actor for every worker group anyway, which serves only the datasets given to the trainer.
    - ``PlacementGroupCleanerCallback`` on a private local Ray (``cluster.private_ray``): its detached actor
      removes the stage's placement group if the controller dies without doing so, and polls Ray's State API for
      that (so the Ray needs its dashboard); a private Ray ends with the command, and its placement groups with it,
      and a controller that died fails the command (``should_restart``). A cluster keeps its cleaner.
    Measured on 2 cores (an empty 2-worker ``fit``, 3 in a row, twice): 20.4-24.6 busy CPU-s and 12.0-16.8 s
    with both and the dashboard, 15.1-18.1 CPU-s and 9.3-12.5 s without. Why by private interface
    (``_create_default_callbacks``, matched by class name): Train has no option for either. A Ray whose names
    differ just keeps both actors, as before."""
    name = type(callback).__name__
    return (name == "DatasetsCallback" and not has_datasets) or (name == "PlacementGroupCleanerCallback" and private)


def should_restart(error: BaseException, user_error, restarts: int, max_failures: int) -> bool:
    """Whether a multi-worker stage that failed with ``error`` starts again from its last epoch checkpoint.

    Why raydistill decides and not Ray Train: Train's ``FailureConfig(max_failures=N)`` restarts the worker group
    N times whatever the error, so a NaN loss from the learning rate, an image that does not decode or a wrong
    key cost N more worker-group start-ups and N more tries (measured: two restarts of ~13 s each on 2 cores for a
    2-worker teacher at lr 1e30, before the one-line error) that fail the same way. Train has no public hook to
    tell errors apart (its failure policy is internal), so each stage runs with ``max_failures=0`` and this
    decides: a worker that died or raised anything but a raydistill ``UserError`` (a bug may be a one-off, an
    out-of-memory kill, a lost node) or a ``transient`` one (the teacher actor was gone) is restarted up to
    ``scale.max_failures`` times (-1: always); bad input is raised at once. Only a ``WorkerGroupError`` (the
    workers' failure) restarts: an error of Train's controller is not the workers' and Train already retries its
    start-up failures itself."""
    from ray.train import WorkerGroupError

    if not isinstance(error, WorkerGroupError):
        return False
    if user_error is not None and not user_error.transient:
        return False
    return max_failures == -1 or restarts < max_failures


def failure_summary(error: BaseException, user_error) -> str:
    """What failed, in a few words, for the restart line: the transient user error's message, or which worker
    ranks failed and with what (``rank 0: ActorDiedError``)."""
    if user_error is not None:
        return message_line(user_error)
    failures = getattr(error, "worker_failures", None) or {}
    parts = []
    for rank, failure in sorted(failures.items()):
        cause = getattr(failure, "cause", None)  # a RayTaskError: the exception the worker raised
        parts.append(f"rank {rank}: {type(cause if isinstance(cause, BaseException) else failure).__name__}")
    return "Train worker failed (" + (", ".join(parts) or type(error).__name__) + ")"


_progress: tuple[str, Any] | None = None  # (the Ray job id it belongs to, the queue)
_progress_lock = threading.Lock()  # the teacher and the baseline stage start side by side


def progress_queue():
    """The queue that rank 0 of a multi-worker stage puts its epoch lines on: one ``ray.util.queue.Queue`` (an actor)
    per command, shared by its stages, one after the other. One per stage cost a process start each (~1 CPU-s on 2
    cores, measured with the per-process CPU of a 2-worker run: four ``_QueueActor`` processes of 0.8-1.2 CPU-s).
    The actor belongs to this driver's Ray job and ends with it; a new connection (a script calling
    ``raydistill.run`` again after ``ray.shutdown()``) gets a new one."""
    global _progress
    import ray
    from ray.util.queue import Queue

    job_id = ray.get_runtime_context().get_job_id()
    with _progress_lock:
        if _progress is None or _progress[0] != job_id:
            _progress = (job_id, Queue(maxsize=10_000, actor_options={"num_cpus": 0}))
        return _progress[1]


class ProgressPrinter:
    """Prints the epoch lines rank 0 puts on ``queue`` while a multi-worker stage runs (a driver thread). The queue
    outlives the stage (``progress_queue``): ``stop`` prints what is left on it, so the next stage starts empty."""

    def __init__(self, queue):
        self.queue, self.done = queue, threading.Event()
        self.thread = threading.Thread(target=self._run, name="raydistill-progress", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from ray.util.queue import Empty

        while not self.done.is_set():
            try:
                line(self.queue.get(timeout=0.5))
            except Empty:
                continue
            except Exception:  # Ray shutting down (Ctrl-C): the stage is over anyway
                return

    def stop(self) -> None:
        from ray.util.queue import Empty

        self.done.set()
        self.thread.join(timeout=5)
        try:
            while True:  # what arrived after the last poll
                line(self.queue.get_nowait())
        except Empty:
            pass
        except Exception:  # Ray shutting down (Ctrl-C)
            pass


def off_main_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a helper thread while the main thread waits.

    Why: called on the main thread, TorchTrainer.fit installs its own SIGINT handler, which aborts
    only that trainer and is never removed, so Ctrl-C during a later stage (or while the baseline
    runs beside the teacher) would be swallowed. From a helper thread it installs none, and Ctrl-C
    raises KeyboardInterrupt in the main thread; the CLI then ends the process with status 130
    (``cli.exit_at_once``), and Ray ends this driver's Train runs.
    """
    if threading.current_thread() is not threading.main_thread():
        return fn()
    return in_background(fn).result()


def in_background(fn: Callable[..., Any], *args: Any) -> Future:
    """``fn(*args)`` in a daemon thread; its result or exception arrives in the returned Future.

    Why a daemon thread and not a ThreadPoolExecutor: on Ctrl-C ``main(argv)`` called in a process of its own (a
    test's) disconnects from Ray (``ray.shutdown``) while this thread may still be blocked in Train's ``ray.get`` on
    its controller, and that get does not always return once the core worker is gone (seen here, when the command
    did the same: the driver printed "interrupted" and then never exited).
    Python joins every ThreadPoolExecutor thread at exit (and ``with ThreadPoolExecutor()`` joins it as soon as
    KeyboardInterrupt leaves the block), so the command would hang instead of exiting 130; a daemon thread is
    not waited for."""
    future: Future = Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args)
        except BaseException as e:  # handed to whoever waits on the future, as ThreadPoolExecutor does
            future.set_exception(e)
        else:
            future.set_result(result)

    threading.Thread(target=target, name=f"raydistill-{getattr(fn, '__name__', 'stage')}", daemon=True).start()
    return future
