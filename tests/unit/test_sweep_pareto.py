"""The sweep's pure parts: the Pareto front and the label-only search points (no Ray)."""

import random

from raydistill import config
from raydistill.sweep import label_only_points, pareto_front


def test_pareto_front_matches_brute_force():

    rng = random.Random(0)
    pts = [{"accuracy": rng.choice([0.5, 0.6, 0.7, 0.8]), "macs": rng.choice([10, 20, 30, 40])} for _ in range(40)]
    front = set(pareto_front(pts, "accuracy", "macs"))
    for i, p in enumerate(pts):
        beaten = any(q["accuracy"] >= p["accuracy"] and q["macs"] <= p["macs"] and q != p for q in pts)
        assert (i in front) == (not beaten)


def test_label_only_points_cover_every_pruning_ratio():
    cfg = config.load(None, {"tune.space": {"prune.ratio": {"choice": [0.25, 0.4, 0.5]},
                                            "distill.alpha": {"choice": [0.0, 0.5]},
                                            "distill.lr": {"loguniform": [0.001, 0.01]}}})
    points = label_only_points(cfg)
    assert [p["prune.ratio"] for p in points] == [0.4, 0.25, 0.5]  # the base ratio first
    assert all(p["distill.alpha"] == 0.0 and p["distill.lr"] == cfg.distill.lr for p in points)
    uniform = config.load(None, {"tune.space": {"prune.ratio": {"uniform": [0.2, 0.6]},
                                                "distill.alpha": {"choice": [0.0, 0.5]}}})
    assert label_only_points(uniform) == [{"prune.ratio": 0.4, "distill.alpha": 0.0}]


def test_a_failed_trial_is_named_by_the_error_it_raised():
    """results.csv and the console's trial line give the trial's own exception, not the first line of Ray's
    wrapper ("ray::ImplicitFunc.train() (pid=..., ...)"), which is all they gave before."""
    from ray.exceptions import RayTaskError

    from raydistill.errors import TrainingError
    from raydistill.sweep import error_line, is_bad_input

    def raised(cause):  # what Tune keeps for a trial whose function raised ``cause`` (real Ray classes)
        try:
            raise cause
        except Exception as e:
            import traceback

            wrapper = RayTaskError("ImplicitFunc.train", traceback.format_exc(), e, proctitle="ray::ImplicitFunc.train",
                                   pid=123, ip="127.0.0.1")
            return wrapper.as_instanceof_cause()

    missing = raised(FileNotFoundError("train.parquet"))
    assert "pid=123" in str(missing).splitlines()[0]  # what the first line is: Ray's wrapper
    assert error_line(missing) == "FileNotFoundError: train.parquet"
    nan = TrainingError("loss became nan at step 3 (phase distill); lower the lr")
    assert error_line(raised(nan)) == str(nan)  # raydistill's own errors: their one line, as the CLI prints them
    # an exception Tune could not pickle is kept as its text: the traceback's last line names it
    text = f"Failure # 1 (occurred at 2026-12-03_02-36-36)\n{missing}\n"
    assert error_line(text) == "FileNotFoundError: train.parquet"
    # a raydistill error is bad input (a sweep whose every trial stopped on one exits 2); anything else is not
    assert is_bad_input(raised(nan)) and not is_bad_input(missing) and not is_bad_input(text)
    assert not is_bad_input(None)
