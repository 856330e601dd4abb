"""``raydistill run``: the distillation pipeline on Ray, stage by stage.

    teacher ─┬─> student_baseline (labels only, same budget)
             └─> TeacherServer actor ─> student_kd (Ray Train, KD) ─> prune-while-distill
                                         ─> physical channel removal ─> KD fine-tune ─> student_pruned
    then every model is evaluated on the held-out test split and report.{json,md,png} is written.

Each stage is keyed by a hash of everything it depends on (config sections, the data
fingerprint, the upstream checkpoint's sha256); a stage whose checkpoint exists with the same
key is skipped, so rerunning the same command resumes. Ray Train runs are named
deterministically, so an interrupted stage resumes from its last epoch checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from raydistill import config as config_mod
from raydistill.checkpoints import (CheckpointError, atomic_write_text, load_model, load_payload, model_spec,
                                    save_model)
from raydistill.config import Config
from raydistill.core.metrics import model_summary
from raydistill.data import Splits, fingerprint, load_splits
from raydistill.manifest import sha256_file, write_manifest


class RunFolderError(ValueError):
    """The output folder belongs to a different config."""


def log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[raydistill] {msg}", flush=True)


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def load_data(cfg: Config) -> Splits:
    d = cfg.data
    splits = load_splits(d.source, root=d.root, path=d.path, label_column=d.label_column,
                       feature_column=d.feature_column, image_column=d.image_column, id_column=d.id_column,
                       shape=d.shape, image_size=d.image_size, val_fraction=d.val_fraction,
                       test_fraction=d.test_fraction, seed=d.seed, limit=d.limit)
    for name in ("train", "val", "test"):
        part = getattr(splits, name)
        bad = ~np.isfinite(part.x.reshape(len(part.x), -1)).all(axis=1)
        if bad.any():
            raise ValueError(f"{int(bad.sum())} {name} samples contain NaN or inf (ids {part.ids[bad][:3].tolist()}...); "
                             "clean or drop them in the source data")
    return splits


def init_ray(address: str | None, quiet: bool) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS``, or start a local Ray in-process."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": True, "log_to_driver": not quiet,
                              "logging_level": "WARNING" if quiet else "INFO"}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # On a 2-core laptop, overcommit logical CPUs: Train workers take fractions and the teacher
        # actor and Train's controller must still fit (measured: otherwise runs wait forever).
        kwargs["num_cpus"] = max(4, os.cpu_count() or 1)
        global _started_locally
        _started_locally = True
    target = address or os.environ.get("RAY_ADDRESS")
    if target and target != "auto":
        check_reachable(target)
    ray.init(address=address, **kwargs)


_started_locally = False  # True when this process started its own Ray (no autoscaler to wait for)


class ClusterError(ValueError):
    """The Ray cluster cannot do what the config asks (unreachable, missing resources)."""


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at a Ray address."""
    import socket
    from urllib.parse import urlparse

    raw = address if "://" in address else f"ray://{address}"
    parsed = urlparse(raw)
    host, port = parsed.hostname, parsed.port or (8265 if parsed.scheme in ("http", "https") else 6379)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise ClusterError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}); start it with "
                           "`ray start --head` or fix --address / RAY_ADDRESS") from None


def check_resources(cfg: Config, wait_s: float | None = None) -> None:
    """Refuse, instead of waiting forever, a request the cluster can never satisfy.

    On a local Ray (started here) the answer is immediate. On a cluster the request is passed to
    the autoscaler (``request_resources``) and we wait up to ``scale.resource_wait_s`` for the
    nodes to join (GPU workers often start at zero), then fail naming what is missing.
    """
    import ray

    s = cfg.scale
    need = {"CPU": s.num_workers * s.cpus_per_worker + (s.teacher_cpus if cfg.distill.teacher_mode == "live" else 0)}
    need_gpu = (s.num_workers if s.use_gpu else 0) + s.teacher_gpus
    if need_gpu:
        need["GPU"] = need_gpu
    wait_s = (0.0 if _started_locally else s.resource_wait_s) if wait_s is None else wait_s
    if wait_s > 0 and any(ray.cluster_resources().get(k, 0) < v for k, v in need.items()):
        from ray.autoscaler.sdk import request_resources

        bundle = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
        request_resources(bundles=[bundle] * s.num_workers)
        deadline = time.time() + wait_s
        while time.time() < deadline and any(ray.cluster_resources().get(k, 0) < v for k, v in need.items()):
            time.sleep(2)
    have = ray.cluster_resources()
    if s.use_gpu and have.get("GPU", 0) < s.num_workers:
        raise ClusterError(f"scale.use_gpu=true with scale.num_workers={s.num_workers} needs {s.num_workers} GPU(s) "
                           f"but the cluster has {int(have.get('GPU', 0))}; set scale.use_gpu=false or add GPU nodes")
    if s.teacher_gpus > have.get("GPU", 0):
        raise ClusterError(f"scale.teacher_gpus={s.teacher_gpus} but the cluster has {int(have.get('GPU', 0))} GPU(s); "
                           "set scale.teacher_gpus=0 or add a GPU node")
    if need["CPU"] > have.get("CPU", 0):
        raise ClusterError(f"scale.num_workers={s.num_workers} x scale.cpus_per_worker={s.cpus_per_worker} needs "
                           f"{s.num_workers * s.cpus_per_worker:g} CPUs (plus the teacher's) but the cluster has "
                           f"{have.get('CPU', 0):g}; lower them or add nodes")


# ---- stage cache --------------------------------------------------------------------------------------------
class StageCache:
    """``stages.json`` records, per stage, the key its output was made from and its wall time."""

    def __init__(self, out: Path):
        self.path = out / "stages.json"
        self.records: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.lock = threading.Lock()

    def done(self, stage: str, key: str, artifact: Path) -> bool:
        rec = self.records.get(stage)
        return bool(rec and rec["key"] == key and artifact.exists() and rec.get("sha256") == sha256_file(artifact))

    def record(self, stage: str, key: str, artifact: Path | None, seconds: float, extra: dict | None = None) -> None:
        with self.lock:  # stages may finish concurrently (teacher and baseline run side by side)
            if artifact is not None:  # the manifest vouches for the checkpoint before the stage counts as done
                write_manifest(self.path.parent, artifacts=[artifact.name])
            self._record(stage, key, artifact, seconds, extra)

    def _record(self, stage: str, key: str, artifact: Path | None, seconds: float, extra: dict | None) -> None:
        self.records[stage] = {"key": key, "seconds": seconds, **(extra or {}),
                               "sha256": sha256_file(artifact) if artifact else None}
        atomic_write_text(self.path, json.dumps(self.records, indent=2))


# ---- Ray Train ----------------------------------------------------------------------------------------------
def fit(stage: str, key: str, job: dict, cfg: Config, out: Path):
    """Run ``worker.train_fn_per_worker`` on a TorchTrainer; returns (final train state, result)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydistill.worker import load_train_state, train_fn_per_worker

    # Train V2's controller polls its workers every 2 s by default, so every stage ended up to 2 s after
    # its last epoch and paid more polls on the way in (measured with an empty train function on 2 workers:
    # 5.0 s from the train function's return to fit() returning at 2 s, 1.0 s at 0.25 s). Train propagates this variable to its controller; a
    # value the user set wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    s = cfg.scale
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={**job, "stage": stage, "journal": str(out / "journal.jsonl")},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"{stage}-{key[:12]}",  # deterministic: a rerun resumes from the last epoch checkpoint
            storage_path=str((out / "ray_train").resolve()),
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),  # our own per-epoch line is the progress
        ),
    )
    try:
        result = off_main_thread(trainer.fit)
    except Exception as e:  # Train V2 raises TrainingFailedError from fit()
        raise (user_error_from(e) or e) from None
    if result.error is not None:
        raise user_error_from(result.error) or result.error
    return load_train_state(result.checkpoint), result


def off_main_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a helper thread while the main thread waits.

    Why: called on the main thread, TorchTrainer.fit installs its own SIGINT handler, which aborts
    only that trainer and is never removed, so Ctrl-C during a later stage (or while the baseline
    runs beside the teacher) would be swallowed. From a helper thread it installs none, and Ctrl-C
    raises KeyboardInterrupt in the main thread; the CLI then disconnects from Ray, which ends this
    driver's Train runs, and exits 130.
    """
    if threading.current_thread() is not threading.main_thread():
        return fn()
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raydistill-fit")
    try:
        return pool.submit(fn).result()
    finally:
        pool.shutdown(wait=False)


def user_error_from(error: BaseException) -> BaseException | None:
    """A worker's user-facing error (NaN loss, a ValueError on bad input) out of Ray's wrappers."""
    from raydistill.worker import NonFiniteLossError

    seen, stack = set(), [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, NonFiniteLossError):
            return TrainingError(str(e))
        if isinstance(e, ValueError) and type(e).__module__.startswith("raydistill"):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
        stack += list(getattr(e, "worker_failures", {}).values()) if isinstance(getattr(e, "worker_failures", None), dict) else []
        stack += [getattr(e, "_base_exc", None)]
    text = str(error)
    if "NonFiniteLossError" in text:  # the exception itself did not survive Ray's serialization
        line = next((l for l in text.splitlines() if "loss became" in l), "training produced NaN/inf")
        return TrainingError(line.split("NonFiniteLossError: ")[-1].strip())
    return None


class TrainingError(ValueError):
    """Training stopped on a problem the user can fix (NaN/inf loss); the message says which."""


def phase(name: str, epochs: int, lr: float, batch_size: int, weight_decay: float, alpha: float = 0.0,
          beta: float = 0.0, prune: dict | None = None, remove_after: bool = False) -> dict:
    return {"name": name, "epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay,
            "alpha": alpha, "beta": beta, "prune": prune, "remove_after": remove_after}


# ---- the pipeline -------------------------------------------------------------------------------------------
def validate_models(cfg: Config, num_classes: int, in_channels: int, image_size: int) -> None:
    """Build the student (and teacher, or load its checkpoint) once on the driver: bad factories,
    kwargs or checkpoints fail here with one line, before any Ray worker starts."""
    from raydistill.checkpoints import build_from_spec

    x = torch.zeros(2, in_channels, image_size, image_size)
    roles = [("student", cfg.student.model, cfg.student.kwargs)]
    if cfg.teacher.checkpoint:
        teacher, spec, _ = load_model(cfg.teacher.checkpoint)
        if spec["num_classes"] != num_classes:
            raise CheckpointError(f"teacher checkpoint {cfg.teacher.checkpoint} predicts {spec['num_classes']} "
                                  f"classes but the data has {num_classes}; use a teacher trained on this data")
    else:
        roles.append(("teacher", cfg.teacher.model, cfg.teacher.kwargs))
    for role, name, kwargs in roles:
        model = build_from_spec(model_spec(name, kwargs, num_classes, in_channels, image_size)).eval()
        try:
            with torch.no_grad():
                out = model(x)
        except Exception as e:
            raise ValueError(f"{role} model '{name}' fails on input {tuple(x.shape[1:])}: "
                             f"{str(e).splitlines()[0][:120]}; check {role}.kwargs and data.image_size") from None
        if not (isinstance(out, torch.Tensor) and out.shape == (2, num_classes)):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{role} model '{name}' returns {shape} for a batch of 2, expected (2, {num_classes}) "
                             f"logits; make it output one logit per class")


def check_run_folder(out: Path, cfg: Config) -> None:
    """Refuse to mix results: an existing run folder must hold the same resolved config."""
    existing = out / "config.yaml"
    if existing.exists():
        old = config_mod.from_dict(__import__("yaml").safe_load(existing.read_text()))
        # the tune section only steers sweeps; it does not change any result of the pipeline
        keys = [k for k in config_mod.all_keys() if not k.startswith("tune.")]
        diff = [k for k in keys if config_value(old, k) != config_value(cfg, k)]
        if diff:
            raise RunFolderError(f"run folder {out} holds results of another config (differs in {', '.join(diff[:4])}); "
                                 "pass a new --out folder or delete the old one")


def config_value(cfg: Config, dotted: str):
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def ensure_cache(cfg: Config, out: Path, t_spec: dict, teacher_state: dict, teacher_sha: str, splits: Splits,
                 data_fp: str, timings: dict, quiet: bool):
    """Use the logit cache if it matches this teacher, data, k and augmented views; build it when absent."""
    from raydistill.augment import make_augment
    from raydistill.cache import CacheError, build_cache

    uri = cfg.cache.path or str(out / "logit_cache")
    views = cfg.cache.views
    transform = make_augment(cfg.data.augment, cfg.data.augment_pad, cfg.seed, splits.shape[1]).transform
    t0 = time.perf_counter()
    try:
        info = check_cache_for_run(cfg, uri, teacher_sha, data_fp, splits.shape[1])
        timings["logit_cache"] = {"seconds": time.perf_counter() - t0, "skipped": True}
        log(f"logit cache {uri}: up to date ({info.rows} rows), reused", quiet)
        return info, uri
    except CacheError:
        if cfg.cache.path and _cache_exists(uri):
            raise  # a user-given cache that does not match is refused, never overwritten
    log(f"logit cache: one teacher pass over {len(splits.train)} samples x {views} view(s) ({transform}) "
        f"with {cfg.cache.num_actors} actor(s)", quiet)
    info = build_cache(uri, teacher_spec=t_spec, teacher_state=teacher_state, teacher_sha256=teacher_sha,
                       splits=splits, data_fingerprint=data_fp, k=cfg.cache.k, views=views,
                       augment=cfg.data.augment, augment_pad=cfg.data.augment_pad, seed=cfg.seed,
                       num_actors=cfg.cache.num_actors,
                       cpus_per_actor=cfg.scale.teacher_cpus or 0.5, num_gpus_per_actor=cfg.scale.teacher_gpus,
                       batch_size=cfg.cache.batch_size, num_threads=cfg.scale.torch_threads)
    timings["logit_cache"] = {"seconds": time.perf_counter() - t0}
    return info, uri


def check_cache_for_run(cfg: Config, uri: str, teacher_sha: str, data_fp: str, image_size: int):
    """The cache at ``uri`` if it holds this teacher's outputs for this data, k and augmented views;
    otherwise CacheError naming what differs."""
    from raydistill.augment import make_augment
    from raydistill.cache import cache_fingerprint, check_cache

    views, k = cfg.cache.views, cfg.cache.k
    transform = make_augment(cfg.data.augment, cfg.data.augment_pad, cfg.seed, image_size).transform
    return check_cache(uri, cache_fingerprint(teacher_sha, data_fp, k, views, transform), teacher_sha256=teacher_sha,
                       data_fingerprint=data_fp, k=k, views=views, transform=transform)


def check_given_cache(cfg: Config, data_fp: str, image_size: int, uses_cache: bool) -> None:
    """Refuse a user-given cache that does not match before any training: with a teacher checkpoint the
    teacher's hash is known up front (a teacher trained in this run is checked once it exists)."""
    if not (uses_cache and cfg.cache.path and cfg.teacher.checkpoint and _cache_exists(cfg.cache.path)):
        return
    check_cache_for_run(cfg, cfg.cache.path, sha256_file(Path(cfg.teacher.checkpoint)), data_fp, image_size)


def _cache_exists(uri: str) -> bool:
    from raydistill.cache import CacheError, read_info

    try:
        read_info(uri)
        return True
    except CacheError:
        return False


def run(cfg: Config, out: str | Path, address: str | None = None, quiet: bool = False,
        stop_after: str | None = None) -> dict:
    """The whole pipeline; ``stop_after="teacher"`` stops once the teacher exists (returns its checkpoint),
    ``stop_after="cache"`` once the teacher and the logit cache exist."""
    import ray

    out = Path(out).resolve()
    check_run_folder(out, cfg)
    timings: dict[str, dict] = {}
    report_extra: dict[str, Any] = {}
    t_start = time.perf_counter()

    # Validate everything the user gave (data, models, checkpoint, cluster) before writing anything.
    t0 = time.perf_counter()
    splits = load_data(cfg)
    data_fp = fingerprint(splits)
    C, H, W = splits.shape
    K = splits.num_classes
    timings["data"] = {"seconds": time.perf_counter() - t0}
    log(f"data {splits.name}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test, "
        f"{K} classes, shape {splits.shape}", quiet)
    validate_models(cfg, K, C, H)
    check_given_cache(cfg, data_fp, H, uses_cache=cfg.distill.teacher_mode == "cache" or stop_after == "cache")
    init_ray(address, quiet)
    check_resources(cfg)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", cfg.to_yaml())

    data_ref = ray.put(splits)  # workers read it zero-copy from the object store, once each
    cache = StageCache(out)
    common = digest(cfg.section_hash("data", "seed"), data_fp, cfg.scale.num_workers)
    d, p = cfg.distill, cfg.prune

    # 1. teacher and 2. student baseline (labels only, same budget as KD) -----------------------------------
    # The baseline does not need the teacher, so the two Ray Train runs go side by side: on a small
    # machine most of a stage's wall time is Train's fixed start-up, which then overlaps.
    t_spec = model_spec(cfg.teacher.model, cfg.teacher.kwargs, K, C, H)
    s_spec = model_spec(cfg.student.model, cfg.student.kwargs, K, C, H)
    teacher_path = out / "teacher.pt"
    baseline_path = out / "student_baseline.pt"
    student_phase = dict(epochs=d.epochs, lr=d.lr, batch_size=d.batch_size, weight_decay=d.weight_decay)

    def teacher_stage() -> tuple[torch.nn.Module, dict, str]:
        t0 = time.perf_counter()
        if cfg.teacher.checkpoint:
            teacher, spec, _ = load_model(cfg.teacher.checkpoint)
            if spec["num_classes"] != K:
                raise CheckpointError(f"teacher checkpoint {cfg.teacher.checkpoint} predicts {spec['num_classes']} "
                                      f"classes but the data has {K}; use a teacher trained on this data")
            timings["teacher"] = {"seconds": time.perf_counter() - t0, "skipped": True}
            return teacher, spec, sha256_file(Path(cfg.teacher.checkpoint))
        key = digest(common, cfg.section_hash("teacher"))
        if not cache.done("teacher", key, teacher_path):
            job = {"cfg": cfg.to_dict(), "spec": t_spec, "data": data_ref, "teacher": None, "init_state": None,
                   "phases": [phase("train", cfg.teacher.epochs, cfg.teacher.lr, cfg.teacher.batch_size,
                                    cfg.teacher.weight_decay)]}
            log(f"stage teacher: training {cfg.teacher.model} on {cfg.scale.num_workers} Ray Train workers", quiet)
            state, _ = fit("teacher", key, job, cfg, out)
            save_model(teacher_path, _model(t_spec, state), t_spec, {"stage": "teacher", "key": key})
            cache.record("teacher", key, teacher_path, time.perf_counter() - t0)
            timings["teacher"] = {"seconds": time.perf_counter() - t0}
        else:
            timings["teacher"] = {"seconds": cache.records["teacher"]["seconds"], "skipped": True}
            log("stage teacher: up to date, skipped", quiet)
        teacher, spec, _ = load_model(teacher_path)
        return teacher, spec, sha256_file(teacher_path)

    def student_stage(stage: str, path: Path, key: str, job_fn: Callable[[], dict]) -> None:
        t0 = time.perf_counter()
        if cache.done(stage, key, path):
            timings[stage] = {"seconds": cache.records[stage]["seconds"], "skipped": True}
            log(f"stage {stage}: up to date, skipped", quiet)
            return
        log(f"stage {stage}: {cfg.scale.num_workers} Ray Train workers", quiet)
        state, result = fit(stage, key, job_fn(), cfg, out)
        spec = {**s_spec, "plan": state["plan"]}
        save_model(path, _model(spec, state), spec, {"stage": stage, "key": key})
        history = (result.return_value or {}).get("history", [])
        sps = [h["samples_per_s_global"] for h in history]
        cache.record(stage, key, path, time.perf_counter() - t0,
                     {"samples_per_s_median": sorted(sps)[len(sps) // 2] if sps else None})
        timings[stage] = {"seconds": time.perf_counter() - t0}

    def init_state_for(teacher: torch.nn.Module | None):
        if not cfg.student.init_from_teacher:
            return None
        from raydistill.checkpoints import build_from_spec
        from raydistill.core.surgery import init_from_teacher_

        torch.manual_seed(cfg.seed)
        student0 = build_from_spec(s_spec)
        copied = init_from_teacher_(student0, teacher)
        log(f"init from teacher: copied {len(copied['copied'])} tensors", quiet)
        return ray.put({k: v.clone() for k, v in student0.state_dict().items()})

    def baseline_stage(init_state, teacher_sha: str) -> None:
        key = digest(common, cfg.section_hash("student"), teacher_sha, "baseline", student_phase)
        student_stage("student_baseline", baseline_path, key,
                      lambda: {"cfg": cfg.to_dict(), "spec": s_spec, "data": data_ref, "teacher": None,
                               "init_state": init_state, "phases": [phase("train", **student_phase)]})

    if stop_after in ("teacher", "cache"):  # cache-logits and sweeps need only the teacher
        teacher, t_spec, teacher_sha = teacher_stage()
        if stop_after == "teacher":
            return {"teacher_path": str(cfg.teacher.checkpoint or teacher_path), "teacher_sha256": teacher_sha,
                    "splits": splits, "timings": timings}
    elif cfg.student.init_from_teacher:  # the baseline starts from the teacher's tensors: wait for it
        teacher, t_spec, teacher_sha = teacher_stage()
        init_state = init_state_for(teacher)
        baseline_stage(init_state, teacher_sha)
    else:
        from concurrent.futures import ThreadPoolExecutor

        init_state = None
        with ThreadPoolExecutor(max_workers=2) as pool:
            baseline_done = pool.submit(baseline_stage, None, "")
            teacher, t_spec, teacher_sha = teacher_stage()
            baseline_done.result()
    student_common = digest(common, cfg.section_hash("student"), teacher_sha if cfg.student.init_from_teacher else "")

    # 3. the shared teacher actor, then KD -------------------------------------------------------------------
    kd_key = digest(student_common, teacher_sha, cfg.section_hash("distill"),
                    cfg.cache.k if d.teacher_mode == "cache" else None,
                    # views only when > 1, so the keys of runs made before cache.views existed still match
                    *([cfg.cache.views] if d.teacher_mode == "cache" and cfg.cache.views > 1 else []))
    kd_path = out / "student_kd.pt"
    prune_path = out / "student_pruned.pt"
    prune_key = digest(kd_key, cfg.section_hash("prune"))
    need_kd = not cache.done("student_kd", kd_key, kd_path)
    need_prune = p.ratio > 0 and not cache.done("student_pruned", prune_key, prune_path)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    server, server_name, teacher_job = None, f"teacher-{teacher_sha[:12]}", None
    if d.teacher_mode == "cache" or stop_after == "cache":
        cache_info, uri = ensure_cache(cfg, out, t_spec, teacher_state, teacher_sha, splits, data_fp, timings, quiet)
        teacher_job = {"mode": "cache", "uri": uri, "info": cache_info.__dict__}
        report_extra["logit_cache"] = {**cache_info.__dict__, "uri": uri}
        if stop_after == "cache":
            return {"cache": report_extra["logit_cache"], "splits": splits, "timings": timings}
    if d.teacher_mode == "live" and (need_kd or need_prune):
        from raydistill.teacher import start_teacher_server

        t0 = time.perf_counter()
        server = start_teacher_server(server_name, t_spec, teacher_state, num_cpus=cfg.scale.teacher_cpus,
                                      num_gpus=cfg.scale.teacher_gpus,
                                      batch_window_ms=cfg.scale.teacher_batch_window_ms,
                                      max_batch=cfg.scale.teacher_max_batch, num_threads=cfg.scale.torch_threads)
        timings["teacher_server_start"] = {"seconds": time.perf_counter() - t0}
        atomic_write_text(out / "teacher_server.json", json.dumps(
            {"name": server_name, "pid": ray.get(server.pid.remote()), "node": ray.get_runtime_context().get_node_id()}))
        log(f"teacher actor '{server_name}' is serving logits", quiet)
        teacher_job = {"mode": "live", "actor_name": server_name}
    elif d.teacher_mode == "inprocess":
        teacher_job = {"mode": "inprocess", "spec": t_spec, "state": ray.put(teacher_state)}

    kd_weights = dict(alpha=d.alpha, beta=d.beta)
    student_stage("student_kd", kd_path, kd_key,
                  lambda: {"cfg": cfg.to_dict(), "spec": s_spec, "data": data_ref, "teacher": teacher_job,
                           "init_state": init_state, "phases": [phase("distill", **student_phase, **kd_weights)]})

    # 4. prune while distilling, remove channels, fine-tune with KD ----------------------------------------------
    if p.ratio > 0:
        kd_payload = load_payload(kd_path)
        prune_cfg = {"ratio": p.ratio, "importance": p.importance, "schedule": p.schedule}
        phases = [phase("prune", p.epochs, p.lr, d.batch_size, d.weight_decay, **kd_weights, prune=prune_cfg,
                        remove_after=True)]
        if p.finetune_epochs > 0:
            phases.append(phase("finetune", p.finetune_epochs, p.lr, d.batch_size, d.weight_decay, **kd_weights))
        student_stage("student_pruned", prune_path, prune_key,
                      lambda: {"cfg": cfg.to_dict(), "spec": s_spec, "data": data_ref, "teacher": teacher_job,
                               "init_state": ray.put(kd_payload["state_dict"]), "phases": phases})

    server_stats = None
    if server is not None:
        server_stats = ray.get(server.get_stats.remote())
        ray.kill(server)

    # 5. evaluate every model on the held-out test split ---------------------------------------------------------
    t0 = time.perf_counter()
    x_test, y_test = torch.from_numpy(splits.test.x), torch.from_numpy(splits.test.y)
    example = x_test[:1]
    torch.set_num_threads(1)  # latency measured single-threaded: comparable across machines and runs
    models: dict[str, dict] = {}
    for name, path in (("teacher", None), ("student_baseline", baseline_path), ("student_kd", kd_path),
                       ("student_pruned", prune_path if p.ratio > 0 else None)):
        if name == "teacher":
            m = teacher
        elif path is None:
            continue
        else:
            m, _, _ = load_model(path)
        models[name] = model_summary(m.eval(), example, x_test, y_test)
    timings["evaluate"] = {"seconds": time.perf_counter() - t0}
    final_name = "student_pruned" if "student_pruned" in models else "student_kd"
    final, _, _ = load_model(prune_path if final_name == "student_pruned" else kd_path)
    if cfg.quantize.scheme != "none":
        t0 = time.perf_counter()
        models["student_int8"] = quantize_student(cfg, final, final_name, splits, out, example, x_test, y_test)
        timings["quantize"] = {"seconds": time.perf_counter() - t0}
    from raydistill.export import deploy_gate, export_if_gate_passes

    gate = deploy_gate(models[final_name]["accuracy"], models["teacher"]["accuracy"], cfg.deploy.min_accuracy,
                       cfg.deploy.min_ratio_to_teacher)
    exported = export_if_gate_passes(final.eval(), example, out / "deploy", gate)
    report_extra["deploy"] = {"model": final_name, "gate": gate, "export": exported}
    log(f"deploy gate: {gate['message']}", quiet)
    timings["total"] = {"seconds": time.perf_counter() - t_start}

    kd, base = models["student_kd"], models["student_baseline"]
    gains: dict[str, Any] = {"kd_accuracy_gain_vs_baseline": kd["accuracy"] - base["accuracy"],
                             "student_macs_vs_teacher": kd["macs"] / models["teacher"]["macs"]}
    if "student_pruned" in models:
        pr = models["student_pruned"]
        gains.update({"pruned_macs_vs_kd": pr["macs"] / kd["macs"], "pruned_params_vs_kd": pr["params"] / kd["params"],
                      "pruned_accuracy_change_vs_kd": pr["accuracy"] - kd["accuracy"],
                      "pruned_latency_b64_vs_kd": pr["latency_ms_b64"] / kd["latency_ms_b64"]})
    report = {"models": models, "timings": timings, "gains": gains, "data": {"name": splits.name,
              "fingerprint": data_fp, "train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
              "throughput": {k: v.get("samples_per_s_median") for k, v in cache.records.items()},
              "teacher_server": server_stats, "latency_threads": 1, **report_extra, "config": cfg.to_dict()}
    from raydistill.report import write_report

    write_report(out, report)
    write_manifest(out, config=cfg.to_dict())  # sha256 of every artifact: `raydistill verify RUN`
    log(f"done in {timings['total']['seconds']:.0f} s; report in {out / 'report.md'}", quiet)
    return report


def quantize_student(cfg: Config, final: torch.nn.Module, final_name: str, splits: Splits, out: Path,
                     example: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> dict:
    """Post-training int8 of the final student (torchao); the report row measured on the int8 model."""
    import io

    from raydistill.checkpoints import atomic_write_bytes
    from raydistill.core.metrics import accuracy, latency_ms
    from raydistill.core.quantize import quantize_int8

    scheme = cfg.quantize.scheme
    calib = torch.from_numpy(np.array(splits.val.x[: cfg.quantize.calibration_samples]))
    q = quantize_int8(final.eval(), scheme, calibration_data=calib)
    fp32 = model_summary(final.eval(), example, x_test[:2], y_test[:2])
    shape = tuple(example.shape[1:])
    if scheme == "pt2e_x86":  # an exported graph: saved as a torch.export program
        from raydistill.export import export_model

        info = export_model(q, example, out / "int8")
        size = sum((out / "int8" / f).stat().st_size for f in ("student.pt2",) if (out / "int8" / f).exists())
    else:
        buf = io.BytesIO()
        torch.save({"spec": load_payload(out / f"{final_name}.pt")["spec"], "scheme": scheme,
                    "state_dict": q.state_dict()}, buf)
        atomic_write_bytes(out / "student_int8.pt", buf.getvalue())
        size = len(buf.getvalue())
        info = None
    from raydistill.core.metrics import weight_sparsity

    return {"accuracy": accuracy(q, x_test, y_test), "params": fp32["params"], "macs": fp32["macs"],
            "latency_ms_b1": latency_ms(q, shape, batch_size=1), "latency_ms_b64": latency_ms(q, shape, batch_size=64),
            "size_bytes": size, "sparsity": weight_sparsity(q) if scheme != "pt2e_x86" else fp32["sparsity"],
            "scheme": scheme, "from": final_name, "export": info}


def _model(spec: dict, state: dict) -> torch.nn.Module:
    from raydistill.checkpoints import build_from_spec

    return build_from_spec({**spec, "plan": state["plan"]}, state["model"])
