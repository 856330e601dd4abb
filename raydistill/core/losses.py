"""Knowledge-distillation losses and feature hooks, in plain torch.

Every loss is a pure function of tensors that returns a scalar; the training step
mixes them itself, visibly::

    loss = (1 - alpha) * ce + alpha * soft_kd_loss(s, t, T) + beta * hard_kd_loss(s, t) + gamma * hint

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
    "soft_kd_loss",
    "hard_kd_loss",
    "teacher_topk",
    "topk_log_probs",
    "average_teacher_logits",
    "FeatureHooks",
    "HintAdapter",
    "hint_loss",
]


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
