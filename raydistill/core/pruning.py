"""Unstructured and structured (channel) pruning, in plain torch + Torch-Pruning.

Two families, both usable from any training loop (the Ray Train worker loop calls them
between optimizer steps; nothing here imports Ray):

* **Unstructured** magnitude pruning (Han et al. 2015, "Learning both Weights and
  Connections for Efficient Neural Networks"): :func:`magnitude_masks` picks the
  smallest-``|w|`` weights, :func:`apply_masks_` installs them with torch's own
  ``torch.nn.utils.prune`` re-parametrisation ``weight = weight_orig * weight_mask``
  so they survive optimizer steps, :func:`remove_masks_` bakes them in.
* **Structured** channel pruning on Torch-Pruning's DependencyGraph (Fang et al. 2023,
  "DepGraph: Towards Any Structural Pruning"): :class:`ChannelPruner` *masks* the
  lowest-importance channels of every coupled group (so training can go on and the
  schedule can grow), then *removes* them physically and returns a serialisable plan
  that :func:`apply_pruning_plan_` replays on a freshly built model.

:func:`sparsity_schedule` gives the gradual schedule of Zhu & Gupta 2017 ("To prune, or
not to prune") that drives either family.

Shapes: a Conv2d weight is ``(C_out, C_in / groups, kH, kW)``, a Linear weight
``(F_out, F_in)``; a "channel" is one output row of the producing layer together with
every slice of every coupled layer that carries it.
"""

from __future__ import annotations

import difflib
import functools
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.utils import prune as torch_prune

if TYPE_CHECKING:
    import torch_pruning as tp


def _tp():
    """Torch-Pruning, imported where a pruner or a plan is first used, not with this module: it imports timm and
    torchvision, which pull in torch._dynamo (3.5 s in all on a 2-core machine). Config validation, the stages that
    do not prune and every Ray Train worker of those stages would otherwise pay it; ~0.9 s of it is saved for good
    (torch.optim's first optimizer imports torch._dynamo anyway: docs/benchmarks.md, the overhead section)."""
    import torch_pruning

    return torch_pruning

__all__ = [
    "magnitude_masks",
    "apply_masks_",
    "remove_masks_",
    "sparsity",
    "ChannelPruner",
    "MagnitudePruner",
    "apply_pruning_plan_",
    "sparsity_schedule",
    "IMPORTANCES",
    "PLAN_KINDS",
    "PRUNE_KINDS",
    "SCHEDULES",
]

IMPORTANCES = ("l1", "bn_scale", "taylor")
SCHEDULES = ("oneshot", "linear", "cubic")
# prune.kind: channel (ChannelPruner: channels removed, a smaller dense model) | unstructured (MagnitudePruner:
# individual weights zeroed, same dense shapes, so no dense speed-up)
PRUNE_KINDS = ("channel", "unstructured")

# Pruning-plan "kind" -> Torch-Pruning root pruning function. Only output-side roots:
# every group is rooted at the layer that *produces* the channels (as tp's
# get_all_groups does), the rest of the group follows from the dependency graph.
# (The names of Torch-Pruning's functions: ``_tp()`` gives them.)
PLAN_KINDS = {
    "conv_out": "prune_conv_out_channels",
    "depthwise_conv_out": "prune_depthwise_conv_out_channels",
    "linear_out": "prune_linear_out_channels",
}

# Parameter-free nodes Torch-Pruning inserts for functional ops (add, cat, view, ...).
# They carry channels through but own no tensor that would need zeroing.
@functools.cache
def _tp_dummy_ops() -> tuple[type, ...]:
    ops = _tp().ops
    return tuple(getattr(ops, n) for n in ("_ElementWiseOp", "_ConcatOp", "_SplitOp", "_ReshapeOp", "_SliceOp",
                                           "_UnbindOp", "_ExpandOp") if hasattr(ops, n))


# --------------------------------------------------------------------------- helpers


def _check_model(model: Any, arg: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"{arg} must be a torch.nn.Module, got {type(model).__name__}")


def _check_layer_types(layer_types: Any) -> tuple[type, ...]:
    if isinstance(layer_types, type):
        layer_types = (layer_types,)
    if (
        not isinstance(layer_types, (tuple, list))
        or len(layer_types) == 0
        or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in layer_types)
    ):
        raise ValueError(
            f"layer_types must be a non-empty tuple of nn.Module classes, got {layer_types!r}; "
            "e.g. layer_types=(nn.Linear, nn.Conv2d)"
        )
    return tuple(layer_types)


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    value = float(value)
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1) (1.0 would remove everything), got {value!r}")
    return value


def _weight_of(module: nn.Module) -> Tensor | None:
    """The weight the forward uses (the masked one when a prune re-parametrisation is on)."""
    w = getattr(module, "weight", None)
    return w if isinstance(w, Tensor) else None


def _smallest_k(scores: Tensor, k: int) -> Tensor:
    """Bool mask (same shape as 1-D ``scores``) of exactly ``k`` smallest entries.

    Ties at the threshold are broken by position (earlier index pruned first) so the
    result is deterministic and the count exact even when many weights are equal
    (e.g. already-zero weights). O(n) via kthvalue instead of a full sort.
    """
    n = scores.numel()
    chosen = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return chosen
    if k >= n:
        return ~chosen
    thr = torch.kthvalue(scores, k).values
    below = scores < thr
    need = k - int(below.sum())
    chosen |= below
    ties = (scores == thr).nonzero().flatten()[:need]
    chosen[ties] = True
    return chosen


# --------------------------------------------------------------------------- unstructured


def magnitude_masks(
    model: nn.Module,
    sparsity: float,
    scope: str = "layer",
    layer_types: Sequence[type] = (nn.Linear, nn.Conv2d),
    skip: Sequence[str] = (),
) -> dict[str, Tensor]:
    """Magnitude pruning masks (Han et al. 2015, "Learning both Weights and Connections").

    For every module of ``layer_types`` (not named in ``skip``) with weight ``W`` of any
    shape (Linear ``(F_out, F_in)``, Conv2d ``(C_out, C_in/groups, kH, kW)``), returns a
    bool mask ``M`` of the same shape with ``M = 0`` on the pruned weights:

    * ``scope="layer"``: per layer, exactly ``k_l = round(sparsity * W_l.numel())`` zeros,
      the ``k_l`` smallest ``|W_l|``.
    * ``scope="global"``: one threshold over all chosen layers: exactly
      ``k = round(sparsity * sum_l W_l.numel())`` zeros, the ``k`` smallest ``|w|`` of the
      concatenation, so layers with small weights lose more.

    Ties are broken by position (layer order, then flattened index), so the count is
    exact and the result deterministic. Magnitudes are taken from ``module.weight``, the
    *masked* weight when masks are already applied, so already-pruned weights (exact 0)
    are chosen first and a rising sparsity gives nested masks.

    Args:
        model: the network; names are those of ``model.named_modules()``.
        sparsity: fraction in ``[0, 1)`` of weights to zero.
        scope: ``"layer"`` or ``"global"``.
        layer_types: module classes to prune.
        skip: module names to leave dense (e.g. the first conv or the classifier).

    Returns:
        ``{module_name: bool Tensor shaped like module.weight}``, True = keep.
    """
    _check_model(model)
    sparsity = _check_fraction("sparsity", sparsity)
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    layer_types = _check_layer_types(layer_types)
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise ValueError(f"skip must be a sequence of module names, got {skip!r}; write skip=('fc',) not skip='fc'")

    candidates = {name: m for name, m in model.named_modules()
                  if isinstance(m, layer_types) and _weight_of(m) is not None}
    unknown = [s for s in skip if s not in candidates]
    if unknown:
        hints = {s: difflib.get_close_matches(s, list(candidates), n=1) for s in unknown}
        raise ValueError(
            f"skip names {unknown} are not prunable layers of the model "
            f"(closest: {hints}); use names from model.named_modules()"
        )
    chosen = {n: m for n, m in candidates.items() if n not in set(skip)}
    if not chosen:
        raise ValueError(
            f"no module of layer_types={tuple(t.__name__ for t in layer_types)} left to prune; "
            "check layer_types and skip"
        )

    scores: dict[str, Tensor] = {}
    for name, m in chosen.items():
        w = _weight_of(m).detach()
        if not torch.isfinite(w).all():
            raise ValueError(f"weights of module {name!r} contain NaN/inf; magnitudes are undefined")
        scores[name] = w.abs().flatten().float()

    if scope == "layer":
        return {
            name: ~_smallest_k(s, round(sparsity * s.numel())).view_as(_weight_of(chosen[name]))
            for name, s in scores.items()
        }

    # Global: concatenate on one device (layers may live on different ones).
    device = next(iter(scores.values())).device
    flat = torch.cat([s.to(device) for s in scores.values()])
    pruned = _smallest_k(flat, round(sparsity * flat.numel()))
    masks: dict[str, Tensor] = {}
    offset = 0
    for name, s in scores.items():
        w = _weight_of(chosen[name])
        masks[name] = (~pruned[offset : offset + s.numel()]).view(w.shape).to(w.device)
        offset += s.numel()
    return masks


def _has_weight_reparam(module: nn.Module) -> bool:
    return any(
        isinstance(h, torch_prune.BasePruningMethod) and h._tensor_name == "weight"
        for h in module._forward_pre_hooks.values()
    )


def apply_masks_(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Install weight masks in place with ``torch.nn.utils.prune.custom_from_mask``.

    Each named module's ``weight`` becomes ``weight = weight_orig * weight_mask``
    (shapes equal to the old weight), recomputed by a forward pre-hook, so however the
    optimizer moves ``weight_orig`` (momentum, Adam, weight decay) the forward and
    ``module.weight`` see exact zeros at masked positions; the gradient reaching
    ``weight_orig`` is also masked (``dL/dW_orig = dL/dW * M``).

    Calling it again on a masked module *replaces* the mask: the old re-parametrisation
    is first made permanent with ``prune.remove`` (old zeros baked into the weights),
    then the new mask is installed. The ``Parameter`` object is kept throughout
    (``prune`` re-registers it as ``weight_orig``), so an existing optimizer keeps
    working. Weights the new mask un-masks restart from 0.

    Note: while masked, ``state_dict`` holds ``weight_orig``/``weight_mask``; call
    :func:`remove_masks_` before saving a checkpoint meant for an unmasked model.

    Args:
        model: the network, modified in place.
        masks: ``{module_name: mask shaped like module.weight}`` (bool or 0/1 float),
            e.g. from :func:`magnitude_masks`; 1/True = keep.
    """
    _check_model(model)
    if not isinstance(masks, dict):
        raise ValueError(f"masks must be a dict {{module_name: mask}}, got {type(masks).__name__}")
    modules = dict(model.named_modules())
    # Validate everything before touching anything, so a bad entry leaves the model as it was.
    for name, mask in masks.items():
        if name not in modules:
            close = difflib.get_close_matches(str(name), list(modules), n=1)
            raise ValueError(f"masks key {name!r} is not a module of the model (closest: {close})")
        w = _weight_of(modules[name])
        if w is None:
            raise ValueError(f"masks key {name!r}: module has no weight tensor to mask")
        if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(w.shape):
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"masks[{name!r}] must have the weight's shape {tuple(w.shape)}, got {got}")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"masks[{name!r}] must be binary (0/1 or bool)")
    for name, mask in masks.items():
        module = modules[name]
        if _has_weight_reparam(module):
            torch_prune.remove(module, "weight")
        w = module.weight
        torch_prune.custom_from_mask(module, "weight", mask.to(device=w.device, dtype=w.dtype))


def remove_masks_(model: nn.Module) -> None:
    """Make installed weight masks permanent, in place (``torch.nn.utils.prune.remove``).

    For every module re-parametrised by :func:`apply_masks_` (or any ``torch.nn.utils.prune``
    method on ``weight``): ``weight <- weight_orig * weight_mask`` becomes a plain
    ``Parameter`` again (same object, so optimizers stay valid); ``weight_orig``,
    ``weight_mask`` and the pre-hook disappear, so the ``state_dict`` loads into an
    unmasked model. Pruned weights stay exactly zero until trained again.
    """
    _check_model(model)
    for module in model.modules():
        if _has_weight_reparam(module):
            torch_prune.remove(module, "weight")


def sparsity(model: nn.Module, layer_types: Sequence[type] = (nn.Linear, nn.Conv2d)) -> float:
    """Fraction of exactly-zero weights among the modules of ``layer_types``.

    ``s = sum_l #{w in W_l : w == 0} / sum_l numel(W_l)``, read from ``module.weight``,
    i.e. the masked weight when masks are installed (as refreshed by the last forward or
    by :func:`apply_masks_`). Biases are not counted (Han et al. 2015 report weights).
    """
    _check_model(model)
    layer_types = _check_layer_types(layer_types)
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, layer_types) and (w := _weight_of(m)) is not None:
            zeros += int((w.detach() == 0).sum())
            total += w.numel()
    if total == 0:
        raise ValueError(
            f"model has no weights of layer_types={tuple(t.__name__ for t in layer_types)}; "
            "pass the layer classes it uses"
        )
    return zeros / total


class MagnitudePruner:
    """Unstructured magnitude pruning with the same interface as :class:`ChannelPruner`, for a training loop.

    :meth:`mask_` picks, per layer, the ``round(ratio * numel)`` smallest ``|w|`` of every Linear and Conv
    weight (:func:`magnitude_masks`, ``scope="layer"``; the classifier, the last ``nn.Linear``, stays dense
    as with channel pruning) and zeroes them in place; :meth:`reapply_masks_` re-zeroes them after every
    optimizer step. Unlike :func:`apply_masks_` it does not re-parametrise the weights
    (``weight_orig``/``weight_mask``), so state dicts keep their keys and a checkpoint loads into a fresh
    model. Already-zero weights are the smallest, so a rising ratio gives nested masks, and calling
    :meth:`mask_` again at the same ratio keeps the same mask (a fine-tune phase holds it that way).

    :meth:`remove_` returns an empty plan: nothing is removed, the model keeps its dense shapes and its dense
    latency; only its sparsity (and a sparse encoding's size) changes.

    Attributes:
        masked: ``{layer_name: [sha256 of its mask]}`` (cheap to compare across ranks).
        ratio: the highest ratio passed to :meth:`mask_` so far.
    """

    def __init__(self, model: nn.Module, skip: Sequence[str] | None = None) -> None:
        _check_model(model)
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if skip is None:
            linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            skip = linears[-1:]
        self.model, self.skip = model, tuple(skip)
        if not [n for n in names if n not in self.skip]:
            raise ValueError("model has no Linear or Conv2d layer to prune besides the classifier")
        self.masks: dict[str, Tensor] = {}
        self.masked: dict[str, list[str]] = {}
        self.ratio = 0.0

    @torch.no_grad()
    def mask_(self, ratio: float) -> dict:
        """Zero the ``round(ratio * numel)`` smallest-magnitude weights of every pruned layer; returns
        ``{"ratio", "masked_weights", "total_weights"}``."""
        import hashlib

        ratio = _check_fraction("ratio", ratio)
        self.masks = magnitude_masks(self.model, ratio, scope="layer", skip=self.skip)
        self.masked = {n: [hashlib.sha256(m.cpu().numpy().tobytes()).hexdigest()] for n, m in self.masks.items()}
        self.ratio = max(self.ratio, ratio)
        self.reapply_masks_()
        return {"ratio": ratio, "masked_weights": sum(int((~m).sum()) for m in self.masks.values()),
                "total_weights": sum(m.numel() for m in self.masks.values())}

    @torch.no_grad()
    def reapply_masks_(self) -> None:
        """Re-zero the masked weights in place (Adam moments and weight decay move them); after every step."""
        modules = dict(self.model.named_modules())
        for name, mask in self.masks.items():
            w = modules[name].weight
            if mask.device != w.device:
                self.masks[name] = mask = mask.to(w.device)
            w.mul_(mask)

    def remove_(self) -> list[dict]:
        """Nothing to remove physically: the masked weights stay in place as zeros. Returns the empty plan."""
        self.reapply_masks_()
        return []


# --------------------------------------------------------------------------- structured


def _build_graph(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    """Trace ``model`` into a DependencyGraph without side effects on its train/eval flags.

    Torch-Pruning's tracer calls ``model.eval()`` (so BatchNorm running stats are not
    updated by the dummy forward) and needs autograd on; both are restored/forced here.
    """
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.enable_grad():
            return _tp().DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    finally:
        for m, training in modes.items():
            m.training = training


def _is_depthwise(conv: nn.Module) -> bool:
    # Same rule as tp.ops.module2type, so our "kind" matches the pruner tp picks.
    return conv.groups == conv.out_channels and conv.out_channels > 1


def _zero_slices(module: nn.Module, handler: Any) -> list[tuple[str, int]] | None:
    """Which ``(parameter_name, dim)`` slices carry the channel for this group item.

    Output side (the layer produces the channel): conv/linear weight rows and bias,
    BatchNorm/InstanceNorm gamma and beta, Embedding columns. Input side (the layer
    consumes it): conv/linear weight columns. Zeroing both sides makes the masked model
    compute what the pruned one computes even if a non-linearity with f(0) != 0 sat in
    between: the consumer ignores whatever value the channel carries.

    Returns None for layers whose masked and pruned forms would differ (statistics over
    channels: LayerNorm, GroupNorm; or layouts not handled: grouped convs, LSTM, MHA,
    bare Parameters), so the caller can refuse the group.
    """
    in_side = getattr(getattr(handler, "__func__", handler), "__name__", "") == "prune_in_channels"
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = _is_depthwise(module)
        if module.groups != 1 and not depthwise:
            return None  # channel<->weight layout of grouped convs needs per-group index patterns
        if in_side and not depthwise:
            return [("weight", 0 if module.transposed else 1)]
        slices = [("weight", 1 if module.transposed and not depthwise else 0)]
        return slices + ([("bias", 0)] if module.bias is not None else [])
    if isinstance(module, nn.Linear):
        if in_side:
            return [("weight", 1)]
        return [("weight", 0)] + ([("bias", 0)] if module.bias is not None else [])
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        # gamma = beta = 0 makes the normalised channel exactly 0 in train and eval mode;
        # per-channel statistics mean the other channels are unaffected.
        return [("weight", 0), ("bias", 0)] if module.affine else []
    if isinstance(module, nn.PReLU):
        return []  # per-channel slope; PReLU(0) = 0 and consumers ignore the channel anyway
    if isinstance(module, nn.Embedding):
        return [("weight", 1)]
    if isinstance(module, _tp_dummy_ops()):
        return []
    return None


class ChannelPruner:
    """Structured channel pruning on Torch-Pruning's DependencyGraph (Fang et al. 2023).

    Workflow (progressive, as in Zhu & Gupta 2017 but on channels)::

        pruner = ChannelPruner(model, torch.randn(1, 3, 32, 32), importance="l1")
        for step in ...:
            if step % every == 0:
                pruner.mask_(sparsity_schedule(step, total, final=0.5))
            loss.backward(); opt.step()
            pruner.reapply_masks_()          # after every optimizer step
        plan = pruner.remove_()              # physically smaller model + JSON-able plan

    The graph groups every layer slice coupled to a channel (producer conv/linear, its
    BatchNorm, residual partners joined by ``+``, consumers' input columns, flatten
    mappings, ...). One group = one set of ``N`` channels that must be kept or removed
    together; its root is the first producing conv/linear found by tp.

    Importance of channel ``c`` in a group (scores averaged over the group's layers,
    ``group_reduction="mean"``, no normaliser since ranking is within one group):

    * ``"l1"``: ``sum |w|`` over the group's slices of channel ``c`` — the filter L1 norm of
      Li et al. 2017 ("Pruning Filters for Efficient ConvNets") extended to the whole
      dependency group as in DepGraph (``tp.importance.GroupMagnitudeImportance(p=1)``).
    * ``"bn_scale"``: ``|gamma_c|`` of the group's BatchNorms — network slimming, Liu et al.
      2017 (``tp.importance.BNScaleImportance``). Groups without an affine BatchNorm are
      not prunable with it.
    * ``"taylor"``: ``sum |w * dL/dw|`` — first-order Taylor, Molchanov et al. 2019
      ("Importance Estimation for Neural Network Pruning")
      (``tp.importance.GroupTaylorImportance``); needs ``.grad`` from a backward pass
      before each :meth:`mask_`.

    Groups that are never pruned (listed in :attr:`skipped` with the reason): those
    touching an ignored layer (by default the last ``nn.Linear``, the classifier), those
    whose pruning would change the model's output shape, and those containing layers
    whose masked form would not equal their pruned form (grouped non-depthwise convs,
    LayerNorm/GroupNorm, LSTM, MHA, bare Parameters).

    Attributes:
        model: the model being pruned (in place).
        graph: the ``tp.DependencyGraph``, built once.
        channels: ``{root_name: N}`` channel count of every prunable group.
        masked: ``{root_name: sorted list of masked channel indices}``.
        skipped: ``{root_name: reason}`` for groups that are never pruned.
        ratio: the highest ratio passed to :meth:`mask_` so far.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        importance: str = "l1",
        ignored_layers: Sequence[nn.Module] | None = None,
        round_to: int | None = None,
    ) -> None:
        """Trace ``model`` once with ``example_inputs`` and list the prunable groups.

        Args:
            model: the network (not a DDP wrapper: pass ``ddp.module``). Its train/eval
                flags are left as they were.
            example_inputs: a tensor, tuple of tensors or dict of kwargs that ``model``
                accepts (batch 1 is enough), on the model's device.
            importance: ``"l1"``, ``"bn_scale"`` or ``"taylor"`` (see class docstring).
            ignored_layers: modules (and their submodules) whose output channels must not
                change. ``None``: the last ``nn.Linear`` of ``model.modules()`` (the
                classifier). Output-producing layers are protected in any case.
            round_to: keep a multiple of ``round_to`` channels per group (tensor-core
                friendly widths), like tp's ``round_to``; ``None`` = no rounding.
        """
        _check_model(model)
        if importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"round_to must be a positive int or None, got {round_to!r}")
        self._classifier = None  # the default ignored layer: the report names it as the classifier
        if ignored_layers is None:
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            ignored_layers = linears[-1:]
            self._classifier = linears[-1] if linears else None
        elif isinstance(ignored_layers, nn.Module) or not all(isinstance(m, nn.Module) for m in ignored_layers):
            raise ValueError(
                "ignored_layers must be a sequence of nn.Module (e.g. [model.fc]) or None, "
                f"got {ignored_layers!r}"
            )
        self.model = model
        self.importance = importance
        self.round_to = round_to
        self._ignored: list[nn.Module] = [sub for m in ignored_layers for sub in m.modules()]
        self._names = {m: n for n, m in model.named_modules()}
        # Linear layers inside an attention module (one with an int ``num_heads``: timm's ViT ``Attention``):
        # their output is reshaped into heads, so removing some of its channels breaks the reshape (Torch-Pruning
        # removes whole heads with its ``num_heads`` option, which this pruner does not wire); never pruned.
        self._head_split = {sub: getattr(m, "num_heads") for m in model.modules()
                            if isinstance(getattr(m, "num_heads", None), int) for sub in m.modules()
                            if isinstance(sub, nn.Linear)}
        tp = _tp()
        if importance == "l1":
            self._scorer = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer=None)
        elif importance == "bn_scale":
            self._scorer = tp.importance.BNScaleImportance(group_reduction="mean", normalizer=None)
        else:
            self._scorer = tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None)

        self.graph = _build_graph(model, example_inputs)
        self._roots: dict[str, nn.Module] = {}  # root name -> producing conv/linear, tp order
        self.channels: dict[str, int] = {}
        self.masked: dict[str, list[int]] = {}
        self.skipped: dict[str, str] = {}
        # Per group: [(module, param_name, dim, idx tensor)] to zero; rebuilt by mask_.
        self._zero_plan: dict[str, list[list]] = {}
        self.ratio = 0.0  # highest ratio applied so far
        self._removed = False

        # Ignored layers are checked here rather than passed to get_all_groups (which would
        # drop those groups silently) so that skipped lists every unprunable group.
        ignored = set(self._ignored)
        for group in self.graph.get_all_groups(root_module_types=(_tp().ops.TORCH_CONV, _tp().ops.TORCH_LINEAR)):
            root = group[0].dep.target.module
            name = self._names[root]
            reason = self._unprunable_reason(group, ignored)
            if reason is not None:
                self.skipped[name] = reason
                continue
            self._roots[name] = root
            self.channels[name] = self.graph.get_out_channels(root)
            self.masked[name] = []

    def _unprunable_reason(self, group: Any, ignored: set[nn.Module]) -> str | None:
        for item in group:
            node, handler, module = item.dep.target, item.dep.handler, item.dep.target.module
            # Same rule as tp's get_all_groups: an ignored layer must keep its *output*
            # width; consuming fewer input channels is fine (that is how the classifier
            # shrinks its input while its output stays).
            if module in ignored and self.graph.is_out_channel_pruning_fn(handler):
                name = self._names.get(module, type(module).__name__)
                if module is self._classifier:
                    return f"the classifier {name!r} (the last Linear: its outputs are the class logits)"
                return f"ignored layer {name!r}"
            if module in self._head_split and self.graph.is_out_channel_pruning_fn(handler):
                return (f"attention projection {self._names.get(module)!r} feeds {self._head_split[module]} heads "
                        "(removing some of its channels breaks the head reshape)")
            # A node with no consumers in the trace produces a model output: pruning its
            # output side would change the output shape (the classifier, a conv head...).
            if len(node.outputs) == 0 and self.graph.is_out_channel_pruning_fn(handler):
                return f"changes the model output ({self._names.get(module, type(module).__name__)})"
            if _zero_slices(module, handler) is None:
                what = self._names.get(module) or type(module).__name__
                return f"contains {type(module).__name__} {what!r} that channel masking cannot represent exactly"
        if self.importance == "bn_scale" and not any(
            isinstance(it.dep.target.module, nn.modules.batchnorm._BatchNorm) and it.dep.target.module.affine
            for it in group
        ):
            return "no affine BatchNorm in the group (bn_scale importance undefined)"
        return None

    # ------------------------------------------------------------------ masking

    def _n_to_mask(self, ratio: float, n: int) -> int:
        k = round(ratio * n)  # Python round: half to even, same as the tests' round()
        if self.round_to is not None:
            keep = n - k
            keep = max(keep - keep % self.round_to, min(self.round_to, n))
            k = n - keep
        return min(k, n - 1)  # keep >= 1 channel: a zero-width layer breaks the network

    def _scores(self, name: str) -> Tensor:
        root = self._roots[name]
        n = self.channels[name]
        group = self.graph.get_pruning_group(root, self._root_fn(root), list(range(n)))
        if self.importance == "taylor":
            missing = [
                self._names.get(it.dep.target.module, "?")
                for it in group
                if isinstance(it.dep.target.module, (_tp().ops.TORCH_CONV, _tp().ops.TORCH_LINEAR))
                and it.dep.target.module.weight.grad is None
            ]
            if missing:
                raise ValueError(
                    f"importance='taylor' needs gradients but {missing} have .grad None; "
                    "run loss.backward() before mask_() (and do not zero_grad in between)"
                )
        scores = self._scorer(group)
        if scores is None or scores.numel() != n:
            raise RuntimeError(f"importance {self.importance!r} gave no score for group {name!r}")
        return scores.detach().float().cpu()

    @staticmethod
    def _root_fn(root: nn.Module) -> Any:
        return getattr(_tp(), PLAN_KINDS[_root_kind(root)])

    def mask_(self, ratio: float) -> dict:
        """Zero the lowest-importance ``round(ratio * N)`` channels of every prunable group.

        Per group (local ratio, like tp's ``pruning_ratio``; at least one channel kept,
        ``round_to`` applied to the kept count), channels are ranked by the chosen
        importance and the lowest are zeroed in place across the whole dependency group:
        producer rows and biases, BatchNorm gamma *and* beta (so its output is exactly 0),
        depthwise rows, and the consumers' input columns. Hence the masked model computes
        what the physically pruned model (:meth:`remove_`) computes.

        Masks only grow: channels masked before stay masked and the extra channels for a
        higher ratio are picked among the unmasked ones (the selection is a superset). A
        ratio lower than a previous one keeps the existing masks.

        Args:
            ratio: fraction in ``[0, 1)`` of each group's channels to mask.

        Returns:
            ``{"ratio": ratio, "masked_channels": n, "total_channels": N}`` summed over the
            prunable groups.
        """
        if self._removed:
            raise RuntimeError("remove_() was already called; build a new ChannelPruner on the pruned model")
        ratio = _check_fraction("ratio", ratio)
        for name, root in self._roots.items():
            n = self.channels[name]
            have = self.masked[name]
            k = max(self._n_to_mask(ratio, n), len(have))
            if k > len(have):
                scores = self._scores(name)
                taken = torch.zeros(n, dtype=torch.bool)
                taken[have] = True
                free = (~taken).nonzero().flatten()
                # stable sort: equal scores resolved by channel index -> deterministic
                order = torch.argsort(scores[free], stable=True)
                extra = free[order[: k - len(have)]].tolist()
                self.masked[name] = sorted(have + extra)
                self._zero_plan[name] = self._group_slices(root, self.masked[name])
        self.ratio = max(self.ratio, ratio)
        self.reapply_masks_()
        return {
            "ratio": ratio,
            "masked_channels": sum(len(v) for v in self.masked.values()),
            "total_channels": sum(self.channels.values()),
        }

    def _group_slices(self, root: nn.Module, idxs: list[int]) -> list[list]:
        """``[[module, param_name, dim, idx LongTensor], ...]`` to zero for these root channels."""
        group = self.graph.get_pruning_group(root, self._root_fn(root), idxs)
        out = []
        for item in group:
            module = item.dep.target.module
            idx = torch.as_tensor(sorted(set(int(i) for i in item.idxs)), dtype=torch.long)
            for pname, dim in _zero_slices(module, item.dep.handler) or []:
                out.append([module, pname, dim, idx])
        return out

    @torch.no_grad()
    def reapply_masks_(self) -> None:
        """Re-zero every masked slice in place; call after each optimizer step.

        Masked producer rows get zero gradient (nothing downstream reads the channel),
        but BatchNorm gamma/beta and the consumers' input columns can get non-zero
        gradients, and momentum, Adam moments and weight decay can move any masked
        entry. Re-zeroing after every step is enough: the forward never sees a revived
        value, and the stale optimizer state only touches slices that stay zero and are
        finally removed. Cost: one ``index_fill_`` per masked tensor.
        """
        if self._removed:
            return
        for slices in self._zero_plan.values():
            for entry in slices:
                module, pname, dim, idx = entry
                p = getattr(module, pname)
                if idx.device != p.device:  # model moved after mask_: move the index once, not every step
                    entry[3] = idx = idx.to(p.device)
                p.index_fill_(dim, idx, 0)

    # ------------------------------------------------------------------ removal

    def remove_(self) -> list[dict]:
        """Physically remove the masked channels with Torch-Pruning; return the plan.

        For each group with masked channels, in a fixed order:
        ``graph.get_pruning_group(root, tp.prune_conv_out_channels | ..., idxs).prune()``,
        which slices every coupled parameter (and its ``.grad``) and fixes
        ``in/out_channels``/``num_features``. Parameters are *new objects* afterwards:
        rebuild the optimizer. Module names do not change.

        Returns:
            The pruning plan, a JSON-serialisable list of
            ``{"module": root_name, "kind": "conv_out"|"depthwise_conv_out"|"linear_out",
            "idxs": [int, ...]}`` in application order; :func:`apply_pruning_plan_` replays
            it on a freshly built model so ``load_state_dict`` of the pruned weights works.
        """
        if self._removed:
            raise RuntimeError("remove_() was already called on this ChannelPruner")
        self.reapply_masks_()  # removed slices are zero anyway; kept ones are untouched
        plan: list[dict] = []
        for name, root in self._roots.items():
            idxs = self.masked[name]
            if not idxs:
                continue
            kind = _root_kind(root)
            group = self.graph.get_pruning_group(root, getattr(_tp(), PLAN_KINDS[kind]), idxs)
            if not self.graph.check_pruning_group(group):
                raise RuntimeError(f"pruning {len(idxs)} channels of {name!r} would leave a layer empty")
            group.prune()
            plan.append({"module": name, "kind": kind, "idxs": [int(i) for i in idxs]})
        self._removed = True
        self._zero_plan.clear()
        return plan


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _root_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear_out"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "depthwise_conv_out" if _is_depthwise(module) else "conv_out"
    raise ValueError(f"cannot root a pruning group at {type(module).__name__}; only conv/linear layers")


def apply_pruning_plan_(model: nn.Module, plan: Iterable[dict], example_inputs: Any) -> nn.Module:
    """Replay a pruning plan from :meth:`ChannelPruner.remove_` on a fresh model, in place.

    Builds a DependencyGraph on ``model`` (same architecture and factory as the model
    the plan came from, Fang et al. 2023) and for each entry, in order, prunes
    ``idxs`` of module ``entry["module"]`` with the root function of ``entry["kind"]``,
    letting the graph propagate to the coupled layers exactly as the original removal
    did. Afterwards the shapes match the pruned model, so a checkpoint saved as
    ``pruned.state_dict()`` loads with ``torch.load(path, weights_only=True)`` and
    ``load_state_dict`` — no pickled modules needed.

    Args:
        model: freshly built, unpruned network (its weights are irrelevant).
        plan: list of ``{"module": str, "kind": str, "idxs": [int]}``.
        example_inputs: inputs ``model`` accepts, as for :class:`ChannelPruner`.

    Returns:
        ``model`` itself, now pruned.
    """
    _check_model(model)
    if isinstance(plan, (str, bytes, dict)) or not isinstance(plan, Iterable):
        raise ValueError(f"plan must be a list of dicts from ChannelPruner.remove_(), got {type(plan).__name__}")
    plan = list(plan)
    modules = dict(model.named_modules())
    for i, entry in enumerate(plan):
        if not isinstance(entry, dict) or set(entry) != {"module", "kind", "idxs"}:
            raise ValueError(f"plan[{i}] must be a dict with keys 'module', 'kind', 'idxs', got {entry!r}")
        if entry["module"] not in modules:
            raise ValueError(
                f"plan[{i}]['module']={entry['module']!r} is not in the model; "
                "build the model with the same factory/arguments as the pruned one"
            )
        if entry["kind"] not in PLAN_KINDS:
            raise ValueError(f"plan[{i}]['kind'] must be one of {tuple(PLAN_KINDS)}, got {entry['kind']!r}")
        if _root_kind(modules[entry["module"]]) != entry["kind"]:
            raise ValueError(
                f"plan[{i}]['kind']={entry['kind']!r} does not fit module {entry['module']!r} "
                f"(a {type(modules[entry['module']]).__name__}); the model does not match the plan"
            )
        idxs = entry["idxs"]
        n = _out_channels(modules[entry["module"]])
        if (
            not isinstance(idxs, (list, tuple))
            or not all(isinstance(j, int) and not isinstance(j, bool) for j in idxs)
            or len(set(idxs)) != len(idxs)
            or any(j < 0 or j >= n for j in idxs)
            or len(idxs) >= n
        ):
            raise ValueError(
                f"plan[{i}]['idxs'] must be distinct ints in [0, {n}) leaving >= 1 channel, got {idxs!r}"
            )
    graph = _build_graph(model, example_inputs)
    for entry in plan:
        if not entry["idxs"]:
            continue
        root = modules[entry["module"]]
        group = graph.get_pruning_group(root, getattr(_tp(), PLAN_KINDS[entry["kind"]]), list(entry["idxs"]))
        group.prune()
    return model


# --------------------------------------------------------------------------- schedule


def sparsity_schedule(
    step: int,
    total_steps: int,
    final: float,
    schedule: str = "cubic",
    initial: float = 0.0,
    start: int = 0,
    end: int | None = None,
) -> float:
    """Target sparsity (or channel ratio) at ``step`` — Zhu & Gupta 2017, "To prune, or not to prune".

    With ``t0 = start``, ``t1 = end`` (default ``total_steps``), ``s_i = initial``,
    ``s_f = final`` and ``x = (t - t0) / (t1 - t0)`` clipped to ``[0, 1]``:

    * ``"cubic"``:   ``s_t = s_f + (s_i - s_f) * (1 - x)^3`` (the paper's gradual schedule:
      prune fast while the network is redundant, slowly near the target);
    * ``"linear"``:  ``s_t = s_i + (s_f - s_i) * x``;
    * ``"oneshot"``: ``s_i`` before ``t0``, ``s_f`` from ``t0`` on.

    So ``s_t = s_i`` for ``t <= t0`` and ``s_f`` for ``t >= t1``; the cubic midpoint is
    ``s_f - (s_f - s_i) / 8``.

    Args:
        step: current step ``t >= 0``.
        total_steps: length of training, ``>= 1``.
        final: target ``s_f`` in ``[0, 1)``.
        schedule: ``"oneshot"``, ``"linear"`` or ``"cubic"``.
        initial: starting ``s_i`` in ``[0, final]``.
        start, end: pruning window ``0 <= start < end <= total_steps``.

    Returns:
        The sparsity ``s_t`` as a float.
    """

    def _int(name: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int, got {v!r}")
        return v

    step, total_steps, start = _int("step", step), _int("total_steps", total_steps), _int("start", start)
    end = total_steps if end is None else _int("end", end)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    final = _check_fraction("final", final)
    initial = _check_fraction("initial", initial)
    if initial > final:
        raise ValueError(f"initial ({initial}) must be <= final ({final}); sparsity only grows")
    if not 0 <= start < end <= total_steps:
        raise ValueError(
            f"need 0 <= start < end <= total_steps, got start={start}, end={end}, total_steps={total_steps}"
        )
    if schedule == "oneshot":
        return final if step >= start else initial
    # Exact end points (no float round-off from the formula outside the window).
    if step <= start:
        return initial
    if step >= end:
        return final
    x = (step - start) / (end - start)
    if schedule == "linear":
        return initial + (final - initial) * x
    return final + (initial - final) * (1.0 - x) ** 3
