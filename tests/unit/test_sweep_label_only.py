"""A sweep keeps its label-only points: ASHA stops a poor trial early, but never a label-only one."""

from types import SimpleNamespace

from raydistill.sweep import asha_keeping_label_only, is_label_only


def test_asha_never_stops_a_label_only_trial():
    from ray.tune.schedulers import TrialScheduler

    sched = asha_keeping_label_only(max_t=8, grace_period=1)
    trials = {name: SimpleNamespace(trial_id=name, config=config) for name, config in [
        ("good", {"distill.alpha": 0.5}), ("poor", {"distill.alpha": 0.9}),
        ("plain", {"distill.alpha": 0.0, "distill.beta": 0.0})]}
    for t in trials.values():
        sched.on_trial_add(None, t)
    for _ in range(3):  # the good trial sets the rung's cut-off high
        assert sched.on_trial_result(None, trials["good"], {"training_iteration": 1, "val_acc": 0.9}) == "CONTINUE"
    poor = sched.on_trial_result(None, trials["poor"], {"training_iteration": 1, "val_acc": 0.1})
    plain = sched.on_trial_result(None, trials["plain"], {"training_iteration": 1, "val_acc": 0.1})
    assert poor == TrialScheduler.STOP and plain == TrialScheduler.CONTINUE
    assert is_label_only({"distill.alpha": 0.0}) and not is_label_only({"distill.alpha": 0.0, "distill.beta": 1.0})
