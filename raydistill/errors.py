"""The one family of user errors.

Everything the user can fix (the config, the data, a model factory, a checkpoint, a cache, the
cluster, the run folder, a learning rate that makes the loss NaN) raises a subclass of
``UserError`` whose message names the problem and the fix. The CLI turns exactly these into a
one-line message with exit status 2. Any other exception is a bug in raydistill (or in torch, Ray,
...): the CLI shows its traceback and exits 1.

``UserError`` stays a ``ValueError`` so that code catching ``ValueError`` around a bad argument
keeps working; the reverse is not true: a plain ``ValueError`` is never taken for a user error.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input; the message names it and says how to fix it.

    ``transient`` says whether the same step can succeed when retried with nothing changed. A user error is not,
    by default: a NaN loss from the learning rate, a bad image or a wrong key recurs on every try, so a
    multi-worker stage fails at once instead of restarting its workers ``scale.max_failures`` times first."""

    transient = False


class ConfigError(UserError):
    """A configuration key has a bad value; the message names the key and the fix."""


class DataError(UserError):
    """The data cannot be read or does not fit the config (missing files, bad labels, NaN samples)."""


class ModelError(UserError):
    """A model cannot be built, called or exported as configured (unknown name, bad kwargs, wrong output)."""


class CheckpointError(UserError):
    """A checkpoint file is missing, corrupt, or does not fit this run."""


class CacheError(UserError):
    """A logit cache is missing, corrupt, or was built for another teacher, data, k or views."""


class IntegrityError(UserError):
    """A run artifact does not match its manifest (changed, missing, or unsigned)."""


class ClusterError(UserError):
    """The Ray cluster cannot do what the config asks (unreachable, missing resources)."""


class RunFolderError(UserError):
    """The output folder holds results of a different config."""


class TrainingError(UserError):
    """Training stopped on a problem the user can fix; the message says which."""


class TeacherUnavailableError(TrainingError):
    """A worker cannot reach its run's TeacherServer actor (it was stopped or ran out of restarts).

    Raised in the worker instead of Ray's lookup error: the stage restarts its workers from the last checkpoint
    (``scale.max_failures``), by which time a restarted actor answers again; if the actor stays gone, the driver
    gets this by type and the CLI prints one line."""

    transient = True


class NonFiniteLossError(TrainingError):
    """Training produced NaN/inf; the message names the step and the probable cause.

    Raised inside a Ray Train worker; it reaches the driver by type (Train keeps the worker's
    exception in ``WorkerGroupError.worker_failures``), see ``first_user_error``."""


def message_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type's name when the message is empty: how an error is shown
    in one line (the CLI's error line, a failed trial's line, a stage's restart line)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def first_user_error(error: BaseException | None) -> UserError | None:
    """The first ``UserError`` in ``error``'s chain of causes, including the per-worker failures
    Ray Train and Ray Tasks wrap it in; None when the chain holds none (then it is a bug)."""
    seen, stack = set(), [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            cause = getattr(e, "cause", None)  # a RayTaskError subclassing the error: its cause reads cleanly
            return cause if isinstance(cause, UserError) else e
        failures = getattr(e, "worker_failures", None)  # ray.train.WorkerGroupError: {rank: exception}
        if isinstance(failures, dict):
            stack += list(failures.values())
        # RayTaskError.cause, ControllerError.controller_failure, and the usual Python chain
        stack += [getattr(e, "cause", None), getattr(e, "controller_failure", None), e.__cause__, e.__context__]
    return None
