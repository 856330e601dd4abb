"""Knowledge-distillation losses and feature hooks, in plain torch.

Every loss is a pure function of tensors that returns a scalar; the training step
mixes them itself, visibly::

    loss = (1 - alpha) * ce + alpha * soft_kd_loss(s, t, T) + beta * hard_kd_loss(s, t) + gamma * hint

The soft term is one of ``LOGIT_LOSSES`` (``distill.loss``): Hinton's KD (:func:`soft_kd_loss`),
decoupled KD (:func:`dkd_loss`) or DIST (:func:`dist_loss`), optionally on standardized logits
(:func:`standardize_logits`). A top-k logit cache becomes the teacher's distribution in one of
the ``TOPK_LOSSES`` ways (``cache.topk_loss``): :func:`topk_log_probs` (tail filled) or
:func:`sparse_topk_log_probs` (tail ignored).

Shapes: ``B`` batch, ``C`` classes, ``k`` cached top-k classes of the teacher.
All losses compute in float32 whatever the logits' dtype (fp16 logits would
overflow in ``exp`` and lose the small probabilities that KD is about).
"""

from __future__ import annotations

import difflib
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOGIT_LOSSES",
    "TOPK_LOSSES",
    "soft_kd_loss",
    "hard_kd_loss",
    "dkd_loss",
    "dist_loss",
    "standardize_logits",
    "teacher_topk",
    "topk_log_probs",
    "sparse_topk_log_probs",
    "sparse_topk_kd_loss",
    "average_teacher_logits",
    "FeatureHooks",
    "HintAdapter",
    "hint_loss",
]

LOGIT_LOSSES = ("kd", "dkd", "dist")  # distill.loss: the soft term distill.alpha weighs (worker.soft_term)


# --------------------------------------------------------------------------- checks


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature!r}; typical values are 1 to 8")


def _check_logits(name: str, logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"{name} must be a (B, C) tensor, got {shape}; "
            "flatten sequence logits with .flatten(0, -2) first"
        )
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {logits.dtype}")


def _check_classes(name: str, logits: Tensor, at_least: int = 2) -> None:
    if logits.shape[-1] < at_least:
        raise ValueError(f"{name} has {logits.shape[-1]} classes; this loss needs at least {at_least}")


def _check_target(target: Tensor, logits: Tensor) -> None:
    if not isinstance(target, Tensor) or target.shape != logits.shape[:1] or target.is_floating_point():
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"target must be a ({logits.shape[0]},) integer tensor of class indices, got {shape}")


def _check_topk(topk_probs: Tensor, topk_indices: Tensor, num_classes: int, batch: int | None = None) -> None:
    if not (isinstance(topk_probs, Tensor) and topk_probs.ndim == 2 and topk_probs.is_floating_point()):
        raise ValueError("topk_probs must be a (B, k) floating-point tensor of the teacher's top-k probabilities")
    if not (isinstance(topk_indices, Tensor) and topk_indices.shape == topk_probs.shape
            and not topk_indices.is_floating_point()):
        raise ValueError(f"topk_indices must be a {tuple(topk_probs.shape)} integer tensor like topk_probs")
    if batch is not None and topk_probs.shape[0] != batch:
        raise ValueError(f"the top-k cache has {topk_probs.shape[0]} rows for a batch of {batch} samples")
    if not 1 <= topk_probs.shape[1] <= num_classes:
        raise ValueError(f"k must be in [1, C={num_classes}], got {topk_probs.shape[1]}")
    if topk_indices.numel() and not 0 <= int(topk_indices.min()) <= int(topk_indices.max()) < num_classes:
        raise ValueError(f"topk_indices must be class indices in [0, {num_classes})")


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same (B, C) shape; "
            "the student and teacher must predict the same classes"
        )


# --------------------------------------------------------------------------- logit losses


def _kl_times_t2(log_p_teacher: Tensor, log_p_student: Tensor, temperature: float) -> Tensor:
    """KL(p_teacher || p_student) summed over classes, mean over batch, times T^2.

    Both inputs are (B, C) log-probabilities at temperature T. Classes where the
    teacher has zero probability contribute 0 (the limit of 0 * log 0), so -inf
    teacher log-probs give finite values and finite gradients.
    """
    p_teacher = log_p_teacher.exp()  # (B, C)
    support = p_teacher > 0  # (B, C); where False the term is exactly 0
    # Zero the log-probs off the support *before* the product: 0 * (-inf) is NaN in
    # the forward, and a torch.where on the product would still leak NaN gradients.
    zero = torch.zeros((), dtype=log_p_teacher.dtype, device=log_p_teacher.device)
    log_p_teacher = torch.where(support, log_p_teacher, zero)
    log_p_student = torch.where(support, log_p_student, zero)
    kl = (p_teacher * (log_p_teacher - log_p_student)).sum(dim=-1)  # (B,)
    return kl.mean() * temperature**2


def soft_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Soft-target distillation loss of Hinton, Vinyals & Dean (2015).

    ``p_T = softmax(teacher_logits / T)``, ``q_T = softmax(student_logits / T)``::

        loss = T^2 * mean_b sum_c p_T[b, c] * (log p_T[b, c] - log q_T[b, c])
             = T^2 * mean_b KL(p_T[b] || q_T[b])

    The ``T^2`` keeps the gradient magnitude independent of T (Hinton et al., sec. 2),
    so the loss can be mixed with the T=1 cross-entropy at a fixed weight.

    Args:
        student_logits: (B, C) raw student scores; gradients flow into them.
        teacher_logits: (B, C) raw teacher scores; may contain ``-inf`` for classes
            the teacher rules out (they contribute 0). Detach them yourself if the
            teacher must not be trained.
        temperature: T > 0.

    Returns:
        Scalar float32 tensor.
    """
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, C)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    return _kl_times_t2(log_p_teacher, log_p_student, temperature)


def hard_kd_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Hard-label distillation of DeiT (Touvron et al., 2021).

    The teacher's arg-max is used as a label::

        loss = mean_b CE(student_logits[b], argmax_c teacher_logits[b, c])

    Args:
        student_logits: (B, C).
        teacher_logits: (B, C); only its arg-max is used (no gradient reaches it).

    Returns:
        Scalar float32 tensor.
    """
    _check_pair(student_logits, teacher_logits)
    teacher_labels = teacher_logits.argmax(dim=-1)  # (B,) int64
    return F.cross_entropy(student_logits.float(), teacher_labels)


def _binary_log_probs(scaled_logits: Tensor, is_target: Tensor) -> Tensor:
    """(B, C) tempered logits → (B, 2) log-probabilities of (the target class, all other classes)."""
    neg_inf = torch.tensor(-float("inf"), dtype=scaled_logits.dtype, device=scaled_logits.device)
    log_z = scaled_logits.logsumexp(dim=-1)  # (B,)
    log_target = torch.where(is_target, scaled_logits, neg_inf).logsumexp(dim=-1) - log_z  # (B,)
    log_other = torch.where(is_target, neg_inf, scaled_logits).logsumexp(dim=-1) - log_z  # (B,)
    return torch.stack([log_target, log_other], dim=-1)  # (B, 2)


def dkd_loss(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float, alpha: float, beta: float
) -> Tensor:
    """Decoupled KD of Zhao et al. (CVPR 2022), "Decoupled Knowledge Distillation".

    Hinton's loss is ``KD = TCKD + (1 - p_T[target]) * NCKD``: the target-class term couples the
    non-target one to the teacher's confidence. DKD weighs the two terms independently::

        b_T = (p_T[target], 1 - p_T[target])                 # binary: target vs the rest
        p_hat_T = softmax(z / T - 1000 * onehot(target))     # over the non-target classes
        TCKD = T^2 * mean_b KL(b_T(teacher)[b] || b_T(student)[b])
        NCKD = T^2 * mean_b KL(p_hat_T(teacher)[b] || p_hat_T(student)[b])
        loss = alpha * TCKD + beta * NCKD

    as in mdistiller's reference implementation (``-1000`` masks the target logit at temperature T;
    the paper's CIFAR-100 setting is alpha=1, beta=8, T=4, next to a CE term of weight 1; mdistiller
    also ramps the DKD term up over the first 20 epochs, which is the caller's business). With
    ``alpha == beta == 1`` and a teacher at ``p_T[target] = 0`` it is Hinton's KD. A sample whose
    teacher puts no mass on any non-target class (possible only with ``-inf`` teacher logits, e.g. a
    top-k cache) has no non-target distribution: its NCKD is 0.

    Args:
        student_logits: (B, C) raw student scores, C >= 2.
        teacher_logits: (B, C) raw teacher scores; may contain ``-inf`` (a top-k expansion).
        target: (B,) integer ground-truth classes.
        temperature: T > 0.
        alpha: weight of TCKD.
        beta: weight of NCKD.

    Returns:
        Scalar float32 tensor.
    """
    _check_pair(student_logits, teacher_logits)
    _check_classes("student_logits", student_logits)
    _check_target(target, student_logits)
    _check_temperature(temperature)
    s = student_logits.float() / temperature  # (B, C)
    t = teacher_logits.float() / temperature  # (B, C)
    is_target = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, target.long().unsqueeze(-1), True)  # (B, C)
    tckd = _kl_times_t2(_binary_log_probs(t, is_target), _binary_log_probs(s, is_target), temperature)

    log_p_teacher = F.log_softmax(t - 1000.0 * is_target, dim=-1)  # (B, C), ~0 mass on the target
    log_p_student = F.log_softmax(s - 1000.0 * is_target, dim=-1)  # (B, C)
    has_other = (t.masked_fill(is_target, -float("inf")) > -float("inf")).any(dim=-1, keepdim=True)  # (B, 1)
    log_p_teacher = log_p_teacher.masked_fill(~has_other, -float("inf"))  # such a row contributes 0
    nckd = _kl_times_t2(log_p_teacher, log_p_student, temperature)
    return alpha * tckd + beta * nckd


def _pearson_rows(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """(N, M), (N, M) → (N,) Pearson correlation of each row pair: cosine similarity of the centred rows."""
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    return (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, beta: float, gamma: float, *, eps: float = 1e-8
) -> Tensor:
    """DIST of Huang et al. (NeurIPS 2022), "Knowledge Distillation from A Stronger Teacher".

    Matches predictions by correlation, not by KL, so a much stronger (sharper) teacher is matched
    up to the scale and shift of its probabilities. With ``Y = softmax(z / T)`` (B, C)::

        inter = T^2 * (1 - mean_b rho(Y_s[b, :], Y_t[b, :]))    # each sample's class ranking
        intra = T^2 * (1 - mean_c rho(Y_s[:, c], Y_t[:, c]))    # each class across the batch
        loss = beta * inter + gamma * intra

    where ``rho(u, v) = <u - mean u, v - mean v> / (|u - mean u| |v - mean v| + eps)``, as in the
    authors' code (whose defaults are beta = gamma = T = 1). The intra-class term needs B >= 2:
    with one sample each column is constant and the term is T^2.

    Args:
        student_logits: (B, C) raw student scores.
        teacher_logits: (B, C) raw teacher scores; ``-inf`` classes get probability 0.
        temperature: T > 0.
        beta: weight of the inter-class term.
        gamma: weight of the intra-class term.
        eps: added to the product of the norms.

    Returns:
        Scalar float32 tensor; 0 (up to eps) when the student's probabilities equal the teacher's.
    """
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    y_s = F.softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    y_t = F.softmax(teacher_logits.float() / temperature, dim=-1)  # (B, C)
    inter = temperature**2 * (1 - _pearson_rows(y_s, y_t, eps).mean())
    intra = temperature**2 * (1 - _pearson_rows(y_s.T, y_t.T, eps).mean())  # (C, B) rows: the classes
    return beta * inter + gamma * intra


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Logit standardization of Sun et al. (CVPR 2024), "Logit Standardization in Knowledge Distillation".

    Z-scores each sample's logits over the classes::

        z_std[b] = (z[b] - mean_c z[b]) / (std_c z[b] + eps)

    (``std`` with Bessel's correction, ``torch.std`` as in the authors' code). Applied to both the
    student's and the teacher's logits before the temperature softmax of KD or DKD, the student only
    has to match the teacher's logit *relations*, not their range. The result is invariant to adding a
    constant to a row and to scaling it by a positive factor.

    Args:
        logits: (B, C) finite raw scores, C >= 2 (a top-k expansion with ``-inf`` classes is not).
        eps: added to the standard deviation (a constant row maps to 0).

    Returns:
        (B, C) float32 standardized logits.
    """
    _check_logits("logits", logits)
    _check_classes("logits", logits)
    z = logits.float()  # (B, C)
    mean = z.mean(dim=-1, keepdim=True)  # (B, 1)
    std = z.std(dim=-1, keepdim=True)  # (B, 1)
    return (z - mean) / (std + eps)


def teacher_topk(teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """What a logit cache stores per sample: the teacher's k most likely classes at T=1.

    Args:
        teacher_logits: (B, C).
        k: 1 <= k <= C.

    Returns:
        ``(probs, indices)``: (B, k) float32 probabilities ``softmax(teacher_logits)``
        in decreasing order, and their (B, k) int64 class indices. Cast ``probs`` to
        float16 to halve the cache; :func:`topk_log_probs` accepts both.
    """
    _check_logits("teacher_logits", teacher_logits)
    num_classes = teacher_logits.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must be in [1, C={num_classes}], got {k}")
    probs = F.softmax(teacher_logits.detach().float(), dim=-1)  # (B, C)
    top_probs, top_indices = probs.topk(k, dim=-1)  # (B, k), (B, k)
    return top_probs, top_indices


def topk_log_probs(topk_probs: Tensor, topk_indices: Tensor, num_classes: int) -> Tensor:
    """The full (B, C) T=1 log-distribution rebuilt from a top-k cache, to use as teacher logits.

    The cached classes get their stored probability and the residual mass ``r = max(0, 1 - sum_k p_k)``
    is spread uniformly over the other ``C - k`` classes; classes with no mass get ``-inf``. Passed to
    :func:`soft_kd_loss` as the teacher's logits it is tempered exactly, since
    ``softmax(z / T)_c ∝ exp(z_c)^(1/T) ∝ p_c^(1/T)``::

        p_T = softmax(log(p) / T)
        loss = T^2 * mean_b KL(p_T[b] || softmax(student_logits[b] / T))

    With ``k == C`` this equals KD on the full logits up to float rounding of the cached
    probabilities. With ``k < C`` the tail is flattened to its mean. At T=1 that costs little once
    the top-k hold most of the mass (100 classes, k=10, top-k mass 0.99: within 0.1% of the exact
    loss). Tempering amplifies the tail, though: the real tail spans orders of magnitude and
    ``p^(1/T)`` of its mean is much larger than the mean of ``p^(1/T)``, so at T=2..4 the loss can be
    off by 10-50% for k=10 of 100, and it no longer goes to 0 for a student equal to the teacher. Use
    a larger k (or T=1) when the tail matters; tests/unit/core/test_losses.py checks that the error
    shrinks as k grows. The worker rebuilds it once per sample, not every step.

    Args:
        topk_probs: (B, k) float16/float32 probabilities.
        topk_indices: (B, k) integer class indices.
        num_classes: C >= k.

    Returns:
        (B, C) float32 log-probabilities.
    """
    probs = topk_probs.float()  # (B, k)
    batch, k = probs.shape
    residual = (1.0 - probs.sum(dim=-1, keepdim=True)).clamp_min(0.0)  # (B, 1)
    fill = residual / (num_classes - k) if k < num_classes else torch.zeros_like(residual)
    full = fill.expand(batch, num_classes).clone()  # (B, C) uniform tail
    full.scatter_(-1, topk_indices.long(), probs)  # (B, C) cached head
    return full.log()  # log(0) = -inf: log_softmax and _kl_times_t2 handle it


def sparse_topk_log_probs(topk_probs: Tensor, topk_indices: Tensor, num_classes: int) -> Tensor:
    """The (B, C) T=1 log-distribution of a top-k cache *without* its tail, to use as teacher logits.

    The cached probabilities are renormalised over the k classes and every other class gets ``-inf``
    (probability 0). Passed to :func:`soft_kd_loss` as the teacher's logits it gives exactly
    :func:`sparse_topk_kd_loss` (``softmax(log p / T)`` is ``p^(1/T)`` renormalised over the k classes,
    and the ``-inf`` classes contribute 0); the worker builds it once per sample for
    ``cache.topk_loss: sparse``. :func:`topk_log_probs` is the tail-filled alternative.

    Args:
        topk_probs: (B, k) float16/float32 probabilities.
        topk_indices: (B, k) integer class indices.
        num_classes: C >= k.

    Returns:
        (B, C) float32 log-probabilities, ``-inf`` outside the top-k.
    """
    _check_topk(topk_probs, topk_indices, num_classes)
    probs = topk_probs.float()  # (B, k)
    head = probs / probs.sum(dim=-1, keepdim=True)  # (B, k), sums to 1
    full = torch.full((probs.shape[0], num_classes), -float("inf"), dtype=torch.float32, device=probs.device)
    return full.scatter_(-1, topk_indices.long(), head.log())  # (B, C)


def sparse_topk_kd_loss(
    student_logits: Tensor, topk_probs: Tensor, topk_indices: Tensor, temperature: float
) -> Tensor:
    """Sparse top-k KD: the KL over the teacher's k cached classes only, as large-model KD stacks compute it.

    With ``p`` the cached top-k probabilities (B, k) and ``idx`` their classes::

        p_T = p^(1/T) / sum_k p^(1/T)                          # tempered, renormalised over the k classes
        log q_T = log_softmax(student_logits / T)[:, idx]      # student over ALL C classes, gathered at idx
        loss = T^2 * mean_b sum_k p_T[b, k] * (log p_T[b, k] - log q_T[b, k])

    Unlike :func:`topk_log_probs`, which spreads the residual mass ``1 - sum_k p`` uniformly over the
    other ``C - k`` classes, this ignores the tail: the student is not pulled towards a flattened tail
    (whose tempered mass :func:`topk_log_probs` overstates at T > 1); the student's own tail mass only
    falls as its probabilities at the k classes rise (at the minimum its tail is empty). With
    ``k == C`` it equals :func:`soft_kd_loss` on the teacher's logits up to rounding of the cached
    probabilities. Used as ``soft_kd_loss(s, sparse_topk_log_probs(p, idx, C), T)``, which is equal.

    Args:
        student_logits: (B, C) raw student scores.
        topk_probs: (B, k) float16/float32 teacher probabilities at T=1 (:func:`teacher_topk`).
        topk_indices: (B, k) integer class indices.
        temperature: T > 0.

    Returns:
        Scalar float32 tensor.
    """
    _check_logits("student_logits", student_logits)
    _check_topk(topk_probs, topk_indices, student_logits.shape[-1], batch=student_logits.shape[0])
    _check_temperature(temperature)
    log_p_teacher = F.log_softmax(topk_probs.float().log() / temperature, dim=-1)  # (B, k), p^(1/T) renormalised
    log_q_student = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    log_q_student = log_q_student.gather(-1, topk_indices.long())  # (B, k)
    return _kl_times_t2(log_p_teacher, log_q_student, temperature)


# cache.topk_loss → how a top-k cache becomes the teacher's (B, C) log-distribution (teacher.CachedTeacher)
TOPK_LOSSES = {"tail_filled": topk_log_probs, "sparse": sparse_topk_log_probs}


def average_teacher_logits(
    teacher_logits: Sequence[Tensor], weights: Sequence[float] | None = None
) -> Tensor:
    """Weighted mean of several teachers' logits, the ensemble target for multi-teacher KD.

    ``z = sum_i w_i z_i / sum_i w_i`` (uniform weights by default), as in the ensemble
    targets of Hinton et al. (2015) and You et al. (2017), "Learning from Multiple
    Teacher Networks".

    Args:
        teacher_logits: one or more tensors of identical shape, e.g. (B, C).
        weights: one non-negative weight per teacher with a positive sum; they are
            normalized to sum 1.

    Returns:
        Tensor of the common shape, in the promoted dtype of the inputs.
    """
    teacher_logits = list(teacher_logits)
    if not teacher_logits:
        raise ValueError("teacher_logits must contain at least one tensor")
    shape = teacher_logits[0].shape
    for i, logits in enumerate(teacher_logits):
        if logits.shape != shape:
            raise ValueError(
                f"teacher_logits[{i}] has shape {tuple(logits.shape)} but teacher_logits[0] has "
                f"{tuple(shape)}; all teachers must predict the same classes for the same batch"
            )
    if weights is None:
        weights = [1.0] * len(teacher_logits)
    weights = [float(w) for w in weights]
    if len(weights) != len(teacher_logits):
        raise ValueError(f"weights has {len(weights)} entries for {len(teacher_logits)} teachers")
    if any(w < 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
    total = sum(weights)
    stacked = torch.stack(teacher_logits)  # (N, *shape)
    w = torch.tensor([x / total for x in weights], dtype=stacked.dtype, device=stacked.device)
    w = w.view(-1, *([1] * len(shape)))  # (N, 1, ..., 1) broadcast over each teacher's logits
    return (w * stacked).sum(dim=0)  # (*shape)


# --------------------------------------------------------------------------- features


def _unknown_name_error(argument: str, name: str, valid: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    hint = f"did you mean one of {close}?" if close else f"valid names start with {list(valid)[:10]}"
    return ValueError(f"{argument} {name!r} is not a submodule name; {hint}")


class FeatureHooks:
    """Capture the outputs of named submodules during forward passes.

    ``features[name]`` holds the latest output of ``dict(model.named_modules())[name]``
    (for modules returning a tuple, e.g. transformer blocks, its first element). The
    tensors are not detached, so a student's features keep their graph for
    :func:`hint_loss`; run the teacher under ``torch.no_grad()``.

    For a wrapped model (DDP, ``torch.compile``) pass the inner module
    (``ddp.module``, ``compiled._orig_mod``) so the names have no wrapper prefix.

    Usage::

        with FeatureHooks(student, ["layer3"]) as hooks:
            logits = student(x)
        feat = hooks.features["layer3"]  # kept after the hooks are removed
    """

    def __init__(self, model: nn.Module, layer_names: Sequence[str]):
        if isinstance(layer_names, str):
            raise ValueError(
                f"layer_names must be a sequence of names, got the string {layer_names!r}; wrap it in a list"
            )
        modules = dict(model.named_modules())
        for name in layer_names:
            if name not in modules:
                raise _unknown_name_error("layer name", name, list(modules))
        self.features: dict[str, Tensor] = {}
        self._handles = [  # dict.fromkeys: de-duplicate, keep order
            modules[name].register_forward_hook(self._make_hook(name))
            for name in dict.fromkeys(layer_names)
        ]

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            if isinstance(output, (tuple, list)):
                output = output[0]
            self.features[name] = output

        return hook

    def remove(self) -> None:
        """Remove the hooks; ``features`` keeps the last captured tensors."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "FeatureHooks":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def _feature_shape(model: nn.Module, layer: str, example_input: Tensor) -> tuple[int, ...]:
    """Shape without the batch dim of ``layer``'s output for one no-grad eval forward."""
    # eval() so the probe does not update BatchNorm statistics; restore each module's own mode.
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), FeatureHooks(model, [layer]) as hooks:
            model(example_input)
    finally:
        for module, training in modes.items():
            module.training = training
    if layer not in hooks.features:
        raise ValueError(
            f"layer {layer!r} did not run during the forward pass; pick a layer on the forward path"
        )
    return tuple(hooks.features[layer].shape[1:])


class HintAdapter(nn.Module):
    """FitNets regressor (Romero et al., 2015) from a student feature to the teacher's shape.

    * ``(Cs, H, W) -> (Ct, H', W')``: 1x1 ``Conv2d(Cs, Ct)``, then ``adaptive_avg_pool2d``
      to ``(H', W')`` when the spatial sizes differ.
    * ``(Ds,) -> (Dt,)``: ``Linear(Ds, Dt)``.
    * ``(L, Ds) -> (L, Dt)`` (token features): ``Linear(Ds, Dt)`` on the last dim.

    Args:
        student_shape: student feature shape without the batch dim.
        teacher_shape: teacher feature shape without the batch dim.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]):
        super().__init__()
        self.student_shape = tuple(int(d) for d in student_shape)
        self.teacher_shape = tuple(int(d) for d in teacher_shape)
        s, t = self.student_shape, self.teacher_shape
        if len(s) == len(t) == 3:
            self.proj: nn.Module = nn.Conv2d(s[0], t[0], kernel_size=1)
            self.out_hw = t[1:] if s[1:] != t[1:] else None
        elif (len(s) == len(t) == 1) or (len(s) == len(t) == 2 and s[0] == t[0]):
            self.proj = nn.Linear(s[-1], t[-1])
            self.out_hw = None
        else:
            raise ValueError(
                f"cannot map student feature {s} to teacher feature {t} (shapes without batch dim); "
                "supported: (C, H, W) -> (C', H', W'), (D,) -> (D',), (L, D) -> (L, D'); "
                "pick layers with compatible outputs"
            )

    def forward(self, student_feature: Tensor) -> Tensor:
        """(B, *student_shape) -> (B, *teacher_shape)."""
        if tuple(student_feature.shape[1:]) != self.student_shape:
            raise ValueError(
                f"student_feature has shape {tuple(student_feature.shape)}, "
                f"expected (B, *{self.student_shape})"
            )
        out = self.proj(student_feature)  # (B, Ct, H, W) or (B, [L,] Dt)
        if self.out_hw is not None:
            out = F.adaptive_avg_pool2d(out, self.out_hw)  # (B, Ct, H', W')
        return out

    @classmethod
    def for_models(
        cls,
        student: nn.Module,
        teacher: nn.Module,
        student_layer: str,
        teacher_layer: str,
        example_input: Tensor,
    ) -> "HintAdapter":
        """Build the adapter from one no-grad eval forward of each model on ``example_input``.

        The models' train/eval modes are restored afterwards. The adapter is created on
        the device of the student's parameters.
        """
        student_shape = _feature_shape(student, student_layer, example_input)
        teacher_shape = _feature_shape(teacher, teacher_layer, example_input)
        device = next(iter(student.parameters()), torch.empty(0)).device
        return cls(student_shape, teacher_shape).to(device)


def hint_loss(student_feature: Tensor, teacher_feature: Tensor, adapter: nn.Module | None = None) -> Tensor:
    """FitNets hint loss (Romero et al., 2015).

    ``loss = mean((adapter(student_feature) - teacher_feature)^2)``, with the teacher
    feature detached so only the student and the adapter are trained.

    Args:
        student_feature: (B, *student_shape).
        teacher_feature: (B, *teacher_shape).
        adapter: typically a :class:`HintAdapter` mapping one to the other. ``None`` when
            ``student_feature`` is already mapped (a data-parallel trainer runs the adapter
            inside the student's forward so that its gradients are synchronized too).

    Returns:
        Scalar float32 tensor.
    """
    mapped = adapter(student_feature) if adapter is not None else student_feature  # (B, *teacher_shape)
    if mapped.shape != teacher_feature.shape:
        raise ValueError(
            f"adapter(student_feature) has shape {tuple(mapped.shape)} but teacher_feature has "
            f"{tuple(teacher_feature.shape)}; build the adapter from these two features' shapes"
        )
    return F.mse_loss(mapped.float(), teacher_feature.detach().float())
