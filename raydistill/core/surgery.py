"""In-place model surgery: initialize a student from its teacher, factorize Linear layers.

Both functions change the model they are given (names end with ``_``) and return a
plain-dict report of what they did, so a caller can log it.
"""

from __future__ import annotations

import difflib
from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["init_from_teacher_", "low_rank_factorize_", "low_rank_ranks"]


@torch.no_grad()
def init_from_teacher_(student: nn.Module, teacher: nn.Module) -> dict:
    """Copy every teacher tensor into the student entry with the same name and shape.

    "Parameter distillation" by weight inheritance: a student that shares names with
    its teacher (fewer blocks, same widths, or a shared stem/head) starts from the
    teacher's weights wherever the shapes allow, as DistilBERT (Sanh et al., 2019)
    does. Both parameters and persistent buffers (BatchNorm statistics) are copied,
    cast to the student's dtype and device. Matching is by name only: a 6-block student
    gets teacher blocks 0-5, not every other block as in DistilBERT; rename the teacher's
    state_dict yourself for another mapping.

    Args:
        student: model to initialize, changed in place. Pass unwrapped modules
            (``ddp.module``) so that names have no wrapper prefix.
        teacher: source model, not changed.

    Returns:
        ``{"copied": [name, ...], "skipped_shape": [(name, student_shape, teacher_shape), ...],
        "missing_in_teacher": [name, ...], "copied_numel": int}`` over the student's
        state_dict entries.
    """
    teacher_state = teacher.state_dict()
    report: dict = {"copied": [], "skipped_shape": [], "missing_in_teacher": [], "copied_numel": 0}
    # state_dict() tensors share storage with the student's parameters and buffers,
    # so copy_ writes through to the model.
    for name, target in student.state_dict().items():
        source = teacher_state.get(name)
        if source is None:
            report["missing_in_teacher"].append(name)
        elif source.shape != target.shape:
            report["skipped_shape"].append((name, tuple(target.shape), tuple(source.shape)))
        else:
            target.copy_(source)
            report["copied"].append(name)
            report["copied_numel"] += target.numel()
    return report


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (e.g. ``"encoder.0.fc"``) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)  # works for Sequential/ModuleList children named "0", "1", ...


def _factorizable(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    """The plain ``nn.Linear`` layers of ``model`` (not the model itself, not subclasses, not in ``skip``)."""
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and n != "" and n not in skip]


@torch.no_grad()
def low_rank_ranks(
    model: nn.Module, rank: int | None = None, energy: float | None = None, skip: Sequence[str] = ()
) -> dict[str, int]:
    """The SVD rank per ``nn.Linear`` layer for a fixed ``rank`` or a kept ``energy``; ``{name: r}``.

    ``rank``: the same ``r`` for every layer. ``energy`` in (0, 1]: per layer the smallest ``r`` with
    ``sum(S[:r]^2) / sum(S^2) >= energy`` (the share of the weight's squared Frobenius norm kept; Eckart-Young).
    Layers where ``r * (in + out) >= in * out`` (no fewer parameters) are left out.

    Raises:
        ValueError: neither or both of rank and energy; ``rank`` larger than a layer's ``min(in, out)`` (the
            message names the layer).
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank!r}")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    ranks = {}
    for name, linear in _factorizable(model, skip):
        d_in, d_out = linear.in_features, linear.out_features
        if rank is not None:
            if rank > min(d_in, d_out):
                raise ValueError(f"rank {rank} is larger than layer {name!r} (Linear {d_in}->{d_out}, rank at most "
                                 f"{min(d_in, d_out)})")
            r = rank
        else:
            s2 = torch.linalg.svdvals(linear.weight.float()) ** 2  # (min(in, out),)
            kept = torch.cumsum(s2, 0) / s2.sum().clamp_min(1e-30)
            r = int((kept < energy - 1e-6).sum()) + 1  # smallest r with kept[r - 1] >= energy
        if r * (d_in + d_out) < d_in * d_out:
            ranks[name] = r
    return ranks


@torch.no_grad()
def low_rank_factorize_(
    model: nn.Module, rank_ratio: float | None = None, min_features: int = 8, skip: Sequence[str] = (),
    ranks: dict[str, int] | None = None,
) -> dict:
    """Replace ``nn.Linear`` layers by two thinner ones from a truncated SVD.

    For a weight ``W`` (out, in) with SVD ``W = U diag(S) V^T`` and
    ``r = max(1, round(rank_ratio * min(in, out)))``::

        W_r = U[:, :r] diag(S[:r]) V[:, :r]^T       # best rank-r approx. (Eckart-Young)
        Linear(in, out)  ->  Sequential(Linear(in, r, bias=False), Linear(r, out, bias))

    with weights ``diag(sqrt(S_r)) V_r^T`` (r, in) and ``U_r diag(sqrt(S_r))`` (out, r)
    (the singular values are split evenly so neither factor is badly scaled). This is
    the low-rank compression of Denton et al. (2014), "Exploiting Linear Structure
    Within Convolutional Networks for Efficient Evaluation", and Jaderberg et al. (2014),
    "Speeding up Convolutional Neural Networks with Low Rank Expansions". Fine-tune
    (or distill) afterwards to recover accuracy.

    A layer is left alone, and listed in ``"skipped"``, when ``min(in, out) < min_features``,
    when its name is in ``skip``, when factorizing would not reduce parameters
    (``r * (in + out) >= in * out``), when it is the model itself, or when it is a subclass
    of ``nn.Linear`` (e.g. ``MultiheadAttention.out_proj``, whose weight is read directly
    by its parent). A module reachable under two names is factorized under the first only.

    With ``ranks`` (``{name: r}``, e.g. from :func:`low_rank_ranks` or a checkpoint's spec) exactly those
    layers are factorized at those ranks and ``rank_ratio``, ``min_features`` and ``skip`` are not used.

    Args:
        model: changed in place.
        rank_ratio: in (0, 1]; fraction of ``min(in, out)`` kept.
        min_features: smallest ``min(in, out)`` worth factorizing.
        skip: exact module names (from ``model.named_modules()``) to leave alone.

    Returns:
        ``{name: {"rank": r, "rel_error": ||W - W_r||_F / ||W||_F, "params_before": int,
        "params_after": int}, ..., "skipped": [name, ...]}``; params include the bias.
    """
    if ranks is not None:
        layers = dict(_factorizable(model, ()))
        unknown = [n for n in ranks if n not in layers]
        if unknown:
            raise ValueError(f"ranks names {unknown} that are not plain Linear layers of the model")
        return _factorize_(model, [(n, layers[n], int(r)) for n, r in ranks.items()], {"skipped": []})
    if rank_ratio is None or not 0 < rank_ratio <= 1:
        raise ValueError(f"rank_ratio must be in (0, 1], got {rank_ratio!r}")
    if min_features < 1:
        raise ValueError(f"min_features must be >= 1, got {min_features!r}")
    if isinstance(skip, str):
        raise ValueError(f"skip must be a sequence of names, got the string {skip!r}; wrap it in a list")
    all_names = [name for name, _ in model.named_modules()]
    for name in skip:
        if name not in all_names:
            close = difflib.get_close_matches(name, all_names, n=5, cutoff=0.5)
            raise ValueError(f"skip name {name!r} is not a submodule of model; close names: {close}")

    report: dict = {"skipped": []}
    # Collect first: replacing modules while iterating named_modules() would mutate it.
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = []
    for name, linear in linears:
        d_in, d_out = linear.in_features, linear.out_features
        rank = max(1, round(rank_ratio * min(d_in, d_out)))
        if (
            type(linear) is not nn.Linear
            or name == ""
            or name in skip
            or min(d_in, d_out) < min_features
            or rank * (d_in + d_out) >= d_in * d_out
        ):
            report["skipped"].append(name)
            continue
        chosen.append((name, linear, rank))
    return _factorize_(model, chosen, report)


def _factorize_(model: nn.Module, chosen: list[tuple[str, nn.Linear, int]], report: dict) -> dict:
    """Replace each (name, linear, rank) of ``chosen`` by its rank-r SVD pair; add each to ``report``."""
    for name, linear, rank in chosen:
        d_in, d_out = linear.in_features, linear.out_features
        weight = linear.weight  # (out, in)
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)  # (out, m), (m,), (m, in)
        root_s = s[:rank].sqrt()  # (r,)
        first_weight = root_s[:, None] * vh[:rank]  # (r, in)
        second_weight = u[:, :rank] * root_s[None, :]  # (out, r)

        has_bias = linear.bias is not None
        factory = {"device": weight.device, "dtype": weight.dtype}
        first = nn.Linear(d_in, rank, bias=False, **factory)
        second = nn.Linear(rank, d_out, bias=has_bias, **factory)
        first.weight.copy_(first_weight)
        second.weight.copy_(second_weight)
        if has_bias:
            second.bias.copy_(linear.bias)
        new = nn.Sequential(first, second)
        new.requires_grad_(weight.requires_grad)  # keep frozen layers frozen
        new.train(linear.training)

        # Measured on the weights actually installed, so it includes dtype rounding.
        approx = second.weight.float() @ first.weight.float()  # (out, in)
        w_norm = torch.linalg.matrix_norm(weight.float())
        rel_error = (torch.linalg.matrix_norm(weight.float() - approx) / w_norm).item() if w_norm > 0 else 0.0
        bias_numel = d_out if has_bias else 0
        report[name] = {
            "rank": rank,
            "rel_error": rel_error,
            "params_before": d_in * d_out + bias_numel,
            "params_after": rank * (d_in + d_out) + bias_numel,
        }
        _set_module(model, name, new)
    return report
