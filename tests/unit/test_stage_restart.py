"""Which failures restart a multi-worker stage (raydistill/trainer.py: ``should_restart``): a worker that died or
raised something that may not recur does, up to ``scale.max_failures`` times; bad input never does. Built from
Ray Train's real exception types, without starting Ray."""

import pytest
from ray.exceptions import ActorDiedError
from ray.train import ControllerError, WorkerGroupError

from raydistill.errors import DataError, NonFiniteLossError, TeacherUnavailableError, first_user_error
from raydistill.trainer import failure_summary, should_restart


def _group(*failures: Exception) -> WorkerGroupError:
    return WorkerGroupError("rank errors", dict(enumerate(failures)))


@pytest.mark.parametrize("error, restarts", [
    (_group(ActorDiedError()), True),  # a worker killed (a node lost, OOM): the next try can succeed
    (_group(RuntimeError("gloo: connection reset"), ActorDiedError()), True),
    (_group(TeacherUnavailableError("the teacher actor 'x' of this run is gone")), True),  # transient
    (_group(NonFiniteLossError("loss became nan at step 1"), RuntimeError("gloo: connection reset")), False),
    (_group(DataError("cannot decode image with id 3")), False),
    (ControllerError(RuntimeError("placement group removed")), False),  # not the workers' failure
])
def test_bad_input_never_restarts_a_stage(error, restarts):
    assert should_restart(error, first_user_error(error), 0, 2) is restarts


def test_restarts_stop_at_max_failures_and_minus_one_means_always():
    died = _group(ActorDiedError())
    assert [should_restart(died, None, n, 2) for n in range(4)] == [True, True, False, False]
    assert should_restart(died, None, 0, 0) is False
    assert should_restart(died, None, 1000, -1) is True


def test_the_restart_line_says_what_failed():
    assert failure_summary(_group(ActorDiedError(), RuntimeError("x")), None) == \
        "Train worker failed (rank 0: ActorDiedError, rank 1: RuntimeError)"
    gone = TeacherUnavailableError("the teacher actor 'x' of this run is gone (dead)\nmore")
    assert failure_summary(_group(gone), gone) == "the teacher actor 'x' of this run is gone (dead)"
    silent = TeacherUnavailableError()  # no message: the restart line names the error's type instead of failing
    assert failure_summary(_group(silent), silent) == "TeacherUnavailableError"


@pytest.mark.parametrize("datasets, private, left_out", [
    (None, True, {"DatasetsCallback", "PlacementGroupCleanerCallback"}),  # the laptop's 2-worker run
    (None, False, {"DatasetsCallback"}),  # a cluster keeps its placement-group cleaner
    ({"train": lambda: None}, True, {"PlacementGroupCleanerCallback"}),  # streamed data keeps the dataset manager
    ({"train": lambda: None}, False, set()),
])
def test_a_multi_worker_stage_starts_no_train_helper_actor_it_does_not_use(datasets, private, left_out, monkeypatch):
    """Ray Train V2's default callbacks, less the ones that would only start an idle actor (trainer.py:
    ``unused_train_callback``). Read from Ray's own trainer, so a Ray whose callbacks change fails here first."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydistill import trainer

    monkeypatch.setattr(trainer, "private_ray", lambda: private)
    kwargs = {"datasets": datasets, "scaling_config": ScalingConfig(num_workers=2)}
    ray_defaults = {type(c).__name__ for c in TorchTrainer(lambda: None, **kwargs)._create_default_callbacks()}
    lean = {type(c).__name__ for c in trainer.lean_trainer_class()(lambda: None, **kwargs)._create_default_callbacks()}
    assert {"DatasetsCallback", "PlacementGroupCleanerCallback"} <= ray_defaults  # what there is to leave out
    assert ray_defaults - lean == left_out
