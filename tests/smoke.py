"""Smoke settings shared by the tests that run the pipeline: tiny data, one epoch per stage."""

from contextlib import contextmanager
from pathlib import Path

SMOKE = {
    "data.limit": 200, "teacher.epochs": 1, "distill.epochs": 1, "prune.epochs": 1,
    "prune.finetune_epochs": 1, "teacher.kwargs": {"widths": [16, 32], "hidden": 64},
}


def train_smoke_teacher(path, model: str, kwargs: dict, seed: int, meta: dict | None = None) -> str:
    """A teacher.pt for the smoke data (digits 8×8, 10 classes): ``model(**kwargs)`` trained with plain torch for
    one epoch, saved at ``path``; returns the path."""
    import torch
    import torch.nn.functional as F

    from raydistill.checkpoints import build_from_spec, model_spec, save_model
    from raydistill.data import load_splits

    torch.manual_seed(seed)
    splits = load_splits("digits", limit=SMOKE["data.limit"])
    spec = model_spec(model, kwargs, splits.num_classes, splits.shape)
    net = build_from_spec(spec)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, y = torch.from_numpy(splits.train.x), torch.from_numpy(splits.train.y)
    for i in range(0, len(x), 32):
        opt.zero_grad()
        F.cross_entropy(net(x[i:i + 32]), y[i:i + 32]).backward()
        opt.step()
    save_model(path, net.eval(), spec, meta or {})
    return str(path)


def ctrl_c_default() -> None:
    """``preexec_fn`` for a child that a test sends SIGINT (Ctrl-C): SIGINT back to its default action, so the
    child's Python raises KeyboardInterrupt. Whoever starts pytest in the background with `&` from a
    non-interactive shell makes it ignore SIGINT, every child inherits that, and a Ctrl-C test would then see its
    signal ignored (seen here: both Ctrl-C tests failed in a suite started with `nohup ... &`)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def ray_address_file(address: str):
    """Ray's cluster address file in its default temp folder (``/tmp/ray/ray_current_cluster``: `ray start` without
    ``--temp-dir`` writes it, a plain ``ray.init()`` joins the cluster it names) holding ``address`` for the block,
    then as it was. Tests that write it hold an exclusive lock on a file beside it, so two pytest workers never
    interleave their saves and restores."""
    import fcntl

    from ray._common.utils import get_ray_address_file

    marker = Path(get_ray_address_file(None))
    marker.parent.mkdir(parents=True, exist_ok=True)
    with open(marker.parent / "raydistill-tests-address-file.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = marker.read_bytes() if marker.exists() else None
        marker.write_text(address)
        try:
            yield marker
        finally:
            if saved is None:
                marker.unlink(missing_ok=True)
            else:
                marker.write_bytes(saved)


def tracebacks(texts: dict[str, str], after: int = 40) -> str:
    """Every traceback in the named console texts, each with the line before it (what printed it, e.g. Ray's
    "Unhandled error") and ``after`` lines of it; "" when there is none. An assertion message: a failure shows the
    traceback itself, which pytest's abridged repr of a whole console would cut out."""
    found = []
    for name, text in texts.items():
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if "Traceback" in line:
                found.append(f"--- {name}, line {i + 1}:\n" + "\n".join(lines[max(0, i - 1):i + after]))
    return "\n".join(found)
