"""Model checkpoints without pickled code: a spec (plain data) plus a state dict.

A checkpoint is ``{"spec": {...}, "state_dict": {...}, "meta": {...}}`` saved with torch.save and
read with ``torch.load(weights_only=True)``, so loading a run folder never unpickles code. A pruned
model is stored as its original spec plus the pruning plan (which channels were removed); loading
rebuilds the original architecture and replays the plan before loading the weights.
Writes are atomic: a temporary file in the same folder, then ``os.replace``.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from raydistill.errors import CheckpointError


def model_spec(name: str, kwargs: dict[str, Any], num_classes: int, input_shape, plan: list | None = None
               ) -> dict[str, Any]:
    """Everything (plain data) needed to rebuild a model's architecture; ``input_shape`` is one sample's
    shape, (F,), (C, L) or (C, H, W)."""
    return {"name": name, "kwargs": dict(kwargs), "num_classes": int(num_classes),
            "input_shape": [int(s) for s in input_shape], "plan": plan or []}


def spec_input_shape(spec: dict[str, Any]) -> tuple[int, ...]:
    """One sample's shape for ``spec``; checkpoints written before input_shape existed held square images."""
    if "input_shape" in spec:
        return tuple(spec["input_shape"])
    return (spec["in_channels"], spec["image_size"], spec["image_size"])


def build_from_spec(spec: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """Rebuild a model from its spec (name, kwargs, shape, pruning plan) and load ``state``."""
    from raydistill.core.pruning import apply_pruning_plan_
    from raydistill.models import build_model

    shape = spec_input_shape(spec)
    model = build_model(spec["name"], num_classes=spec["num_classes"], input_shape=shape, **spec.get("kwargs", {}))
    if spec.get("plan"):
        model = apply_pruning_plan_(model, spec["plan"], torch.zeros(1, *shape))
    if spec.get("lowrank"):  # the low-rank stage's factorized Linear layers {name: rank}; weights come with state
        from raydistill.core.surgery import low_rank_factorize_

        low_rank_factorize_(model, ranks=spec["lowrank"])
    if state is not None:
        model.load_state_dict(state)
    return model


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash never leaves a partial file under that name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_model(path: str | os.PathLike, model: torch.nn.Module, spec: dict[str, Any],
               meta: dict[str, Any] | None = None) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"spec": spec, "state_dict": state, "meta": meta or {}}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_payload(path: str | os.PathLike) -> dict[str, Any]:
    from raydistill.manifest import IntegrityError, verify_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path or remove the key to retrain")
    try:
        verify_file(path)  # a run folder's manifest must vouch for the file before it is read at all
    except IntegrityError as e:
        raise CheckpointError(str(e)) from None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, wrong format, pickled code refused by weights_only
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a raydistill checkpoint ({first[:120]}); "
                              "retrain or point to a good file") from None
    if not isinstance(payload, dict) or "spec" not in payload or "state_dict" not in payload:
        raise CheckpointError(f"checkpoint {path} is not a raydistill checkpoint (no spec/state_dict); "
                              "save it with raydistill or retrain")
    return payload


def load_model(path: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """Load (model, spec, meta) from a raydistill checkpoint, weights only."""
    payload = load_payload(path)
    try:
        model = build_from_spec(payload["spec"], payload["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit its model spec ({str(e).splitlines()[0][:120]}); "
                              "retrain or point to a matching file") from None
    return model, payload["spec"], payload.get("meta", {})
