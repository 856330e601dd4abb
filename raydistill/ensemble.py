"""Several teachers as one: the weighted average of their logits (``teacher.ensemble``, ``teacher.weights``).

The run's teacher (trained here or ``teacher.checkpoint``) and the checkpoints in ``teacher.ensemble`` become
one ``TeacherEnsemble`` module whose forward is ``core.losses.average_teacher_logits`` of its members'
logits. It is a model like any other, rebuilt from a plain-data spec (``raydistill.ensemble:ensemble`` with
the members' own specs as kwargs), so every teacher source serves the average without knowing about it: the
shared actor answers with it, the logit cache stores it, an in-process copy computes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from raydistill.core.losses import average_teacher_logits
from raydistill.errors import CheckpointError

FACTORY = "raydistill.ensemble:ensemble"  # the model name of an ensemble spec


class TeacherEnsemble(nn.Module):
    """``forward(x)`` (B, C, H, W) → (B, K): ``sum_i w_i z_i / sum_i w_i`` over the members' logits ``z_i``."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.weights = [float(w) for w in weights]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return average_teacher_logits([m(x) for m in self.members], self.weights)


def ensemble(members: list[dict], weights: list[float]) -> TeacherEnsemble:
    """The model factory behind an ensemble spec: each member rebuilt from its own spec (pruning plan
    included), weights loaded afterwards with the ensemble's state dict (``members.<i>.<name>``)."""
    from raydistill.checkpoints import build_from_spec

    return TeacherEnsemble([build_from_spec(s) for s in members], weights)


def ensemble_spec(member_specs: list[dict], weights: Sequence[float] | None) -> dict[str, Any]:
    """The spec of the ensemble of ``member_specs`` (equal weights when ``weights`` is None)."""
    from raydistill.checkpoints import model_spec, spec_input_shape

    first = member_specs[0]
    weights = [1.0] * len(member_specs) if weights is None else [float(w) for w in weights]
    return model_spec(FACTORY, {"members": member_specs, "weights": weights}, first["num_classes"],
                      spec_input_shape(first))


def check_member_classes(main: tuple[str, dict], others: list[tuple[str, dict]], num_classes: int) -> None:
    """Every teacher must predict the data's classes: one line naming each teacher's class count."""
    counts = [(name, spec["num_classes"]) for name, spec in [main, *others]]
    if any(k != num_classes for _, k in counts):
        listed = ", ".join(f"{name} {k}" for name, k in counts)
        raise CheckpointError(f"the teachers predict different numbers of classes ({listed}) but the data has "
                              f"{num_classes}; use teachers trained on this data (teacher.ensemble)")


def load_members(paths: Sequence[str]) -> list[tuple[nn.Module, dict, str]]:
    """(model, spec, sha256) of each ``teacher.ensemble`` checkpoint (each verified and read weights-only)."""
    from raydistill.checkpoints import load_model
    from raydistill.manifest import sha256_file

    out = []
    for path in paths:
        model, spec, _ = load_model(path)
        out.append((model, spec, sha256_file(Path(path))))
    return out
