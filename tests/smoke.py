"""Smoke settings shared by the tests that run the pipeline: tiny data, one epoch per stage."""

SMOKE = {
    "data.limit": 200, "teacher.epochs": 1, "distill.epochs": 1, "prune.epochs": 1,
    "prune.finetune_epochs": 1, "teacher.kwargs": {"widths": [16, 32], "hidden": 64},
}
