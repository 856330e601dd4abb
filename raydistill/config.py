"""Run configuration: flat, typed dataclasses, validated once at the edge.

A config is a handful of sections (``data``, ``teacher``, ``student``, ``distill``, ``prune``,
``scale``), each a flat dataclass. The same dotted names (``distill.alpha``, ``prune.ratio``) are
the YAML keys, the ``--set`` overrides and the Ray Tune search keys. YAML is read with
``yaml.safe_load``, so a config never executes code. Every key, with its default, is documented
in docs/config.md (generated from the field comments below by ``raydistill config --doc``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raydistill.errors import ConfigError


@dataclass
class DataConfig:
    source: str = "digits"  # digits | cifar10 | imagefolder | parquet | noisy_digits (digits with 50% wrong training labels, the built-in KD benchmark)
    root: str | None = None  # folder for cifar10 / imagefolder (DIR/<class>/<image>, or DIR/train/<class>/... with DIR/val/... and/or DIR/test/...: those folders are its splits)
    path: str | None = None  # parquet file, folder, glob or pyarrow URI (s3://, gs://, ...)
    train: str | None = None  # parquet: the training split's file, folder, glob or URI (instead of path)
    val: str | None = None  # parquet: a declared validation split (else carved from train, seeded)
    test: str | None = None  # parquet: a declared test split, used as is (else carved at random)
    split_column: str | None = None  # parquet: a column of train/val/test naming each row's split
    stream: bool | None = None  # parquet: read through Ray Data batch by batch, never loaded whole; null = auto (parquet with an id column streams: a feature column or encoded images)
    shuffle_buffer: int = 4096  # streamed data: rows in each worker's local shuffle buffer (file order is also reshuffled per epoch)
    stream_buffer_mb: int = 256  # streamed data: object store memory Ray Data may fill reading ahead of training (its backpressure bound)
    local_copy_mb: int = 4096  # streamed data: a worker whose shard fits (and fits in half its free temp disk) keeps the rows its first epoch read in an unlinked local file and reads later epochs from it, fully shuffled; 0 = stream every epoch
    label_column: str = "label"  # parquet: integer class column (0..K-1)
    feature_column: str = "features"  # parquet: float lists, flat or nested per dimension, or data prepare's float32 bytes; uint8 lists of a (C, H, W) shape and data prepare's pixel bytes are 8-bit pixels
    image_column: str | None = None  # parquet: encoded image bytes column instead of features
    id_column: str = "id"  # parquet: stable sample id column (row order when absent)
    shape: list[int] | None = None  # parquet: a sample's [F], [C, L] or [C, H, W]; must match a shape the files record
    image_size: int | list[int] | None = None  # resize decoded images to this size: N (N x N) or [H, W] (default 32)
    val_fraction: float = 0.1  # share of the training pool held out for validation
    test_fraction: float = 0.2  # share held out for test when no test split is declared (cifar10: official)
    seed: int = 0  # split seed: same seed, same ids in each split
    limit: int | None = None  # keep at most this many samples per split (smoke runs)
    shard: str = "random"  # how training data is split across workers: random | classwise (in-memory data only)
    augment: str = "none"  # training inputs (images only): none | crop (random crop after zero padding) | crop_flip (+ horizontal flip: right for CIFAR, wrong for digits); val/test never augmented
    augment_pad: int = 0  # zero padding in pixels before the random crop; 0 = auto, max(1, min(H, W) // 8)


@dataclass
class TeacherConfig:
    model: str = "cnn"  # built-in name, torchvision name, timm:<name>, or package.module:function
    kwargs: dict[str, Any] = field(default_factory=lambda: {"widths": [64, 128], "hidden": 256})  # options passed to the model; the default is the built-in cnn's sizes: a config that names another model and sets no kwargs gives it none ({})
    checkpoint: str | None = None  # a teacher.pt to load instead of training one
    ensemble: list[str] = field(default_factory=list)  # more teacher.pt files: the teacher is then the weighted average of the logits of the run's teacher and these (live actor, cache and in-process alike)
    weights: list[float] | None = None  # one weight per teacher (the run's teacher first, then teacher.ensemble); null = equal
    pretrained: str | None = None  # weights the teacher starts from, then fine-tunes for teacher.epochs: a local state-dict file (.pt/.pth/.safetensors; weights_only) or the zoo's weight name (torchvision: IMAGENET1K_V1, DEFAULT; timm: a pretrained tag such as a1_in1k, or default), downloaded only when named here
    replace_head: bool = False  # with teacher.pretrained: train a new classifier head when the pretrained one has another class count (else that is an error)
    epochs: int = 10  # training epochs when no checkpoint is given
    lr: float = 0.003  # AdamW learning rate for the teacher
    batch_size: int = 64  # per-worker batch size for the teacher
    weight_decay: float = 0.0005


@dataclass
class StudentConfig:
    model: str = "cnn"  # built-in name, torchvision name, timm:<name>, or package.module:function
    kwargs: dict[str, Any] = field(default_factory=lambda: {"widths": [16, 32], "hidden": 64})  # options passed to the model; the default is the built-in cnn's sizes: a config that names another model and sets no kwargs gives it none ({})
    init_from_teacher: bool = False  # copy teacher tensors whose names and shapes match


@dataclass
class DistillConfig:
    alpha: float = 0.5  # weight of the soft KD loss; (1 - alpha) weighs label cross-entropy
    beta: float = 0.0  # weight of the hard-label (teacher argmax, DeiT) loss
    temperature: float = 4.0  # softmax temperature T of the soft loss (> 0)
    loss: str = "kd"  # kd (Hinton) | dkd (decoupled, Zhao 2022) | dist (Pearson, Huang 2022): the soft loss weighted by distill.alpha
    dkd_alpha: float = 1.0  # DKD: weight of the target-class term (TCKD)
    dkd_beta: float = 8.0  # DKD: weight of the non-target-class term (NCKD)
    dist_beta: float = 1.0  # DIST: weight of the inter-class term
    dist_gamma: float = 1.0  # DIST: weight of the intra-class term
    logit_standardize: bool = False  # z-score student and teacher logits before the temperature softmax (Sun 2024); kd and dkd
    never_worse: bool = True  # the KD or the label-only student, whichever has the better validation accuracy, goes on to pruning, quantization and export; false: always the KD student (a sweep's best_config.yaml: the sweep already chose on validation)
    lr: float = 0.003  # AdamW learning rate for the student (baseline and KD alike)
    epochs: int = 20  # student epochs: the baseline gets the same budget
    batch_size: int = 64  # per-worker batch size
    weight_decay: float = 0.0005
    teacher_mode: str = "live"  # live (shared actor) | inprocess (teacher copy per worker) | cache (Parquet logits)
    hint_student_layer: str | None = None  # student module name for FitNets hint loss
    hint_teacher_layer: str | None = None  # teacher module name for the hint loss
    hint_weight: float = 0.0  # weight of the hint (feature) loss
    grad_clip: float | None = None  # clip gradient norm to this value (None: off)
    precision: str = "fp32"  # fp32 | bf16 (autocast; CPU or GPU) | fp16 (autocast + GradScaler; GPU only)


@dataclass
class PruneConfig:
    ratio: float = 0.4  # fraction of channels removed per prunable layer group (kind unstructured: of weights zeroed per layer), in [0, 1); 0 = off
    kind: str = "channel"  # channel (channels removed: fewer MACs, faster) | unstructured (smallest |w| zeroed per layer: sparsity and sparse size, no dense speed-up)
    importance: str = "l1"  # l1 | bn_scale | taylor (channel); unstructured ranks weights by |w| (l1)
    schedule: str = "cubic"  # oneshot | linear | cubic (Zhu & Gupta 2017)
    epochs: int = 8  # KD epochs over which the schedule raises sparsity from 0 to ratio
    lr: float = 0.002  # learning rate while pruning and fine-tuning (cosine-decayed per phase)
    finetune_epochs: int = 10  # KD fine-tuning epochs after physical channel removal


@dataclass
class LowRankConfig:
    rank: int | None = None  # low-rank (SVD) stage after pruning: this rank for every Linear layer; null with energy null = off
    energy: float | None = None  # ... or per layer the smallest rank keeping this fraction of the squared singular values, in (0, 1]
    skip: list[str] | None = None  # Linear layer names left dense; null = the classifier (last Linear)
    finetune_epochs: int = 5  # KD fine-tuning epochs after the factorization
    lr: float = 0.001  # learning rate of that fine-tuning (cosine-decayed)


@dataclass
class CacheConfig:
    path: str | None = None  # logit cache folder or pyarrow URI (default: RUN/logit_cache)
    k: int | None = None  # store top-k probabilities instead of full fp16 logits (None: full)
    num_actors: int = 1  # teacher replicas in the Ray Data actor pool that builds the cache (streamed data, Train workers, a teacher GPU; in local mode on in-memory data the command's own process runs the teacher pass)
    batch_size: int = 512  # teacher batch size while building the cache
    views: int = 1  # augmented views per sample stored in the cache (FKD); the student trains on exactly these; > 1 needs data.augment
    topk_loss: str = "tail_filled"  # top-k caches: tail_filled (residual mass spread over the other classes) | sparse (KL over the teacher's top-k classes only, renormalised)


@dataclass
class QuantizeConfig:
    scheme: str = "auto"  # int8 scheme for student_int8: auto (weight_only_conv if the student has convolutions, else weight_only) | weight_only | weight_only_conv | dynamic | pt2e_x86 | none
    calibration_samples: int = 256  # validation samples used to calibrate pt2e_x86 and the onnx_int8 export


@dataclass
class DeployConfig:
    min_accuracy: float | None = None  # export the final student only if its test accuracy reaches this
    min_ratio_to_teacher: float | None = None  # ... and only if student/teacher accuracy reaches this
    formats: list[str] = field(default_factory=lambda: ["pt2"])  # what the final student is exported to: pt2 (deploy/student.pt2, torch.export) and/or onnx (deploy/student.onnx, torch's ONNX exporter, checked with ONNX Runtime on the test split) and/or onnx_int8 (deploy/student_int8.onnx, ONNX Runtime static int8 calibrated on quantize.calibration_samples validation samples)


@dataclass
class ReportConfig:
    latency_budget_s: float = 2.0  # seconds of timed CPU forwards per model and batch size (1 and 64) for the report's latency columns: up to 30 runs, at least 3 (0: 3 runs, e.g. a CPU smoke run of a GPU job's big models)


@dataclass
class ScaleConfig:
    num_workers: int | None = None  # Ray Train data-parallel workers; 0 = Ray Train local mode (training runs in this process, no worker start-up); null = auto: 0 when the command starts its own local Ray, 2 when it joins a cluster (--address / RAY_ADDRESS)
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 0.5  # fractional CPUs leave room for the teacher actor
    teacher_cpus: float = 0.5  # CPUs reserved for the shared teacher actor
    teacher_gpus: float = 0.0  # GPU (or fraction) for the shared teacher actor
    teacher_batch_window_ms: float = 2.0  # how long the actor waits to merge requests
    teacher_max_batch: int = 4096  # largest merged teacher batch
    teacher_prefetch: int = 4  # batches per teacher request; the next request is always in flight during the steps
    torch_threads: int = 1  # intra-op threads per worker (CPU); 0 = torch default
    resource_wait_s: float = 300.0  # on a cluster: how long to wait for autoscaled nodes before failing
    max_failures: int = 2  # times a multi-worker stage restarts from its last checkpoint after a worker died or failed (never on bad input)


@dataclass
class TuneConfig:
    # search space over any run keys: {key: {choice: [...]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]}
    # | {randint: [lo, hi]} | {grid: [...]}}, e.g. distill.loss: {choice: [kd, dkd, dist]}
    space: dict[str, Any] = field(default_factory=lambda: {
        "prune.ratio": {"choice": [0.25, 0.4, 0.5]},
        "distill.alpha": {"choice": [0.0, 0.3, 0.5, 0.7, 0.9]},
        "distill.temperature": {"choice": [1.0, 2.0, 4.0, 8.0]},
        "distill.lr": {"loguniform": [0.001, 0.01]},
    })
    search: str = "random"  # random | grid (Tune's basic variant generator) | optuna (Bayesian, TPE)
    scheduler: str = "asha"  # asha (early stopping on val_acc) | none
    num_trials: int = 12  # trials to sample (grid: repeats of the whole grid)
    max_concurrent: int = 2  # trials running at once
    cpus_per_trial: float = 1.0  # logical CPUs per trial (Ray is started with at least 4 locally)
    grace_period: int = 8  # ASHA: epochs every trial runs before it can be stopped
    reuse_actors: bool = True  # a new trial runs in a finished trial's process (Ray Tune's reuse_actors): no process start and imports per trial; false: a fresh process for every trial
    teacher_mode: str = "cache"  # cache (one teacher pass for the whole sweep) | live (shared actor) | inprocess (each trial its own teacher copy: the costly baseline)
    max_macs: int | None = None  # best_config.yaml: best accuracy among trials under this many MACs
    max_latency_ms: float | None = None  # ... and under this batch-1 latency


@dataclass
class TrackConfig:
    mlflow: bool = False  # log to MLflow: config params, per-epoch metrics of every stage (a nested run each), report rows, report.md/.json/.png; tune: a nested run per trial
    mlflow_uri: str | None = None  # MLflow tracking URI (http://host:5000, sqlite:///path.db); null = sqlite:///RUN/mlflow/mlflow.db, a store in the run folder
    mlflow_experiment: str = "raydistill"  # MLflow experiment the runs go to
    tensorboard: bool = False  # TensorBoard event files with each stage's per-epoch metrics in RUN/tensorboard/<stage>/


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    lowrank: LowRankConfig = field(default_factory=LowRankConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    seed: int = 0  # seed for model init and data order

    # ---- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def section_hash(self, *names: str) -> str:
        """sha256 of the named sections (or top-level keys); keys the stage caches."""
        d = self.to_dict()
        blob = json.dumps({n: d[n] for n in names}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: tp for name, tp in hints.items() if dataclasses.is_dataclass(tp)}


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. ``distill.alpha``."""
    keys = []
    for sec, cls in _sections().items():
        keys += [f"{sec}.{f.name}" for f in dataclasses.fields(cls)]
    keys += [f.name for f in dataclasses.fields(Config) if f.name not in _sections()]
    return keys


def get(cfg: Config, dotted: str) -> Any:
    """The value of a dotted key such as ``distill.alpha`` (or ``seed``)."""
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, all_keys() + list(_sections()), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else "; valid keys are listed in docs/config.md"


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list [a, b, ...]",
          dict: "a mapping {name: value}"}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotated type ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors, kinds = [], [a for a in args if a is not type(None)]
        for a in kinds:
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(e)
        lists = [e for a, e in zip(kinds, errors) if typing.get_origin(a) is list]
        if isinstance(value, (list, tuple)) and lists:  # a list: what is wrong inside it
            raise lists[0]
        if len(kinds) > 1:  # e.g. int | list[int]: name every form it takes
            raise ConfigError(f"{key} must be {' or '.join(_KINDS.get(typing.get_origin(a) or a, str(a)) for a in kinds)}"
                              f", got {value!r}")
        raise errors[0]
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}; write it as [a, b, ...]")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(key, v, inner) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}; write it as {{name: value}}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string: accept it as the number it is
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise AssertionError(f"unhandled config type {tp} for {key}")


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        close = difflib.get_close_matches(value, options, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{key} must be one of {', '.join(options)}, got '{value}'{hint}")


def validate(cfg: Config) -> Config:
    """Range and choice checks that types alone cannot express. Raises ConfigError.

    Every choice list comes from the module that implements the choices (one owner: a new data source,
    pruning importance or search algorithm is accepted here as soon as its module lists it)."""
    from raydistill import augment, data, export, job, sweep
    from raydistill.core import losses, pruning, quantize

    d, p, s = cfg.distill, cfg.prune, cfg.scale
    _choice("data.source", cfg.data.source, data.SOURCES)
    _choice("data.shard", cfg.data.shard, data.SHARD_MODES)
    _choice("data.augment", cfg.data.augment, augment.AUGMENTS)
    try:
        data.image_hw(cfg.data.image_size)
    except ValueError as e:
        raise ConfigError(f"data.{e}") from None
    _choice("distill.teacher_mode", d.teacher_mode, job.TEACHER_MODES)
    _choice("distill.precision", d.precision, tuple(job.PRECISIONS))
    _choice("distill.loss", d.loss, losses.LOGIT_LOSSES)
    _choice("cache.topk_loss", cfg.cache.topk_loss, tuple(losses.TOPK_LOSSES))
    if d.precision == "fp16" and not cfg.scale.use_gpu:
        raise ConfigError("distill.precision=fp16 needs scale.use_gpu=true (CPU fp16 autocast is slow and unscaled); "
                          "use bf16 on CPU")
    _choice("prune.importance", p.importance, pruning.IMPORTANCES)
    _choice("prune.schedule", p.schedule, pruning.SCHEDULES)
    _choice("prune.kind", p.kind, pruning.PRUNE_KINDS)
    if p.kind == "unstructured" and p.importance != "l1":
        raise ConfigError(f"prune.kind=unstructured ranks single weights by magnitude (l1), got "
                          f"prune.importance={p.importance}; set prune.importance=l1 or prune.kind=channel")
    checks = [
        (cfg.report.latency_budget_s >= 0.0, "report.latency_budget_s must be >= 0 seconds",
         cfg.report.latency_budget_s),
        (0.0 <= d.alpha <= 1.0, "distill.alpha must be in [0, 1]", d.alpha),
        (d.beta >= 0.0, "distill.beta must be >= 0", d.beta),
        (d.temperature > 0.0, "distill.temperature must be > 0", d.temperature),
        (d.lr > 0.0, "distill.lr must be > 0", d.lr),
        (d.epochs >= 1, "distill.epochs must be >= 1", d.epochs),
        (d.batch_size >= 1, "distill.batch_size must be >= 1", d.batch_size),
        (d.hint_weight >= 0.0, "distill.hint_weight must be >= 0", d.hint_weight),
        (d.dkd_alpha >= 0.0, "distill.dkd_alpha must be >= 0", d.dkd_alpha),  # NaN fails >= too
        (d.dkd_beta >= 0.0, "distill.dkd_beta must be >= 0", d.dkd_beta),
        (d.dist_beta >= 0.0, "distill.dist_beta must be >= 0", d.dist_beta),
        (d.dist_gamma >= 0.0, "distill.dist_gamma must be >= 0", d.dist_gamma),
        (d.grad_clip is None or d.grad_clip > 0, "distill.grad_clip must be > 0 or null", d.grad_clip),
        (0.0 <= p.ratio < 1.0, "prune.ratio must be in [0, 1)", p.ratio),
        (p.epochs >= 1, "prune.epochs must be >= 1", p.epochs),
        (p.lr > 0, "prune.lr must be > 0", p.lr),
        (p.finetune_epochs >= 0, "prune.finetune_epochs must be >= 0", p.finetune_epochs),
        (cfg.teacher.epochs >= 1, "teacher.epochs must be >= 1", cfg.teacher.epochs),
        (cfg.teacher.lr > 0, "teacher.lr must be > 0", cfg.teacher.lr),
        (cfg.teacher.batch_size >= 1, "teacher.batch_size must be >= 1", cfg.teacher.batch_size),
        (cfg.cache.k is None or cfg.cache.k >= 1, "cache.k must be >= 1 or null", cfg.cache.k),
        (cfg.cache.num_actors >= 1, "cache.num_actors must be >= 1", cfg.cache.num_actors),
        (cfg.cache.batch_size >= 1, "cache.batch_size must be >= 1", cfg.cache.batch_size),
        (cfg.cache.views >= 1, "cache.views must be >= 1", cfg.cache.views),
        (cfg.data.augment_pad >= 0, "data.augment_pad must be >= 0 (0 = auto)", cfg.data.augment_pad),
        (s.num_workers is None or s.num_workers >= 0, "scale.num_workers must be >= 0 (0: local mode) or null",
         s.num_workers),
        (s.cpus_per_worker > 0, "scale.cpus_per_worker must be > 0", s.cpus_per_worker),
        (s.teacher_cpus >= 0, "scale.teacher_cpus must be >= 0", s.teacher_cpus),
        (s.teacher_gpus >= 0, "scale.teacher_gpus must be >= 0", s.teacher_gpus),
        (s.teacher_batch_window_ms >= 0, "scale.teacher_batch_window_ms must be >= 0", s.teacher_batch_window_ms),
        (s.teacher_prefetch >= 1, "scale.teacher_prefetch must be >= 1", s.teacher_prefetch),
        (s.max_failures >= -1, "scale.max_failures must be >= 0 (or -1: retry forever)", s.max_failures),
        (s.teacher_max_batch >= 1, "scale.teacher_max_batch must be >= 1", s.teacher_max_batch),
        (0.0 < cfg.data.val_fraction < 1.0, "data.val_fraction must be in (0, 1)", cfg.data.val_fraction),
        (0.0 < cfg.data.test_fraction < 1.0, "data.test_fraction must be in (0, 1)", cfg.data.test_fraction),
        (cfg.data.limit is None or cfg.data.limit >= 1, "data.limit must be >= 1 or null", cfg.data.limit),
        (cfg.data.shuffle_buffer >= 1, "data.shuffle_buffer must be >= 1", cfg.data.shuffle_buffer),
        (cfg.data.stream_buffer_mb >= 1, "data.stream_buffer_mb must be >= 1", cfg.data.stream_buffer_mb),
        (cfg.data.local_copy_mb >= 0, "data.local_copy_mb must be >= 0 (0: no local copy)", cfg.data.local_copy_mb),
        # numpy's generators (the splits, the shards, the views) take non-negative seeds; < 2**32 for all of them
        (0 <= cfg.seed < 2**32, "seed must be in [0, 2**32)", cfg.seed),
        (0 <= cfg.data.seed < 2**32, "data.seed must be in [0, 2**32)", cfg.data.seed),
    ]
    for ok, msg, value in checks:
        if not ok:
            raise ConfigError(f"{msg}, got {value!r}; fix it in the config or with --set")
    _choice("quantize.scheme", cfg.quantize.scheme, (*quantize.SCHEMES, "none"))
    for key, v in (("deploy.min_accuracy", cfg.deploy.min_accuracy),
                   ("deploy.min_ratio_to_teacher", cfg.deploy.min_ratio_to_teacher)):
        if v is not None and not 0.0 <= v <= 1.5:
            raise ConfigError(f"{key} must be a fraction like 0.95 or null, got {v!r}; "
                              "fix it in the config or with --set")
    lr = cfg.lowrank
    if lr.rank is not None and lr.energy is not None:
        raise ConfigError(f"lowrank.rank={lr.rank} and lowrank.energy={lr.energy} are both set; set one of them")
    for ok, msg, value in [
        (lr.rank is None or lr.rank >= 1, "lowrank.rank must be >= 1 or null", lr.rank),
        (lr.energy is None or 0.0 < lr.energy <= 1.0, "lowrank.energy must be in (0, 1] or null", lr.energy),
        (lr.finetune_epochs >= 1, "lowrank.finetune_epochs must be >= 1", lr.finetune_epochs),
        (lr.lr > 0, "lowrank.lr must be > 0", lr.lr),
    ]:
        if not ok:
            raise ConfigError(f"{msg}, got {value!r}; fix it in the config or with --set")
    tw, members = cfg.teacher.weights, cfg.teacher.ensemble
    if tw is not None:
        if len(tw) != 1 + len(members):
            raise ConfigError(f"teacher.weights has {len(tw)} entries for {1 + len(members)} teachers (the run's "
                              f"teacher and {len(members)} in teacher.ensemble); give one weight per teacher, "
                              "the run's teacher first")
        if not all(w >= 0.0 for w in tw) or not sum(tw) > 0:  # NaN fails >= too
            raise ConfigError(f"teacher.weights must be >= 0 (not NaN) with a positive sum, got {tw}; "
                              "fix it in the config or with --set")
    if not cfg.deploy.formats or len(set(cfg.deploy.formats)) != len(cfg.deploy.formats):
        raise ConfigError(f"deploy.formats must list each format once, got {cfg.deploy.formats!r}; "
                          f"use some of {', '.join(export.DEPLOY_FORMATS)}, e.g. [pt2, onnx]")
    for f in cfg.deploy.formats:
        _choice("deploy.formats", f, export.DEPLOY_FORMATS)
    t = cfg.tune
    _choice("tune.search", t.search, sweep.SEARCHES)
    _choice("tune.scheduler", t.scheduler, sweep.SCHEDULERS)
    _choice("tune.teacher_mode", t.teacher_mode, job.TEACHER_MODES)
    for ok, msg, value in [
        (t.num_trials >= 1, "tune.num_trials must be >= 1", t.num_trials),
        (t.max_concurrent >= 1, "tune.max_concurrent must be >= 1", t.max_concurrent),
        (t.cpus_per_trial > 0, "tune.cpus_per_trial must be > 0", t.cpus_per_trial),
        (t.grace_period >= 1, "tune.grace_period must be >= 1", t.grace_period),
        (t.max_macs is None or t.max_macs >= 1, "tune.max_macs (--max-macs) must be >= 1 or null", t.max_macs),
        (t.max_latency_ms is None or t.max_latency_ms > 0, "tune.max_latency_ms (--max-latency-ms) must be > 0 or null",
         t.max_latency_ms),
    ]:
        if not ok:
            raise ConfigError(f"{msg}, got {value!r}; fix it in the config or with --set")
    for key, spec in t.space.items():
        if key not in all_keys() or key.startswith("tune."):
            raise ConfigError(f"tune.space key '{key}' is not a run key{_suggest(key)}")
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in sweep.SPACE_KINDS):
            raise ConfigError(f"tune.space['{key}'] must be one of "
                              f"{{{', '.join(k + ': ...' for k in sweep.SPACE_KINDS)}}}, got {spec!r}")
    if "distill.alpha" in t.space:
        kind, values = next(iter(t.space["distill.alpha"].items()))
        reachable = 0.0 in values if kind in ("choice", "grid") else values[0] <= 0.0
        if not reachable:
            raise ConfigError("tune.space['distill.alpha'] must include 0 (labels only) so the sweep can never be "
                              "worse than the plain student; add 0.0 to it")
    if t.search == "optuna" and any("grid" in spec for spec in t.space.values()):
        raise ConfigError("tune.search=optuna cannot sample a grid; use choice instead of grid in tune.space")
    if cfg.cache.views > 1 and cfg.data.augment == "none":
        raise ConfigError(f"cache.views > 1 needs data.augment (got cache.views={cfg.cache.views} "
                          "with data.augment=none: every view would be the same image); "
                          "set data.augment=crop or cache.views=1")
    view_keys = [k for k in t.space if k in ("data.augment", "data.augment_pad", "cache.views")
                 or (k == "seed" and cfg.data.augment != "none")]  # the keys that define the augmented views
    if view_keys and t.teacher_mode == "cache":
        raise ConfigError(f"tune.space searches {', '.join(view_keys)}, but with tune.teacher_mode=cache "
                          "every trial reads the one logit cache, whose augmented views are fixed; "
                          "remove it from tune.space or set tune.teacher_mode=live")
    if "distill.loss" in t.space:  # a misspelt or impossible loss would fail every trial that draws it
        kind, values = next(iter(t.space["distill.loss"].items()))
        for value in values if kind in ("choice", "grid") else ():
            _choice("tune.space['distill.loss']", value, losses.LOGIT_LOSSES)
        if d.logit_standardize and "dist" in values:
            raise ConfigError("tune.space['distill.loss'] includes dist, which does not take "
                              "distill.logit_standardize=true; remove dist from it or set "
                              "distill.logit_standardize=false")
    if d.logit_standardize and d.loss == "dist":
        raise ConfigError("distill.logit_standardize is for the KL losses (kd, dkd); DIST's Pearson correlation "
                          "already ignores the scale and shift of the probabilities; set "
                          "distill.logit_standardize=false or distill.loss=kd or dkd")
    if d.logit_standardize and d.teacher_mode == "cache" and cfg.cache.k is not None:
        raise ConfigError(f"distill.logit_standardize needs the teacher's logits, but a top-k cache "
                          f"(cache.k={cfg.cache.k}) holds only its k largest probabilities; set cache.k=null "
                          "(full logits) or distill.logit_standardize=false")
    if (d.hint_student_layer is None) != (d.hint_teacher_layer is None):
        raise ConfigError(
            "distill.hint_student_layer and distill.hint_teacher_layer must be set together; set both or neither"
        )
    if d.hint_student_layer is not None and d.teacher_mode != "inprocess":
        raise ConfigError(
            "the hint (feature) loss needs the teacher's inner features: set distill.teacher_mode=inprocess"
        )
    if d.hint_weight > 0 and d.hint_student_layer is None:
        raise ConfigError("distill.hint_weight > 0 needs distill.hint_student_layer and distill.hint_teacher_layer")
    if cfg.teacher.pretrained is not None and cfg.teacher.checkpoint is not None:
        raise ConfigError("teacher.pretrained and teacher.checkpoint are both set; a checkpoint is the finished "
                          "teacher, pretrained weights are where its training starts: set one of them")
    if cfg.data.source == "parquet" and not (cfg.data.path or cfg.data.train):
        raise ConfigError("data.source is parquet but neither data.path nor data.train is set; "
                          "set data.path (or data.train) to the parquet file or folder")
    if cfg.data.source in ("cifar10", "imagefolder") and not cfg.data.root:
        raise ConfigError(f"data.source is {cfg.data.source} but data.root is not set; set data.root to its folder")
    return cfg


MODEL_SECTIONS = ("teacher", "student")
DEFAULT_MODEL = "cnn"  # the model whose sizes the default teacher.kwargs / student.kwargs are


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested dicts, rejecting unknown keys with a suggestion."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    sections = _sections()
    hints = typing.get_type_hints(Config)
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in hints:
            raise ConfigError(f"unknown config key '{name}'{_suggest(name)}")
        if name in sections:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"section '{name}' must be a mapping of keys, got {value!r}")
            cls = sections[name]
            fhints = typing.get_type_hints(cls)
            sec_kwargs = {}
            for key, v in value.items():
                dotted = f"{name}.{key}"
                if key not in fhints:
                    raise ConfigError(f"unknown config key '{dotted}'{_suggest(dotted)}")
                sec_kwargs[key] = _coerce(dotted, v, fhints[key])
            if name in MODEL_SECTIONS and sec_kwargs.get("model", DEFAULT_MODEL) != DEFAULT_MODEL \
                    and "kwargs" not in sec_kwargs:
                # the default kwargs are the built-in cnn's sizes (widths, hidden): another model named without
                # kwargs of its own would be handed options it does not take
                sec_kwargs["kwargs"] = {}
            kwargs[name] = cls(**sec_kwargs)
        else:
            kwargs[name] = _coerce(name, value, hints[name])
    return validate(absolute_paths(Config(**kwargs)))


WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def is_weights_file(value: str) -> bool:
    """``teacher.pretrained``: a path (by its suffix, a folder separator, or because it exists), not a model zoo's
    weight name."""
    return Path(value).suffix in WEIGHT_FILE_SUFFIXES or os.sep in value or Path(value).exists()


def _absolute(value: str | None) -> str | None:
    """A local path made absolute against the current directory (``~`` expanded); a URI (``s3://...``) as is."""
    if value is None or "://" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))


def absolute_paths(cfg: Config) -> Config:
    """``cfg`` with its local file and folder paths absolute, as the command's current directory gives them. Why:
    Ray Tune runs each trial in a folder of its own and Ray's worker processes need not share this process's
    current directory, so a relative ``data.train: train.parquet`` was found by ``run`` and not by a sweep's
    trials (FileNotFoundError in every trial). A resolved config (``config.yaml`` of a run) keeps them absolute."""
    data = dataclasses.replace(cfg.data, **{key: _absolute(getattr(cfg.data, key))
                                            for key in ("root", "path", "train", "val", "test")})
    pretrained = cfg.teacher.pretrained  # a weights file, or the name of zoo weights (IMAGENET1K_V1), kept as is
    teacher = dataclasses.replace(
        cfg.teacher, checkpoint=_absolute(cfg.teacher.checkpoint),
        ensemble=[_absolute(path) for path in cfg.teacher.ensemble],
        pretrained=_absolute(pretrained) if pretrained is not None and is_weights_file(pretrained) else pretrained)
    cache = dataclasses.replace(cfg.cache, path=_absolute(cfg.cache.path))
    return dataclasses.replace(cfg, data=data, teacher=teacher, cache=cache)


def parse_override(item: str) -> tuple[str, Any]:
    """``section.key=value`` → (dotted key, YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set expects section.key=value, got '{item}'")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge dotted-key overrides into a nested raw dict (before validation)."""
    raw = json.loads(json.dumps(raw or {}))  # deep copy of plain data
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) == 1:
            raw[key] = value
        elif len(parts) == 2:
            sec = raw.setdefault(parts[0], {})
            if not isinstance(sec, dict):
                raise ConfigError(f"section '{parts[0]}' must be a mapping")
            sec[parts[1]] = value
        else:
            raise ConfigError(f"config keys have the form section.key, got '{key}'{_suggest(key)}")
    return raw


def load(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (or the embedded default when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass an existing YAML file or none for the default")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" at line {line + 1}" if line is not None else ""
            raise ConfigError(f"config file {p} is not valid YAML{where}; fix the syntax") from None
    return from_dict(apply_overrides(raw, overrides or {}))


def doc_table() -> str:
    """Markdown table of every key, its type and default (docs/config.md)."""
    import inspect

    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for sec, cls in _sections().items():
        src = inspect.getsource(cls).splitlines()
        comments = {}
        for line in src:
            line = line.strip()
            if ":" in line and "#" in line and not line.startswith("#"):
                comments[line.split(":", 1)[0].strip()] = line.split("#", 1)[1].strip()
        inst = cls()
        for f in dataclasses.fields(cls):
            tp = (str(typing.get_type_hints(cls)[f.name])
                  .replace("typing.", "").replace("<class '", "").replace("'>", ""))
            default = json.dumps(getattr(inst, f.name))
            meaning = comments.get(f.name, "").replace("|", "\\|")
            rows.append(f"| `{sec}.{f.name}` | {tp.replace('|', 'or')} | `{default}` | {meaning} |")
    rows.append("| `seed` | int | `0` | seed for model init and data order |")
    return "\n".join(rows)
