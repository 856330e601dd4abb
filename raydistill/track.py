"""Experiment tracking through the tools users already run: MLflow (``track.mlflow``) and TensorBoard
(``track.tensorboard``). No format of our own: what is logged is read with ``mlflow ui`` / ``tensorboard``.

MLflow, one run per ``raydistill run`` (named after the run folder), with:

* params: every config key (``distill.alpha`` ...), as the run resolved it;
* one nested run per stage (teacher, student_baseline, student_kd, student_pruned) with that stage's per-epoch
  metrics (loss, train_acc, val_acc, samples/s, sparsity ratio; step = epoch); a stage skipped because its
  checkpoint was up to date logs the history recorded when it trained (``stages.json``);
* metrics of every report row (``student_kd.accuracy``, ``student_pruned.latency_ms_b64`` ...) and the gains;
* artifacts: report.md, report.json and report.png.

``raydistill tune`` logs one parent run for the sweep and one nested run per trial, live, through Ray Tune's own
``MLflowLoggerCallback`` (``tune_callbacks``), then the sweep's results and Pareto plots as artifacts.

The tracking URI is ``track.mlflow_uri``; by default ``sqlite:///RUN/mlflow/mlflow.db`` with artifacts in
``RUN/mlflow/artifacts``, an embedded store in the run folder (MLflow 3 keeps its ``file:`` store in maintenance
mode and refuses new ones, so sqlite is the local default). ``check_tracking`` runs before any training: a
server that does not answer, a store that cannot be opened, or a missing package fails in seconds, in one line.

TensorBoard: per-epoch scalars of each stage in ``RUN/tensorboard/<stage>/`` (event files written with
tensorboardX, which Ray Tune already installs; ``tensorboard --logdir RUN/tensorboard`` reads them).

The tracking folders are logs, not artifacts: the manifest leaves them out (they change on every rerun).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from raydistill.config import Config
from raydistill.errors import ConfigError
from raydistill.redact import redact

MLFLOW_DIR = "mlflow"
TENSORBOARD_DIR = "tensorboard"
TRACKING_DIRS = (MLFLOW_DIR, TENSORBOARD_DIR)
_REPORT_FILES = ("report.md", "report.json", "report.png")


def mlflow_uri(cfg: Config, out: Path) -> str:
    return cfg.track.mlflow_uri or f"sqlite:///{Path(out).resolve() / MLFLOW_DIR / 'mlflow.db'}"


@contextlib.contextmanager
def _no_retries():
    """MLflow retries an HTTP call for minutes by default; a check must answer in seconds."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _client(cfg: Config, out: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_uri(cfg, out))


def _experiment_id(client, cfg: Config, out: Path) -> str:
    exp = client.get_experiment_by_name(cfg.track.mlflow_experiment)
    if exp is not None:
        return exp.experiment_id
    # the embedded store keeps its artifacts in the run folder too (MLflow's default is ./mlruns under the cwd)
    location = None if cfg.track.mlflow_uri else (Path(out).resolve() / MLFLOW_DIR / "artifacts").as_uri()
    return client.create_experiment(cfg.track.mlflow_experiment, artifact_location=location)


def check_tracking(cfg: Config, out: Path) -> None:
    """Before any training: the trackers the config asks for are installed and their store answers."""
    tr = cfg.track
    if tr.tensorboard:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise ConfigError("track.tensorboard needs tensorboardX; pip install tensorboardX or set "
                              "track.tensorboard=false") from None
    if not tr.mlflow:
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError("track.mlflow needs MLflow; pip install 'raydistill[track]' or set track.mlflow=false") \
            from None
    uri = mlflow_uri(cfg, out)
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            with socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)),
                                          timeout=5):
                pass
        except OSError as e:
            raise ConfigError(f"track.mlflow_uri {uri} is unreachable ({e.strerror or e}); start the MLflow server "
                              "or fix the URI (null: a local sqlite store in the run folder)") from None
    if not cfg.track.mlflow_uri:
        (Path(out) / MLFLOW_DIR).mkdir(parents=True, exist_ok=True)
    try:
        with _no_retries():
            _experiment_id(_client(cfg, out), cfg, out)
    except Exception as e:  # MlflowException, a refused file: store, a database that cannot be opened, HTTP errors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"track.mlflow_uri {uri} cannot be used ({first[:160]}); fix the URI (sqlite:///path.db, "
                          "http://host:port) or set it to null for a local store in the run folder") from None


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    """Every config key as ``section.key`` -> its value as text (MLflow params are strings)."""
    params = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "tune":
            params.update({f"{key}.{k}": str(v) for k, v in value.items()})
        elif not isinstance(value, dict):
            params[key] = str(value)
    return {k: redact(v)[:6000] for k, v in params.items()}  # MLflow's limit on a param value; no URI credentials


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_run(cfg: Config, out: Path, report: dict, histories: dict[str, list[dict]]) -> None:
    """Log a finished run (see the module doc). ``histories``: each stage's per-epoch metrics."""
    out = Path(out)
    if cfg.track.tensorboard:
        write_tensorboard(out / TENSORBOARD_DIR, histories)
    if not cfg.track.mlflow:
        return
    from mlflow.entities import Metric, Param, RunTag

    client = _client(cfg, out)
    exp = _experiment_id(client, cfg, out)
    now = int(time.time() * 1000)
    parent = client.create_run(exp, run_name=out.name, tags={"raydistill.run_dir": str(out.resolve())}).info.run_id
    try:
        params = [Param(k, v) for k, v in flat_params(report["config"]).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(parent, params=params[i:i + 100])
        for stage, history in histories.items():
            child = client.create_run(exp, run_name=stage, tags={"mlflow.parentRunId": parent}).info.run_id
            metrics = [Metric(k, v, now, int(h["epoch"])) for h in history for k, v in _numbers(h).items()
                       if k != "epoch"]
            for i in range(0, len(metrics), 1000):
                client.log_batch(child, metrics=metrics[i:i + 1000])
            client.log_batch(child, tags=[RunTag("raydistill.stage", stage)])
            client.set_terminated(child)
        final = [Metric(f"{name}.{k}", v, now, 0) for name, row in report["models"].items()
                 for k, v in _numbers(row).items()]
        final += [Metric(k, v, now, 0) for k, v in _numbers(report.get("gains", {})).items()]
        client.log_batch(parent, metrics=final)
        for name in _REPORT_FILES:
            if (out / name).is_file():
                client.log_artifact(parent, str(out / name))
        client.set_terminated(parent)
    except BaseException:
        client.set_terminated(parent, status="FAILED")
        raise


def write_tensorboard(root: Path, histories: dict[str, list[dict]]) -> None:
    """Per-epoch scalars of each stage into ``root/<stage>/`` (step = epoch)."""
    from tensorboardX import SummaryWriter

    for stage, history in histories.items():
        writer = SummaryWriter(logdir=str(root / stage))
        try:
            for h in history:
                for k, v in _numbers(h).items():
                    if k != "epoch":
                        writer.add_scalar(k, v, global_step=int(h["epoch"]))
        finally:
            writer.close()


def tune_callbacks(cfg: Config, out: Path) -> tuple[list, str | None]:
    """Ray Tune's MLflowLoggerCallback, its trials nested under a new parent run for the sweep (whose id is
    returned for ``finish_tune``); ``([], None)`` without ``track.mlflow``."""
    if not cfg.track.mlflow:
        return [], None
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    client = _client(cfg, out)
    exp = _experiment_id(client, cfg, out)
    parent = client.create_run(exp, run_name=f"{Path(out).name} (sweep)",
                               tags={"raydistill.run_dir": str(Path(out).resolve())}).info.run_id
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in flat_params(cfg.to_dict()).items()]
    for i in range(0, len(params), 100):
        client.log_batch(parent, params=params[i:i + 100])
    callback = MLflowLoggerCallback(tracking_uri=mlflow_uri(cfg, out), experiment_name=cfg.track.mlflow_experiment,
                                    tags={"mlflow.parentRunId": parent}, save_artifact=False)
    return [callback], parent


def finish_tune(cfg: Config, out: Path, parent: str | None, report: dict) -> None:
    """The sweep's parent run: best trial's figures and the result files as artifacts."""
    if parent is None:
        return
    from mlflow.entities import Metric

    client, now = _client(cfg, out), int(time.time() * 1000)
    best = report.get("best") or {}
    metrics = [Metric(f"best.{k}", v, now, 0) for k, v in _numbers(best).items()]
    if metrics:
        client.log_batch(parent, metrics=metrics)
    for name in ("results.csv", "pareto.md", "pareto.png", "best_config.yaml", "sweep_report.json"):
        if (Path(out) / name).is_file():
            client.log_artifact(parent, str(Path(out) / name))
    client.set_terminated(parent)
