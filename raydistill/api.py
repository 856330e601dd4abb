"""The Python API: what the ``raydistill`` command does, callable from a script or a notebook.

    import raydistill

    result = raydistill.run("jobs/digits.yaml", out="runs/digits", distill={"epochs": 5}, **{"prune.ratio": 0.5})
    print(result.models["student_pruned"]["accuracy"])
    student = raydistill.load_student("runs/digits")      # the final student, weights checked against the manifest

    sweep = raydistill.tune("jobs/digits.yaml", out="runs/digits-tune", trials=8)
    print(sweep.best, sweep.best_config)

A config is a YAML path, a nested dict (the YAML's content), a ``config.Config``, or None (the embedded default).
Overrides are the CLI's ``--set`` keys: ``**{"distill.alpha": 0.7}``, a section as a dict
(``distill={"alpha": 0.7}``) or a top-level key (``seed=1``). Bad input raises the same typed ``UserError``
(``raydistill.errors``) whose first line the CLI prints; nothing here prints a traceback or exits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydistill.errors import CheckpointError, ConfigError, RunFolderError

__all__ = ["RunResult", "TuneResult", "load_config", "load_student", "run", "tune"]

# the checkpoints a run folder may hold, from the most to the least processed student
STUDENT_CHECKPOINTS = ("student_pruned", "student_kd", "student_baseline")


@dataclass(frozen=True)
class RunResult:
    """What ``run`` returns: the run folder and the report (the content of ``report.json``)."""

    out: Path
    report: dict

    @property
    def models(self) -> dict[str, dict]:
        """One row per model: accuracy, params, MACs, latency at batch 1 and 64, size, sparsity."""
        return self.report["models"]

    def load_student(self, stage: str | None = None):
        return load_student(self.out, stage)


@dataclass(frozen=True)
class TuneResult:
    """What ``tune`` returns: the sweep folder, the sweep report (``sweep_report.json``) and the best trial."""

    out: Path
    report: dict

    @property
    def best(self) -> dict | None:
        return self.report.get("best")

    @property
    def best_config(self) -> Path | None:
        """``best_config.yaml``: ``raydistill.run(result.best_config)`` reproduces the best trial."""
        path = self.out / "best_config.yaml"
        return path if self.best and path.is_file() else None


def _dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    """Keyword overrides as the CLI's dotted keys: ``distill={"alpha": 0.7}`` -> ``{"distill.alpha": 0.7}``."""
    from raydistill import config as config_mod

    sections = set(config_mod._sections())
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"override {key}={value!r}: a section takes a dict of its keys, "
                                  f"e.g. {key}={{'key': value}}, or pass **{{'{key}.key': value}}")
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def load_config(config_or_path: Any = None, **overrides: Any):
    """A validated ``config.Config`` from a YAML path, a nested dict, a Config or None, with overrides applied."""
    from raydistill import config as config_mod

    flat = _dotted(overrides)
    if config_or_path is None or isinstance(config_or_path, (str, os.PathLike)):
        return config_mod.load(config_or_path, flat)
    if isinstance(config_or_path, config_mod.Config):
        raw = config_or_path.to_dict()
    elif isinstance(config_or_path, dict):
        raw = config_or_path
    else:
        raise ConfigError(f"a config is a YAML path, a dict, a raydistill.config.Config or None, got "
                          f"{type(config_or_path).__name__}; pass one of those")
    return config_mod.from_dict(config_mod.apply_overrides(raw, flat))


def _default_out(config_or_path: Any, suffix: str = "") -> Path:
    # as the CLI: runs/<config file name>, or runs/default; deterministic, so calling again resumes
    stem = Path(config_or_path).stem if isinstance(config_or_path, (str, os.PathLike)) else "default"
    return Path("runs") / f"{stem}{suffix}"


def run(config_or_path: Any = None, out: str | os.PathLike | None = None, *, address: str | None = None,
        quiet: bool = False, verbose: bool = False, **overrides: Any) -> RunResult:
    """``raydistill run``: teacher -> baseline -> KD student -> pruned student -> evaluate -> int8 -> export.

    ``out`` is the run folder (default ``runs/<config name>``); a second call with the same config resumes and
    skips what is done. Starts a local Ray in this process unless ``address`` (or ``RAY_ADDRESS``) names a
    cluster; it stays up for later calls. A Ray this process is already on (the script's own ``ray.init()``) is
    used as it is: a cluster it joined counts as ``address`` (data-parallel workers by default), a local one as
    none (local mode). Raises ``raydistill.errors.UserError`` on bad input."""
    from raydistill.pipeline import run as run_pipeline

    cfg = load_config(config_or_path, **overrides)
    out = Path(out) if out is not None else _default_out(config_or_path)
    report = run_pipeline(cfg, out, address=address, quiet=quiet, verbose=verbose)
    return RunResult(out=out.resolve(), report=report)


def tune(config_or_path: Any = None, out: str | os.PathLike | None = None, *, trials: int | None = None,
         resume: bool = False, max_macs: int | None = None, max_latency_ms: float | None = None,
         address: str | None = None, quiet: bool = False, verbose: bool = False, **overrides: Any) -> TuneResult:
    """``raydistill tune``: a Ray Tune search over the config's ``tune.space`` with one shared teacher.

    ``trials``, ``max_macs`` and ``max_latency_ms`` are ``tune.num_trials``, ``tune.max_macs`` and
    ``tune.max_latency_ms``; ``resume`` continues an interrupted sweep in ``out`` (default
    ``runs/<config name>-tune``)."""
    from raydistill.sweep import run_sweep

    for key, value in (("tune.num_trials", trials), ("tune.max_macs", max_macs),
                       ("tune.max_latency_ms", max_latency_ms)):
        if value is not None:
            overrides[key] = value
    cfg = load_config(config_or_path, **overrides)
    out = Path(out) if out is not None else _default_out(config_or_path, "-tune")
    report = run_sweep(cfg, out, resume=resume, address=address, quiet=quiet, verbose=verbose)
    return TuneResult(out=out.resolve(), report=report)


def final_student_name(run_dir: Path) -> str:
    """The stage whose checkpoint is the run's final student: the one the report deployed, else the most
    processed student checkpoint in the folder."""
    report = run_dir / "report.json"
    if report.is_file():
        name = (json.loads(report.read_text()).get("deploy") or {}).get("model")
        if name:
            return name
    for name in STUDENT_CHECKPOINTS:
        if (run_dir / f"{name}.pt").is_file():
            return name
    raise CheckpointError(f"run folder {run_dir} holds no student checkpoint "
                          f"({', '.join(n + '.pt' for n in STUDENT_CHECKPOINTS)}); run raydistill.run on it first")


def load_student(run_dir: str | os.PathLike, stage: str | None = None):
    """The final student of a run folder as an ``nn.Module`` in eval mode (the pruned student when the run
    pruned, else the KD student), or the checkpoint of ``stage`` (``student_kd``, ``student_baseline``,
    ``teacher``, ...). The file is checked against the run's manifest and read with ``weights_only=True``."""
    from raydistill.checkpoints import load_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} does not exist; pass the folder raydistill.run wrote")
    name = stage or final_student_name(run_dir)
    path = run_dir / f"{name}.pt"
    if not path.is_file():
        have = sorted(p.stem for p in run_dir.glob("*.pt"))
        raise CheckpointError(f"run folder {run_dir} has no {name}.pt; pass one of: {', '.join(have) or 'none'}")
    return load_model(path)[0].eval()
