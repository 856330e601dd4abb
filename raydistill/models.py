"""Model registry: built-in small nets, torchvision classifiers, and user factories.

``build_model(name, num_classes, input_shape=(C, H, W), **kwargs)`` resolves ``name`` in this
order (``input_shape`` is one sample's shape: (F,), (C, L) or (C, H, W); the older
``in_channels, image_size`` arguments mean a square image (C, S, S)):

1. a built-in from ``BUILTIN_MODELS`` (plain functions, callable directly);
2. a torchvision classifier (``resnet18``, ``mobilenet_v2``, ...), always with
   ``weights=None`` so nothing is ever downloaded;
3. ``"timm:<name>"``: a timm model (``build_timm``), randomly initialised;
4. a user factory ``"package.module:function"``.

Every failure a user can cause is a ``ModelError`` with a one-line message that names
the problem and the fix.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import math
import re
from collections.abc import Callable, Sequence

from torch import nn

from raydistill.errors import ModelError, UserError

__all__ = [
    "BUILTIN_MODELS",
    "TEACHER_CNN",
    "STUDENT_CNN",
    "build_model",
    "cnn",
    "list_models",
    "mlp",
]

# The two presets used for the default digits data (1x8x8, 10 classes). The teacher
# costs ~15x the student's MACs, enough for distillation to have something to close.
TEACHER_CNN = {"widths": (64, 128), "hidden": 256}
STUDENT_CNN = {"widths": (16, 32), "hidden": 64}


def _check_dims(num_classes: int, in_channels: int, image_size: int) -> None:
    for label, value in (
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("image_size", image_size),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelError(f"{label} must be a positive integer, got {value!r}")


def input_dims(input_shape: Sequence[int]) -> dict:
    """What a model builder may ask for, from one sample's shape: ``input_shape`` itself, ``in_channels``
    (C; 1 for a feature vector) and ``image_size`` (S of a square image (C, S, S), else None)."""
    shape = tuple(int(s) for s in input_shape)
    square = len(shape) == 3 and shape[1] == shape[2]
    return {"in_channels": shape[0] if len(shape) > 1 else 1, "image_size": shape[1] if square else None,
            "input_shape": shape}


def _check_shape(num_classes: int, input_shape) -> tuple[int, ...]:
    _check_dims(num_classes, 1, 1)
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if not 1 <= len(shape) <= 3 or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in shape):
        raise ModelError(f"input_shape must be 1 to 3 positive integers, got {input_shape!r}")
    return shape


def _needs_image(name: str, input_shape: tuple[int, ...] | None) -> tuple[int, int, int] | None:
    if input_shape is not None and len(input_shape) != 3:
        raise ModelError(f"model {name!r} takes images (C, H, W) but the samples have shape {tuple(input_shape)}; "
                         "use the built-in 'mlp' or a model of your own ('package.module:function')")
    return input_shape


def _positive_ints(label: str, values: int | Sequence[int]) -> tuple[int, ...]:
    """Normalize ``values`` (an int or a sequence of ints) to a tuple of positive ints."""
    values = (values,) if isinstance(values, int) else tuple(values)
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
        raise ModelError(f"{label} must be positive integers, got {values!r}")
    return values


def _check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ModelError(f"dropout must be in [0, 1), got {dropout!r}")


def cnn(
    num_classes: int,
    in_channels: int,
    image_size: int | None,
    widths: Sequence[int] = (32, 64),
    hidden: int = 128,
    dropout: float = 0.0,
    input_shape: Sequence[int] | None = None,
) -> nn.Module:
    """Small VGG-style CNN: input (B, in_channels, S, S), or (B, C, H, W) given ``input_shape`` (C, H, W),
    -> logits (B, num_classes).

    One block per entry of ``widths``: Conv3x3(pad 1)-BN-ReLU, followed by MaxPool2d(2)
    while the spatial size is >= 2 (8x8 input: 8 -> 4 -> 2). Then flatten (keeps the
    spatial detail that tiny images need; the MACs of the first Linear are counted),
    Linear(hidden)-ReLU-Dropout-Linear(num_classes).

    Presets for the default digits data (1x8x8, 10 classes):
    teacher ``cnn(10, 1, 8, widths=(64, 128), hidden=256)`` (``TEACHER_CNN``) and
    student ``cnn(10, 1, 8, widths=(16, 32), hidden=64)`` (``STUDENT_CNN``); the teacher
    costs about 15x the student's MACs.
    """
    shape = _needs_image("cnn", input_shape) or (in_channels, image_size, image_size)
    _check_dims(num_classes, *shape[:2])
    _check_dims(num_classes, 1, shape[2])
    widths = _positive_ints("widths", widths)
    if not widths:
        raise ModelError("widths must name at least one block width, e.g. widths=(32, 64)")
    (hidden,) = _positive_ints("hidden", hidden)
    _check_dropout(dropout)
    layers: list[nn.Module] = []
    channels, height, width_px = shape
    for width in widths:
        layers += [
            nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        if min(height, width_px) >= 2:
            layers.append(nn.MaxPool2d(2))
            height, width_px = height // 2, width_px // 2
        channels = width
    layers += [
        nn.Flatten(),
        nn.Linear(channels * height * width_px, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    ]
    return nn.Sequential(*layers)


def mlp(
    num_classes: int,
    in_channels: int,
    image_size: int | None,
    hidden: int | Sequence[int] = (256,),
    dropout: float = 0.0,
    input_shape: Sequence[int] | None = None,
) -> nn.Module:
    """Multi-layer perceptron for samples of any shape: input (B, *input_shape), or (B, in_channels, S, S)
    without it, -> logits (B, num_classes).

    Flatten, then Linear-ReLU-Dropout per entry of ``hidden`` (an int means one hidden
    layer; ``()`` gives a linear classifier), then Linear(num_classes).
    """
    shape = tuple(input_shape) if input_shape is not None else (in_channels, image_size, image_size)
    _check_shape(num_classes, shape)
    hidden = _positive_ints("hidden", hidden)
    _check_dropout(dropout)
    layers: list[nn.Module] = [nn.Flatten()]
    features = math.prod(shape)
    for width in hidden:
        layers += [nn.Linear(features, width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {"cnn": cnn, "mlp": mlp}


def _torchvision_names() -> list[str]:
    import torchvision  # only when a torchvision model is asked for: importing it costs seconds at start-up

    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_models() -> list[str]:
    """Names accepted by ``build_model`` (built-ins, then torchvision classifiers).

    User factories ``"package.module:function"`` are accepted too but cannot be listed.
    """
    return list(BUILTIN_MODELS) + _torchvision_names()


def _unexpected_kwarg(error: TypeError) -> str | None:
    """The keyword a ``TypeError`` complains about, if its message names one."""
    match = re.search(r"unexpected keyword argument '([^']+)'", str(error))
    return match.group(1) if match else None


def _call(fn: Callable[..., nn.Module], what: str, kwargs: dict) -> nn.Module:
    """Call ``fn(**kwargs)``, turning bad options into a one-line ``ModelError``.

    Options that ``fn``'s signature visibly rejects are reported before calling, with
    the accepted ones listed; a ``TypeError`` raised by the call itself (e.g. deep in a
    torchvision constructor that takes ``**kwargs``) is reported with its message.
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins / C callables without a signature
        params = None
    if params is not None and not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    ):
        unknown = sorted(k for k in kwargs if k not in params)
        if unknown:
            accepted = ", ".join(
                n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL
            )
            raise ModelError(
                f"model {what} does not accept option(s) {', '.join(unknown)}; "
                f"use only: {accepted}"
            )
    try:
        return fn(**kwargs)
    except UserError:
        raise
    except ValueError as error:  # the factory's own check of its options (a user factory's included)
        raise ModelError(f"model {what} rejected its options "
                         f"({str(error).splitlines()[0] if str(error) else error!r}); "
                         "fix the model options") from error
    except TypeError as error:
        bad = _unexpected_kwarg(error)
        if bad is not None:
            raise ModelError(
                f"model {what} does not accept option {bad!r}; remove it from the model options"
            ) from error
        raise ModelError(
            f"model {what} rejected its options ({error}); fix the model options"
        ) from error


def _set_submodule(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    return None


def _conv_like(conv: nn.Conv2d, *, in_channels: int | None = None, **overrides) -> nn.Conv2d:
    """A fresh Conv2d with ``conv``'s configuration, except for the given overrides."""
    config = {
        "in_channels": conv.in_channels if in_channels is None else in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }
    config.update(overrides)
    return nn.Conv2d(**config)


def _adapt_torchvision(model: nn.Module, name: str, in_channels: int, cifar_stem: bool) -> None:
    """Small-image stem and input-channel surgery on a freshly built torchvision model.

    ``cifar_stem``: ResNet-style models (``conv1`` + ``maxpool``) get a 3x3 stride-1
    pad-1 ``conv1`` and no max-pool, the usual CIFAR variant; other models get stride 1
    in their first convolution (e.g. MobileNet), so 32x32 inputs are not reduced to
    1x1 before the classifier. ``in_channels != 3`` rebuilds the first convolution with
    the same configuration but ``in_channels`` inputs.
    """
    first = _first_conv(model)
    if first is None:
        if in_channels != 3 or cifar_stem:
            raise ModelError(
                f"torchvision model {name!r} has no Conv2d stem to adapt; "
                "use in_channels=3 without cifar_stem, or another model"
            )
        return
    conv_name, conv = first
    if conv.in_channels != 3:
        raise ModelError(
            f"torchvision model {name!r} has an unexpected stem "
            f"({conv.in_channels} input channels); use another model or a user factory"
        )
    resnet_like = isinstance(getattr(model, "conv1", None), nn.Conv2d) and isinstance(
        getattr(model, "maxpool", None), nn.MaxPool2d
    )
    if cifar_stem and resnet_like:
        model.conv1 = _conv_like(
            model.conv1, in_channels=in_channels, kernel_size=3, stride=1, padding=1
        )
        model.maxpool = nn.Identity()
    elif cifar_stem:
        _set_submodule(model, conv_name, _conv_like(conv, in_channels=in_channels, stride=1))
    elif in_channels != 3:
        _set_submodule(model, conv_name, _conv_like(conv, in_channels=in_channels))


def _build_torchvision(
    name: str, num_classes: int, in_channels: int, image_size: int, kwargs: dict
) -> nn.Module:
    kwargs = dict(kwargs)
    cifar_stem = bool(kwargs.pop("cifar_stem", False))
    if kwargs.get("weights") is not None:
        raise ModelError(
            f"pretrained weights are not supported for {name!r} (raydistill never downloads); "
            "drop the weights option and load a checkpoint instead"
        )
    kwargs["weights"] = None
    if name.startswith("vit_") and "image_size" not in kwargs:
        kwargs["image_size"] = image_size  # ViT's position embedding is sized to the input
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    model = _call(builder, repr(name), {"num_classes": num_classes, **kwargs})
    _adapt_torchvision(model, name, in_channels, cifar_stem)
    return model


def _build_factory(spec: str, num_classes: int, input_shape: tuple[int, ...], kwargs: dict) -> nn.Module:
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ModelError(
            f"model {spec!r} is not of the form 'package.module:function'; fix the model name"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelError(
            f"cannot import module {module_name!r} for model {spec!r} ({error}); "
            "install it or add its folder to PYTHONPATH"
        ) from error
    except Exception as error:  # a module that fails while importing (syntax error, ...)
        raise ModelError(
            f"importing module {module_name!r} for model {spec!r} failed "
            f"({type(error).__name__}: {error}); fix that module"
        ) from error
    factory = getattr(module, function_name, None)
    if factory is None or not callable(factory):
        raise ModelError(
            f"module {module_name!r} has no function {function_name!r}; "
            "check the name after ':' in the model name"
        )
    # Pass the data dimensions only to factories that ask for them (by name or **kwargs): num_classes,
    # in_channels, image_size (None unless the samples are square images), input_shape.
    dims = {"num_classes": num_classes, **input_dims(input_shape)}
    try:
        params = inspect.signature(factory).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        dims = {k: v for k, v in dims.items() if takes_any or k in params}
    except (TypeError, ValueError):
        dims = {"num_classes": num_classes}
    model = _call(factory, repr(spec), {**dims, **kwargs})
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module; "
            "make it return the model"
        )
    return model


TIMM_PREFIX = "timm:"
# set from the data, or by teacher.pretrained (models never download while being built)
_TIMM_RESERVED = ("num_classes", "in_chans", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay")


def _timm():
    try:
        import timm
    except ImportError:
        raise ModelError("timm models need the timm package; pip install 'raydistill[timm]'") from None
    return timm


def timm_arch(name: str) -> str:
    """The timm architecture of ``timm:<name>[.<pretrained tag>]``, checked: an unknown name is a ModelError
    with the closest timm names."""
    timm = _timm()
    arch, _ = timm.models.split_model_name_tag(name[len(TIMM_PREFIX):].strip())
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(TIMM_PREFIX + c) for c in close)}?" if close else (
            "timm.list_models('*pattern*') lists the names")
        raise ModelError(f"unknown timm model {arch!r}: {hint}")
    return arch


def build_timm(name: str, num_classes: int, input_shape: tuple[int, ...], kwargs: dict) -> nn.Module:
    """``timm:<name>``: ``timm.create_model(name, pretrained=False, num_classes=K, in_chans=C, **kwargs)``,
    randomly initialised (``teacher.pretrained`` loads weights). ``img_size`` is set from the data for the models
    whose position embeddings are sized by it (ViT-style); a CNN does not take it and is built without."""
    timm = _timm()
    arch = timm_arch(name)
    in_channels, height, width = _needs_image(name, input_shape)
    image_size = height if height == width else (height, width)
    reserved = sorted(k for k in kwargs if k in _TIMM_RESERVED)
    if reserved:
        raise ModelError(f"timm model option(s) {', '.join(reserved)} are set by raydistill (num_classes and "
                         "in_chans from the data, weights by teacher.pretrained); remove them from the kwargs")
    create = functools.partial(timm.create_model, arch, pretrained=False)
    base = {"num_classes": num_classes, "in_chans": in_channels, **kwargs}
    if "img_size" not in kwargs:
        try:
            return _call(create, repr(name), {**base, "img_size": image_size})
        except ModelError as e:  # timm passes unknown options to the model class: a CNN rejects img_size
            if "'img_size'" not in str(e):
                raise
    return _call(create, repr(name), base)


def build_model(
    name: str, num_classes: int, in_channels: int | None = None, image_size: int | None = None, *,
    input_shape: Sequence[int] | None = None, **kwargs
) -> nn.Module:
    """Build a classifier for (B, *input_shape) inputs -> (B, num_classes); without ``input_shape``,
    for square images (B, in_channels, image_size, image_size).

    ``name`` is a built-in (``cnn`` for images, ``mlp`` for any shape), a torchvision classifier
    (``resnet18``, ``mobilenet_v3_small``, ...; images only; random init, extra option
    ``cifar_stem=True`` for small images), or ``"package.module:function"``. ``kwargs`` are the
    model's own options, e.g. ``build_model("cnn", 10, input_shape=(1, 8, 8), widths=(16, 32), hidden=64)``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model name must be a non-empty string, got {name!r}")
    name = name.strip()
    if input_shape is None:
        _check_dims(num_classes, in_channels, image_size)
        input_shape = (in_channels, image_size, image_size)
    input_shape = _check_shape(num_classes, input_shape)
    if name in BUILTIN_MODELS:
        dims = {"num_classes": num_classes, **input_dims(input_shape)}
        return _call(BUILTIN_MODELS[name], repr(name), {**dims, **kwargs})
    if name.startswith(TIMM_PREFIX):
        return build_timm(name, num_classes, input_shape, kwargs)
    if ":" in name:
        return _build_factory(name, num_classes, input_shape, kwargs)
    torchvision_names = _torchvision_names()
    if name in torchvision_names:
        channels, height, width = _needs_image(name, input_shape)
        return _build_torchvision(name, num_classes, channels, min(height, width), kwargs)
    close = difflib.get_close_matches(name, list(BUILTIN_MODELS) + torchvision_names, n=3)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else (
        "run `list_models()` to see the choices"
    )
    raise ModelError(
        f"unknown model {name!r}: {hint} (or pass 'package.module:function' for your own)"
    )
