"""``teacher.pretrained``: the weights the teacher starts from (it then fine-tunes for ``teacher.epochs``).

Three sources, one rule for fitting them to the teacher the config builds (``fit_state``):

* a local weights file (``.pt``, ``.pth``, ``.bin``, ``.ckpt`` or any path): a state dict, or a checkpoint holding
  one under ``state_dict`` or ``model`` (a raydistill checkpoint too), read with ``torch.load(weights_only=True)``
  (``.safetensors`` with safetensors), so loading never runs code;
* a torchvision weight name for a torchvision teacher (``IMAGENET1K_V1``, ``DEFAULT``,
  ``ResNet18_Weights.IMAGENET1K_V1``);
* a timm pretrained tag for a ``timm:`` teacher (``a1_in1k``, ``default`` for timm's default); timm adapts the
  first convolution to ``in_chans`` and resamples ViT position embeddings to ``img_size`` itself.

Weight names download (torchvision to ``TORCH_HOME``, timm from the Hugging Face Hub) only because the config
names them; a download that fails is a ``ModelError`` saying so. Keys that do not match the teacher are a
``CheckpointError`` naming them. When the pretrained classifier has another class count than the data, the head is
replaced only when ``teacher.replace_head`` says so (the new head is the teacher's fresh one), never silently.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from raydistill.config import WEIGHT_FILE_SUFFIXES, is_weights_file  # noqa: F401 (config resolves such paths)
from raydistill.errors import CheckpointError, ConfigError, ModelError


def head_of(model: nn.Module) -> str:
    """The classifier's module name: timm's ``get_classifier``, else the last ``nn.Linear`` (torchvision, ours)."""
    names = {m: n for n, m in model.named_modules()}
    get = getattr(model, "get_classifier", None)
    if callable(get) and isinstance(get(), nn.Module) and get() in names:
        return names[get()]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else ""


def _few(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def fit_state(model: nn.Module, state: dict[str, Tensor], replace_head: bool, source: str) -> dict[str, Tensor]:
    """``state`` checked against ``model``'s keys and shapes; with ``replace_head`` a classifier whose shape
    differs keeps ``model``'s fresh weights. Returns a full state dict for ``model``."""
    target = model.state_dict()
    head = head_of(model)
    head_keys = {k for k in target if head and k.startswith(head + ".")}
    wrong_shape = {k for k in target.keys() & state.keys() if tuple(state[k].shape) != tuple(target[k].shape)}
    if wrong_shape & head_keys and not replace_head:
        k = sorted(wrong_shape & head_keys)[0]
        raise CheckpointError(f"teacher.pretrained {source}: its classifier {k} has shape {tuple(state[k].shape)}, "
                              f"the teacher's {tuple(target[k].shape)} (another class count); set "
                              "teacher.replace_head=true to train a new head on this data")
    fresh = head_keys if replace_head else set()
    missing, unexpected = target.keys() - state.keys() - fresh, state.keys() - target.keys()
    other = wrong_shape - fresh
    if missing or unexpected or other:
        parts = ([f"missing {_few(missing)}"] if missing else []) + (
            [f"unexpected {_few(unexpected)}"] if unexpected else []) + (
            [f"shape differs for {_few(f'{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}' for k in other)}"]
            if other else [])
        raise CheckpointError(f"teacher.pretrained {source} does not fit teacher model: {'; '.join(parts)}; "
                              "use weights saved from this architecture (same kwargs, in_channels and classes)")
    keep = {k for k in fresh if k in wrong_shape or k not in state}  # the teacher's fresh head
    return {k: (target[k] if k in keep else state[k]).detach().clone() for k in target}


def read_weights_file(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"teacher.pretrained file {path} does not exist; check the path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code refused by weights_only, a truncated file, another format
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"teacher.pretrained file {path} is not a weights file torch can read safely "
                              f"({first[:120]}); save it with torch.save(model.state_dict(), path)") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not (isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values())):
        raise CheckpointError(f"teacher.pretrained file {path} holds no state dict (name -> tensor); save it with "
                              "torch.save(model.state_dict(), path)")
    return obj


def _download_error(what: str, e: Exception) -> ModelError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return ModelError(f"teacher.pretrained: downloading or loading {what} failed ({type(e).__name__}: {first[:120]}); "
                      "allow the network or give a local weights file instead")


def torchvision_state(arch: str, name: str) -> dict[str, Tensor]:
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    short = name.split(".")[-1]
    choices = ["DEFAULT", *enum.__members__]
    if short not in choices:
        close = difflib.get_close_matches(short, choices, n=1)
        raise ConfigError(f"teacher.pretrained={name!r} is not a weight of torchvision's {arch}"
                          f"{f'; did you mean {close[0]!r}?' if close else ''} (choices: {', '.join(choices)})")
    try:
        return enum[short].get_state_dict(progress=False)
    except Exception as e:  # no network, a proxy, a full disk
        raise _download_error(f"torchvision's {arch} {short}", e) from None


def timm_state(spec: dict, tag: str) -> dict[str, Tensor]:
    import timm

    from raydistill.checkpoints import spec_input_shape
    from raydistill.models import timm_arch

    arch = timm_arch(spec["name"])
    tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
    if tag != "default" and tag not in tags:
        close = difflib.get_close_matches(tag, tags, n=2)
        raise ConfigError(f"teacher.pretrained={tag!r} is not a pretrained tag of timm's {arch}"
                          f"{'; did you mean ' + ' or '.join(map(repr, close)) + '?' if close else ''} "
                          f"(tags: {', '.join(tags[:8]) or 'none'}{', ...' if len(tags) > 8 else ''}; or 'default')")
    kwargs = dict(spec.get("kwargs", {}))
    full = arch if tag == "default" else f"{arch}.{tag}"
    try:  # the pretrained head as it is: fit_state replaces it only when teacher.replace_head says so
        model = timm.create_model(full, pretrained=True, in_chans=spec_input_shape(spec)[0], **kwargs)
    except Exception as e:
        raise _download_error(f"timm's {full}", e) from None
    return model.state_dict()


def pretrained_state(spec: dict, pretrained: str, replace_head: bool) -> dict[str, Tensor]:
    """The teacher's initial state dict from ``teacher.pretrained`` (see the module doc)."""
    from raydistill.checkpoints import build_from_spec
    from raydistill.models import TIMM_PREFIX

    with torch.random.fork_rng():
        torch.manual_seed(0)  # the fresh head (replace_head) is the same on every call
        model = build_from_spec(spec)
    name = spec["name"]
    if is_weights_file(pretrained):
        state, source = read_weights_file(Path(pretrained)), f"file {pretrained}"
    elif name.startswith(TIMM_PREFIX):
        state, source = timm_state(spec, pretrained), f"timm weights {pretrained!r}"
    elif ":" not in name and name not in ("cnn", "mlp"):
        state, source = torchvision_state(name, pretrained), f"torchvision weights {pretrained!r}"
    else:
        raise ConfigError(f"teacher.pretrained={pretrained!r} names zoo weights, but teacher.model {name!r} is not "
                          "a torchvision or timm model; give a weights file (.pt/.pth/.safetensors) instead")
    return fit_state(model, state, replace_head, source)
