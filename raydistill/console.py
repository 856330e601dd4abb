"""What a person reads while a command runs: one line per event, prefixed ``[raydistill]``.

By default the console shows raydistill's own lines (a line per stage event, one line per epoch from rank 0)
and the result. Ray's INFO logs, its workers' forwarded output (Train's "Reporting training result" lines),
Ray Data progress bars and warnings nobody can act on are hidden; ``--verbose`` shows all of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from raydistill.redact import redact

# Library log lines that say nothing a user can act on (seen in a default run); hidden unless --verbose.
_NOISE = {
    "torch.utils._pytree": "is an Enum subclass and is now natively supported by torch.compile",  # torchao import
    # the end of a sweep with a failed trial: each failure already had its line, with its error (sweep.trial_lines)
    "ray.tune.tune": "Trials did not complete",
}


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_libraries(verbose: bool) -> None:
    """Hide Ray's and torch's chatter from the console (idempotent); ``verbose`` keeps everything."""
    global _VERBOSE
    _VERBOSE = verbose
    if verbose:
        return
    for name, text in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))
    # Ray Train's local mode logs every report ("Reported metrics: ...") and a notice that it is in local mode; Tune
    # where its results went (a sweep's own line says it). Raydistill's own Ray sets Ray's loggers to ERROR; a
    # script's own ray.init() leaves them at INFO
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    try:
        from ray.data import DataContext  # first: importing ray.data (re)configures the "ray.data" logger

        DataContext.get_current().enable_progress_bars = False  # the logit cache build shows one line instead
    except ImportError:  # pragma: no cover - ray[data] is a dependency
        pass
    # Ray Data logs the start, plan and end of every execution: once per epoch with streamed data; and warns that
    # the progress bars we just turned off are off
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Ray Data logs an error a step raised, with its traceback, three times before it reaches us; for bad input
    # (a raydistill UserError: an image that does not decode) the command's one line says it all (its log file
    # keeps them)
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) and not any(
                isinstance(f, _DropUserErrors) for f in handler.filters):
            handler.addFilter(_DropUserErrors())
    # a race inside Ray Tune's own experiment snapshots, logged as an ERROR with its traceback (_DropSnapshotRace)
    state_log = logging.getLogger("ray.tune.execution.experiment_state")
    if not any(isinstance(f, _DropSnapshotRace) for f in state_log.filters):
        state_log.addFilter(_DropSnapshotRace())
    _drop_raylet_startup_warning()
    _drop_forwarded_train_noise()


class _DropSnapshotRace(logging.Filter):
    """Drops Tune's ERROR (with a traceback) for a race in its own experiment snapshots: it copies the snapshot
    folder to storage in the background while the next snapshot writes a searcher state file under a temporary name
    and renames it (``_atomic_save``), so the copy finds the temporary file gone ("FileNotFoundError: Failed to
    open local file '.../.<uuid>-tmp-basic-variant-state-....json'"; ray-project/ray#60556 made the names unique,
    not the copy safe). Tune starts a new copy of the whole folder right after, and the last one, after the last
    snapshot, has nothing writing beside it. Seen once in a 2-trial sweep in the suite (2026-12-04). Any other
    failure to save the state is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return _VERBOSE or not (record.getMessage().startswith("Saving experiment state to storage")
                                and isinstance(error, FileNotFoundError) and "-tmp-" in str(error))


class _DropUserErrors(logging.Filter):
    """Drops a record about a raydistill UserError: its own exception, or the one being handled as it is logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        from raydistill.errors import first_user_error

        error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return _VERBOSE or error is None or first_user_error(error) is None


# The raylet's "N PYTHON worker processes have been started ... 4x the maximum expected startup concurrency"
# warning: every multi-worker stage on a 2-core machine triggers it (Train's controller, workers and helper actors
# start together), and the user can do nothing about it. Ray prints it from the driver's error-message thread
# through ``ray._private.worker.print_to_stdstream``, not through a logger, so that function is wrapped to drop
# this one message (Ray has no public switch for it). If Ray renames the function, nothing is dropped.
_RAYLET_STARTUP_WARNING = "PYTHON worker processes have been started"


# The raylet's message when a worker process dies ("A worker died or was killed while executing a task by an
# unexpected system error. To troubleshoot ... Worker PID: 6205 Worker exit type: SYSTEM_ERROR ..."): ~900
# characters a death, in Ray's colours, and nothing in it that a user acts on beyond which process died and how. It
# becomes one line (``worker_death_line``); what happens next has a line of its own (a Train stage's restart, see
# trainer.fit) or is Ray's (an actor's restart, a task's retry). --verbose shows Ray's message.
_RAYLET_WORKER_DEATH = "A worker died or was killed while executing a task"


def worker_death_line(text: str) -> str | None:
    """One console line for the raylet's worker-death message ``text`` (None for any other message)."""
    import re

    if _RAYLET_WORKER_DEATH not in text:
        return None
    pid = re.search(r"Worker PID: (\d+)", text)
    kind = re.search(r"Worker exit type: (\w+)", text)
    how = {"SYSTEM_ERROR": "killed, out of memory or crashed", "NODE_OUT_OF_MEMORY": "out of memory"}.get(
        kind.group(1) if kind else "", "exited unexpectedly")
    return (f"Ray: worker process {pid.group(1) if pid else '?'} died ({how}"
            f"{'; ' + kind.group(1) if kind else ''}); --verbose shows Ray's message")


def _drop_raylet_startup_warning() -> None:
    try:
        from ray._private import worker as ray_worker
    except ImportError:  # pragma: no cover - ray is a dependency
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_raydistill_filtered", False):
        return

    def print_to_stdstream(data, *args, **kwargs):
        if not _VERBOSE and data.get("pid") == "raylet":
            lines = data.get("lines", ())
            if any(_RAYLET_STARTUP_WARNING in line for line in lines):
                return None
            deaths = [worker_death_line(line) for line in lines]
            if deaths and all(deaths):
                for death in deaths:
                    log(death)
                return None
        return original(data, *args, **kwargs)

    print_to_stdstream._raydistill_filtered = True
    ray_worker.print_to_stdstream = print_to_stdstream


# What Ray's workers print that a script's own ``ray.init()`` forwards to its console (log_to_driver: raydistill's
# own Ray never forwards it unless --verbose): every Train report of every worker ("Reporting training result N:
# TrainingReport(checkpoint=..., metrics={...})", logged by a Ray Train logger named by its file path, so no logger
# name reaches it) and the core worker's notice for Train's PreemptionWatcher actor ("... has constructor arguments
# in the object store and max_restarts > 0"), one per stage; and a Tune trial's line for every epoch's checkpoint.
# Seen in a script's run on 2 workers: 3 such lines a stage; in its 2-trial sweep: one a trial epoch. Dropped
# from the forwarded output from raydistill's first call in the process on, unless that call is verbose; the rest
# of the workers' output is shown.
_FORWARDED_NOISE = ("Reporting training result ", "has constructor arguments in the object store and max_restarts > 0",
                    "Checkpoint successfully created at: ")  # the last: every epoch of every Tune trial


def _drop_forwarded_train_noise() -> None:
    """Wrap the handler through which a driver with ``log_to_driver`` prints its workers' output (Ray's
    ``global_worker_stdstream_dispatcher``, internal: Ray has no public filter) so that ``_FORWARDED_NOISE`` lines
    are dropped unless verbose. Nothing to do when Ray forwards nothing (raydistill's own Ray) or is not up."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover - if Ray moves it, nothing is dropped
        return
    with dispatcher._lock:
        for i, (name, handler) in enumerate(dispatcher.handlers):
            if name != "ray_print_logs" or getattr(handler, "_raydistill_filtered", False):
                continue

            def filtered(data, _handler=handler):
                lines = data.get("lines") or []
                kept = lines if _VERBOSE else [line for line in lines if not any(n in line for n in _FORWARDED_NOISE)]
                if len(kept) < len(lines):
                    if not kept:
                        return None
                    data = {**data, "lines": kept}
                return _handler(data)

            filtered._raydistill_filtered = True
            dispatcher.handlers[i] = (name, filtered)


_VERBOSE = False


@contextlib.contextmanager
def native_stderr_muted():
    """Mute what native code (Ray's C++ core worker) writes to stderr during a short call, unless --verbose.
    Python's own stderr is flushed first and restored after; nothing else should write in that window."""
    if _VERBOSE:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def log(msg: str, quiet: bool = False) -> None:
    """One ``[raydistill]`` line (written in one call, so lines from two threads never interleave)."""
    if not quiet:
        sys.stdout.write(f"[raydistill] {redact(msg)}\n")
        sys.stdout.flush()


def line(text: str) -> None:
    """A progress line as is (one epoch of one stage)."""
    sys.stdout.write(redact(text) + "\n")
    sys.stdout.flush()
