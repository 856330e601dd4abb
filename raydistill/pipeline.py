"""``raydistill run``: the distillation pipeline on Ray, as named stages over one run context.

    open_run ─> teacher ‖ student_baseline (labels only, same budget) ─> [logit cache]
             ─> teacher source (shared TeacherServer actor | in-process copies | cache)
             ─> student_kd (Ray Train, KD) ─> student_pruned (prune while distilling, remove channels,
                KD fine-tune) ─> evaluate on the test split ─> int8 ─> deploy gate + export ─> report

``run()`` calls the stages in that order; each stage is a function of the ``RunContext`` (config, run
folder, data, model specs, stage records, timings) that can be called and tested alone, and
``cache-logits`` and ``tune`` reuse ``open_run`` and ``prepare_teacher``. Each Train stage is keyed by a
hash of everything it depends on (config sections, the data fingerprint, the upstream checkpoint's
sha256); a stage whose checkpoint exists with the same key is skipped, so rerunning the same command
resumes. Ray Train runs are named deterministically, so an interrupted stage resumes from its last epoch
checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydistill import config as config_mod
from raydistill import job as jobs
from raydistill.checkpoints import (
    atomic_write_text,
    build_from_spec,
    load_model,
    load_payload,
    model_spec,
    save_model,
    spec_input_shape,
)
from raydistill.cluster import (
    cache_actor_cpus,
    cache_in_process,
    check_local_cpus,
    check_resources,
    init_ray,
    init_ray_in_background,
    joins_cluster,
    ray_in_process,
    resolve_scale,
    resource_needs,
)
from raydistill.config import Config
from raydistill.console import log
from raydistill.data import Splits, fingerprint, image_side, input_normalization, is_image, load_splits
from raydistill.errors import CacheError, CheckpointError, ConfigError, DataError, ModelError, RunFolderError
from raydistill.evaluate import evaluate_on_test, quantize_student
from raydistill.job import StageJob, TeacherSource
from raydistill.locks import folder_problem, make_folder
from raydistill.manifest import digest, sha256_file, write_manifest
from raydistill.redact import redact_obj
from raydistill.stream import StreamData, plan_stream, streams, write_aside
from raydistill.teacher import cache_settings, check_cache_for_run
from raydistill.trainer import in_background


# ---- the run context and what the stages hand each other ---------------------------------------------------
@dataclass
class RunContext:
    """What every stage of one run reads: built once by ``open_run``; stages add only to ``timings``."""

    cfg: Config
    out: Path
    quiet: bool
    splits: Splits | StreamData  # in memory, or streamed from Parquet (raydistill/stream.py): same reading interface
    data_fp: str
    # ray.ObjectRef of in-memory ``splits`` (workers read it zero-copy), or the StreamData itself; while Ray
    # starts beside the teacher (``ray_start``), the Splits themselves: local mode trains in this process
    data_ref: Any
    t_spec: dict  # model specs (checkpoints.model_spec) of the teacher and the student
    s_spec: dict
    stages: StageCache
    timings: dict[str, dict] = field(default_factory=dict)
    ray_start: Future | None = None  # a private local Ray starting on a helper thread (open_run)
    uses_ray: bool = True  # False: a local-mode run that starts no Ray at all (open_run: ``no_ray_reason``)

    def log(self, msg: str) -> None:
        log(msg, self.quiet)

    def share(self, value: Any) -> Any:
        """``value`` (a state dict) for a stage job: in Ray's object store (``ray.put``: Train workers, Tune trials
        and actors read it zero-copy), or the value itself when this command starts no Ray (the local-mode loop runs
        here and reads it as it is: ``job.resolve``)."""
        if not self.uses_ray:
            return value
        import ray

        self.wait_for_ray()
        return ray.put(value)

    def wait_for_ray(self) -> None:
        """Wait for the Ray that ``open_run`` started in the background (no-op when it was started there)."""
        if self.ray_start is None:
            return
        t0 = time.perf_counter()
        seconds = self.ray_start.result()
        self.ray_start = None
        check_resources(self.cfg)  # immediate on a private local Ray; open_run checked its CPUs (check_local_cpus)
        waited = time.perf_counter() - t0
        self.timings["ray_start"] = {"seconds": seconds, "waited": waited, "beside": "teacher"}
        self.log(f"private local Ray ready in {seconds:.1f} s (started beside the teacher; waited {waited:.1f} s "
                 "for it)")

    @property
    def common_key(self) -> str:
        """What every stage's result depends on: the data, the seed and the number of workers."""
        return digest(self.cfg.section_hash("data", "seed"), self.data_fp, self.cfg.scale.num_workers)

    def stage_job(self, stage: str, spec: dict, phases: tuple[jobs.Phase, ...], teacher: TeacherSource | None = None,
                  init_state: Any = None) -> StageJob:
        return StageJob(stage=stage, config=self.cfg, spec=spec, data=self.data_ref, phases=phases, teacher=teacher,
                        init_state=init_state, journal=str(self.out / "journal.jsonl"), verbose=not self.quiet)


@dataclass(frozen=True)
class Teacher:
    """The run's teacher (trained here or loaded) and, when asked for, its logit cache."""

    model: torch.nn.Module
    spec: dict
    sha256: str
    path: Path
    cache: dict | None = None  # cache.CacheInfo fields plus "uri"

    def state(self) -> dict:
        return {k: v.clone() for k, v in self.model.state_dict().items()}


# ---- opening a run: validate everything the user gave, before writing anything -------------------------------
def open_run(cfg: Config, out: str | Path, address: str | None, quiet: bool, uses_cache: bool,
             verbose: bool = False, run_stages: bool = False, cache_only: bool = False,
             sweep: bool = False) -> RunContext:
    """Check the run folder, data, models, a given cache and the cluster; then start Ray and write config.yaml
    (with ``scale.num_workers`` resolved: the config a run folder holds is the one that ran).

    Where the run needs no Ray for its first stage (``starts_ray_beside``), Ray starts on a helper thread and this
    returns at once: ``prepare_teacher`` trains the teacher meanwhile and then calls ``ctx.wait_for_ray()``, as
    must anything else that uses Ray first. There, ``run`` (``run_stages``) with the cached or in-process teacher or
    with every stage up to date, and ``cache-logits`` (``cache_only``), start no Ray at all (``no_ray_reason``):
    the command would use it for nothing. A private Ray starts Ray's dashboard for a ``sweep`` (Tune needs its
    State API) or with ``verbose`` (Ray's own view of the run), not otherwise: nothing else here uses it
    (``cluster.init_ray``)."""
    out = Path(out).resolve()
    cfg = resolve_scale(cfg, address)
    if out.is_dir():
        take_run_folder(out, quiet)  # a live command in it refuses this one at once, before anything is loaded
    check_run_folder(out, cfg)
    if uses_cache:
        check_cache_location(cfg.cache.path)
    t0 = time.perf_counter()
    streamed = streams(cfg.data)
    if streamed and cfg.data.shard == "classwise" and cfg.scale.num_workers != 0:
        # Ray Data hands each Train worker an equal part of the stream (streaming_split); a split by class would
        # need every worker to read every row. Refused rather than silently split at random.
        raise ConfigError("data.shard=classwise splits in-memory data by class, but this Parquet data is streamed "
                          "and Ray Data splits the stream into equal parts; set data.stream=false (the data then "
                          "loads into memory) or data.shard=random")
    splits = plan_stream(cfg.data) if streamed else load_data(cfg)
    data_fp = splits.fingerprint if streamed else fingerprint(splits)
    K = splits.num_classes
    data_s = time.perf_counter() - t0
    # a feature column with per-channel statistics holds 8-bit pixels (prepared, or uint8 lists): not numbers as is
    eight_bit = splits.name == "parquet" and cfg.data.image_column is None and splits.channel_stats is not None
    log(f"data {splits.name}: {splits.rows('train')} train / {splits.rows('val')} val / {splits.rows('test')} test, "
        f"{K} classes, sample shape {splits.shape}"
        + (" of 8-bit pixels (scaled to [0, 1], standardized per channel)" if eight_bit else "")
        + (", streamed from Parquet (Ray Data into the Train workers)" if streamed else ", in memory"), quiet)
    for name, part in splits.describe().items():
        if part["from"].startswith("declared"):
            log(f"data {name} split: {part['from']}", quiet)
    check_augment(cfg, splits.shape)
    validate_models(cfg, K, splits.shape)
    check_deploy_formats(cfg, model_spec(cfg.student.model, cfg.student.kwargs, K, splits.shape), splits.shape)
    if cfg.teacher.pretrained:  # the weights fit the teacher (downloaded now when named): before any training
        from raydistill.pretrained import pretrained_state

        pretrained_state(model_spec(cfg.teacher.model, cfg.teacher.kwargs, K, splits.shape), cfg.teacher.pretrained,
                         cfg.teacher.replace_head)
    from raydistill.track import check_tracking

    check_tracking(cfg, out)  # an unreachable tracking server fails here, before any training
    # the logit cache's actor pool runs only when the cache is still to build, and not in local mode on in-memory
    # data (this process runs the teacher pass): its CPUs are asked only then
    # (check_given_cache also refuses a given cache of another teacher or data: always asked)
    builds_cache = uses_cache and not check_given_cache(cfg, out, data_fp, image_side(splits.shape)) and \
        not cache_in_process(cfg, streamed)
    # Ray's start takes seconds (6-9 s on a 2-core laptop): say so before, not only after, the wait
    import ray

    already = ray_in_process()  # a script's own ray.init() before this API call (or an earlier command here)
    where = address or os.environ.get("RAY_ADDRESS") or (already and ray.get_runtime_context().gcs_address)
    cluster = f"the Ray cluster at {where}" if joins_cluster(address) else None
    s = cfg.scale
    mode = ("Ray Train local mode (scale.num_workers=0): every stage trains in this process" if s.num_workers == 0
            else f"Ray Train: {s.num_workers} data-parallel workers per stage")
    timings = {"data": {"seconds": data_s}}
    if not cluster and not already:  # a private Ray's CPUs are known: refused before it starts
        check_local_cpus(cfg, builds_cache=builds_cache)
    beside = starts_ray_beside(cfg, address, streamed)
    dashboard = sweep or verbose  # a private Ray's (a cluster keeps its own): see the docstring
    if not beside:
        if not ray.is_initialized():
            log(f"connecting to {cluster} ..." if cluster else "starting a private local Ray ...", quiet)
        t0 = time.perf_counter()
        init_ray(address, quiet, verbose, dashboard=dashboard)
        check_resources(cfg, builds_cache=builds_cache)
        ray_s = time.perf_counter() - t0
        timings["ray_start"] = {"seconds": ray_s}
        ready = f"ready in {ray_s:.1f} s"
        if already:
            ray_where = (f"{cluster}, which this process had already joined" if cluster else
                         "the local Ray already running in this process")
        else:
            ray_where = f"{cluster} ({ready})" if cluster else \
                f"a private local Ray ({ready}; pass --address to use a running cluster)"
        log(f"{mode}, on {ray_where}", quiet)
    make_folder(out, RunFolderError, OUT_FIX)
    take_run_folder(out, quiet)  # a new folder: held from its creation on
    if streamed:
        t0 = time.perf_counter()
        splits, aside = write_aside(splits, out / "splits")
        if aside:
            aside_s = time.perf_counter() - t0
            timings["data"]["seconds"] += aside_s
            rows = " / ".join(f"{n:,} {name}" for name, n in aside["splits"].items())
            log(f"data: {rows} rows {aside['action']} in {out / 'splits'} ({aside_s:.1f} s): "
                "each evaluation reads them there, not filtered out of every file", quiet)
    atomic_write_text(out / "config.yaml", cfg.to_yaml())
    ctx = RunContext(cfg=cfg, out=out, quiet=quiet, splits=splits, data_fp=data_fp,
                     data_ref=splits if streamed or beside else ray.put(splits),
                     t_spec=model_spec(cfg.teacher.model, cfg.teacher.kwargs, K, splits.shape),
                     s_spec=model_spec(cfg.student.model, cfg.student.kwargs, K, splits.shape),
                     stages=StageCache(out), timings=timings)
    no_ray = beside and no_ray_reason(ctx, run_stages=run_stages, cache_only=cache_only)
    if no_ray:
        ctx.uses_ray = False
        from raydistill.console import quiet_libraries

        quiet_libraries(verbose)  # what starting Ray would have done for the console (torchao's import warning)
        log(mode + no_ray, quiet)
    elif beside:
        log(f"{mode}, on a private local Ray starting beside the teacher (pass --address to use a running cluster)",
            quiet)
        ctx.ray_start = init_ray_in_background(address, quiet, verbose, dashboard=dashboard)
    return ctx


def no_ray_reason(ctx: RunContext, run_stages: bool, cache_only: bool) -> str | None:
    """Why this local-mode command on in-memory data (``starts_ray_beside``) needs no Ray at all, as the end of its
    console line; None when it does. Every stage then trains in this process, the teacher's and students' tensors
    are handed over as they are (``RunContext.share``), evaluation, int8 and export run here too, and the only use
    left for Ray is the live teacher's actor: ``run`` (``run_stages``) with the in-process or cached teacher, or a
    rerun with every stage up to date (``needs_no_ray``), and ``cache-logits`` (``cache_only``: its teacher pass
    runs here, ``cache_in_process``), start none.
    Why: a private Ray that nothing uses cost such a command ~10 CPU-s on 2 cores (its GCS, raylet, dashboard and
    agents, started beside the teacher), its wait for that start when the teacher was done first, and its stop at
    the end; `raydistill run best_config.yaml` of a sweep (local mode, the sweep's logit cache) is such a run."""
    cfg = ctx.cfg
    if cache_only:
        return ", the logit cache's teacher pass too; this command starts no Ray"
    if not run_stages:
        return None
    if cfg.distill.teacher_mode == "cache":
        return ", the logit cache built and read here too; this command starts no Ray"
    if cfg.distill.teacher_mode == "inprocess":
        return ", the teacher's forward passes too (distill.teacher_mode=inprocess); this command starts no Ray"
    return "; all are up to date, so this rerun starts no Ray" if needs_no_ray(ctx) else None


def needs_no_ray(ctx: RunContext) -> bool:
    """Whether this local-mode run with the live teacher is a rerun of a finished one that uses Ray for nothing:
    the teacher and every student stage up to date (their keys as ``run`` computes them: the actor starts only for
    a student stage still to train, ``students_to_train``). Why: a rerun of a finished default run waited 4.4 s of
    its 15 s for a private Ray that nothing used (docs/benchmarks.md). Any doubt answers False, and Ray starts as
    before."""
    cfg = ctx.cfg
    if cfg.distill.teacher_mode != "live":
        return False
    if cfg.teacher.checkpoint:
        path = Path(cfg.teacher.checkpoint)
    else:
        path = ctx.out / "teacher.pt"
        if not ctx.stages.done("teacher", teacher_key(ctx), path):
            return False
    if not ctx.stages.done("student_baseline", baseline_key(ctx, ""), ctx.out / "student_baseline.pt"):
        return False
    kd_key, prune_key = student_keys(ctx, sha256_file(path))
    return not students_to_train(ctx, kd_key, prune_key, lowrank_key(cfg, prune_key))


def starts_ray_beside(cfg: Config, address: str | None, streamed: bool) -> bool:
    """Whether Ray can start on a helper thread while the teacher trains: a private local Ray (no cluster to
    join) in Ray Train's local mode on in-memory data needs no Ray until the teacher's logits are served
    (``TorchTrainer`` with ``num_workers=0`` runs the loop here and starts no actor), and a private Ray's start
    is most of a laptop run's fixed cost (6-9 s on 2 cores, ``benchmarks/overhead.py``) while the teacher trains
    on one thread (``scale.torch_threads``). Only when it asks for CPUs alone, which ``open_run`` has already
    checked against the private Ray's (``check_local_cpus``), so that a request it cannot meet is still refused
    before any training."""
    import ray

    return (not ray.is_initialized() and not joins_cluster(address) and cfg.scale.num_workers == 0 and not streamed
            and set(resource_needs(cfg)) == {"CPU"})


# ---- the pipeline -----------------------------------------------------------------------------------------
def run(cfg: Config, out: str | Path, address: str | None = None, quiet: bool = False,
        verbose: bool = False) -> dict:
    """The whole pipeline; returns the report (also written to report.json/.md/.png in ``out``)."""
    t_start = time.perf_counter()
    ctx = open_run(cfg, out, address, quiet, uses_cache=cfg.distill.teacher_mode == "cache", verbose=verbose,
                   run_stages=True)
    cfg = ctx.cfg

    # 1. teacher (and its logit cache) and 2. the label-only student. With Train workers the two Train runs go
    # side by side (most of a stage's wall time on a small machine is Train's fixed start-up, which then
    # overlaps), unless the baseline starts from the teacher's tensors. Local mode trains here, a stage at a time.
    cached = cfg.distill.teacher_mode == "cache"
    sequential = cfg.student.init_from_teacher or cfg.scale.num_workers == 0
    if sequential:
        teacher = prepare_teacher(ctx, with_cache=cached)
    else:
        baseline = in_background(train_baseline, ctx, None, "")  # a daemon thread: Ctrl-C never waits for it
        teacher = prepare_teacher(ctx)
        baseline.result()
        teacher = with_logit_cache(ctx, teacher) if cached else teacher
    kd_key, prune_key = student_keys(ctx, teacher.sha256)
    lowrank = lowrank_key(cfg, prune_key)
    # the teacher source the config asks for; a live actor's process starts while the baseline trains
    source, server = open_teacher_source(ctx, teacher, cfg.distill.teacher_mode,
                                         start_actor=students_to_train(ctx, kd_key, prune_key, lowrank))
    init_state = init_state_from_teacher(ctx, teacher) if cfg.student.init_from_teacher else None
    if sequential:
        train_baseline(ctx, init_state, teacher.sha256 if cfg.student.init_from_teacher else "")

    # 3. KD and 4. prune while distilling
    if server is not None:
        import_for_later_stages(cfg)  # this process would only wait for the actor's process to start
    wait_for_teacher_server(ctx, source, server)
    train_kd(ctx, kd_key, source, init_state)
    selection = choose_student(ctx)  # never worse than training alone: the better one on validation goes on
    if cfg.prune.ratio > 0:
        prune_student(ctx, prune_key, source, selection["chosen"])
    if lowrank is not None:  # optional: SVD-factorize the Linear layers of the student so far, KD fine-tune
        lowrank_student(ctx, lowrank, source, "student_pruned" if cfg.prune.ratio > 0 else selection["chosen"])
    server_stats = stop_teacher_server(source, server)

    # 5. evaluate every model on the held-out test split, then int8 and the deploy gate
    models = timed(ctx, "evaluate", evaluate_models, ctx, teacher)
    final_name = next(n for n in ("student_lowrank", "student_pruned", selection["chosen"]) if n in models)
    final, final_spec, _ = load_model(ctx.out / f"{final_name}.pt")
    if cfg.quantize.scheme != "none":
        models["student_int8"] = timed(ctx, "quantize", quantize_student, cfg, final, final_name, models[final_name],
                                       final_spec, ctx.splits, ctx.out)
        q = models["student_int8"]
        ctx.log(f"int8: {final_name} quantized with {q['scheme']} ({q['scheme_reason']}), "
                f"{models[final_name]['size_bytes'] / q['size_bytes']:.1f}x smaller")
    deploy = timed(ctx, "deploy", deploy_student, ctx, final, final_name, models)
    ctx.timings["total"] = {"seconds": time.perf_counter() - t_start}

    report = build_report(ctx, models, server_stats, teacher, deploy, selection)
    if cfg.prune.ratio > 0:
        report["pruning"] = pruning_coverage(ctx)
    report = redact_obj(report)  # credentials in a data or cache URI: masked in report.json/.md and MLflow
    from raydistill.report import write_report

    write_report(ctx.out, report)
    write_manifest(ctx.out, config=cfg.to_dict())  # sha256 of every artifact: `raydistill verify RUN`
    if cfg.track.mlflow or cfg.track.tensorboard:
        from raydistill.track import log_run

        log_run(cfg, ctx.out, report, {s: r["history"] for s, r in ctx.stages.records.items() if r.get("history")})
    ctx.log(f"done in {ctx.timings['total']['seconds']:.0f} s")  # the CLI prints the table and report.md's path
    return report


# ---- the stages -----------------------------------------------------------------------------------------------
def where(cfg: Config) -> str:
    n = cfg.scale.num_workers
    return "Ray Train local mode" if n == 0 else f"{n} Ray Train workers"


def timed(ctx: RunContext, name: str, fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    ctx.timings[name] = {"seconds": time.perf_counter() - t0}
    return result


def prepare_teacher(ctx: RunContext, with_cache: bool = False) -> Teacher:
    """The teacher: loaded from ``teacher.checkpoint`` or trained on Ray Train (skipped when up to date);
    with ``with_cache``, also its logit cache (``cache-logits`` and ``tune`` call this)."""
    cfg, t0 = ctx.cfg, time.perf_counter()
    if cfg.teacher.checkpoint:
        path = Path(cfg.teacher.checkpoint)
        model, spec, _ = load_model(path)
        check_teacher_classes(cfg, spec, ctx.splits.num_classes)
        ctx.timings["teacher"] = {"seconds": time.perf_counter() - t0, "skipped": True}
    else:
        path = ctx.out / "teacher.pt"
        key = teacher_key(ctx)
        if ctx.stages.done("teacher", key, path):
            ctx.timings["teacher"] = {"seconds": ctx.stages.records["teacher"]["seconds"], "skipped": True}
            ctx.log("stage teacher: up to date, skipped")
        else:
            init = teacher_init_state(ctx)
            ctx.log(f"stage teacher: training {cfg.teacher.model} ({where(cfg)})"
                    + (f", from pretrained {cfg.teacher.pretrained}" if init is not None else ""))
            train_model(ctx, "teacher", key, path, ctx.stage_job("teacher", ctx.t_spec, jobs.teacher_phases(cfg),
                                                                 init_state=init))
            ctx.timings["teacher"] = {"seconds": time.perf_counter() - t0}
        model, spec, _ = load_model(path)
    teacher = Teacher(model=model, spec=spec, sha256=sha256_file(path), path=path)
    if cfg.teacher.ensemble:
        teacher = with_ensemble(ctx, teacher)
    here = with_cache and cache_in_process(cfg, isinstance(ctx.splits, StreamData))
    if here:
        teacher = with_logit_cache(ctx, teacher)  # in this process: while Ray may still be starting
    ctx.wait_for_ray()  # the stages after the teacher's use Ray (its actor, the cache's pool, the object store)
    return with_logit_cache(ctx, teacher) if with_cache and not here else teacher


def with_ensemble(ctx: RunContext, teacher: Teacher) -> Teacher:
    """``teacher.ensemble``: the run's teacher and those checkpoints as one model that serves the weighted
    average of their logits (``teacher.weights``); every teacher source (actor, cache, in-process) serves it."""
    from raydistill.ensemble import TeacherEnsemble, ensemble_spec, load_members

    members = load_members(ctx.cfg.teacher.ensemble)
    weights = ctx.cfg.teacher.weights or [1.0] * (1 + len(members))
    model = TeacherEnsemble([teacher.model] + [m for m, _, _ in members], weights).eval()
    spec = ensemble_spec([teacher.spec] + [s for _, s, _ in members], weights)
    ctx.log(f"teacher: weighted average of {1 + len(members)} teachers' logits, weights {weights}")
    return dataclasses.replace(teacher, model=model, spec=spec,
                               sha256=digest(teacher.sha256, [sha for _, _, sha in members], weights))


def baseline_key(ctx: RunContext, teacher_sha: str) -> str:
    """The label-only student's key: the student, its budget and (with ``student.init_from_teacher``) the teacher."""
    cfg, d = ctx.cfg, ctx.cfg.distill
    budget = dict(epochs=d.epochs, lr=d.lr, batch_size=d.batch_size, weight_decay=d.weight_decay)
    return digest(ctx.common_key, cfg.section_hash("student"), teacher_sha, "baseline", budget)
def teacher_key(ctx: RunContext) -> str:
    """The teacher stage's key: the data, seed and workers (``common_key``) and the teacher section."""
    return digest(ctx.common_key, teacher_hash(ctx.cfg))


def teacher_hash(cfg: Config) -> str:
    """What the teacher stage's result depends on in the teacher section: ``section_hash("teacher")`` without
    ``pretrained``/``replace_head`` while they are unset (so the keys of runs made before they existed still
    match), and with a pretrained weights file's sha256."""
    import hashlib

    t = dataclasses.asdict(cfg.teacher)
    if t["pretrained"] is None:
        del t["pretrained"], t["replace_head"]
    else:
        from raydistill.pretrained import is_weights_file

        if is_weights_file(t["pretrained"]) and Path(t["pretrained"]).is_file():
            t["pretrained_sha256"] = sha256_file(Path(t["pretrained"]))
    return hashlib.sha256(json.dumps({"teacher": t}, sort_keys=True, default=str).encode()).hexdigest()


def teacher_init_state(ctx: RunContext):
    """``teacher.pretrained``: the teacher's initial weights for its stage (``RunContext.share``; None: a fresh
    init)."""
    if ctx.cfg.teacher.pretrained is None:
        return None
    from raydistill.pretrained import pretrained_state

    return ctx.share(pretrained_state(ctx.t_spec, ctx.cfg.teacher.pretrained, ctx.cfg.teacher.replace_head))


def train_baseline(ctx: RunContext, init_state: Any, teacher_sha: str) -> None:
    """The student on labels only, with the KD student's budget: the reference every gain is measured against."""
    key = baseline_key(ctx, teacher_sha)
    train_student(ctx, "student_baseline", key, ctx.stage_job("student_baseline", ctx.s_spec,
                                                               jobs.baseline_phases(ctx.cfg), init_state=init_state))


def student_keys(ctx: RunContext, teacher_sha: str) -> tuple[str, str]:
    """The keys of the KD and the pruned student (``teacher_sha``: the teacher's sha256): what their checkpoints
    were made from."""
    cfg = ctx.cfg
    cached = cfg.distill.teacher_mode == "cache"
    student_common = digest(ctx.common_key, cfg.section_hash("student"),
                            teacher_sha if cfg.student.init_from_teacher else "")
    kd_key = digest(student_common, teacher_sha, cfg.section_hash("distill"), cfg.cache.k if cached else None,
                    # views only when > 1, so the keys of runs made before cache.views existed still match
                    *([cfg.cache.views] if cached and cfg.cache.views > 1 else []),
                    cfg.cache.topk_loss if cached and cfg.cache.k else None)  # how the top-k became the target
    # the pruned student starts from the KD or the label-only student, whichever choose_student picks: a
    # function of both checkpoints, so of both keys
    base_key = baseline_key(ctx, teacher_sha if cfg.student.init_from_teacher else "")
    return kd_key, digest(kd_key, base_key, "chosen on val_acc", cfg.section_hash("prune"))


def train_kd(ctx: RunContext, key: str, source: TeacherSource | None, init_state: Any) -> None:
    train_student(ctx, "student_kd", key, ctx.stage_job("student_kd", ctx.s_spec, jobs.kd_phases(ctx.cfg),
                                                        teacher=source, init_state=init_state))


def choose_student(ctx: RunContext) -> dict:
    """Never worse than training alone: of the KD student and the label-only student (same budget), the one with
    the better *validation* accuracy goes on to pruning, quantization and export (a tie keeps the KD student;
    ``distill.never_worse: false`` always keeps it). The test split only reports."""
    from raydistill.evaluate import val_accuracy

    val = {name: val_accuracy(load_model(ctx.out / f"{name}.pt")[0], ctx.splits)
           for name in ("student_kd", "student_baseline")}
    kd, base = val["student_kd"], val["student_baseline"]
    chosen = "student_kd" if kd >= base or not ctx.cfg.distill.never_worse else "student_baseline"
    reason = (f"validation accuracy: KD student {kd:.4f} vs label-only student {base:.4f}; "
              + ("distill.never_worse=false, so the KD student goes on" if not ctx.cfg.distill.never_worse else
                 "the KD student is not worse, so it goes on" if chosen == "student_kd" else
                 "distillation did not help on validation, so the label-only student goes on"))
    ctx.log(f"chosen student: {chosen} ({reason})")
    return {"chosen": chosen, "val_accuracy": val, "reason": reason}


def prune_student(ctx: RunContext, key: str, source: TeacherSource | None, start: str = "student_kd") -> None:
    """Prune the chosen student (``start``: ``choose_student``) while distilling, remove the channels, fine-tune
    with KD."""
    if ctx.stages.done("student_pruned", key, ctx.out / "student_pruned.pt"):
        train_student(ctx, "student_pruned", key, None)  # records the skip
        return
    start_state = ctx.share(load_payload(ctx.out / f"{start}.pt")["state_dict"])
    job = ctx.stage_job("student_pruned", ctx.s_spec, jobs.prune_phases(ctx.cfg), teacher=source,
                        init_state=start_state)
    # it continues the KD student: its epochs follow KD's, as in a sweep trial that runs both in one loop
    train_student(ctx, "student_pruned", key, dataclasses.replace(job, first_epoch=ctx.cfg.distill.epochs))


def lowrank_key(cfg: Config, prune_key: str) -> str | None:
    """The low-rank student's key (it continues the pruned one), or None when ``lowrank`` is off."""
    return digest(prune_key, cfg.section_hash("lowrank")) if lowrank_on(cfg) else None


def lowrank_on(cfg: Config) -> bool:
    return cfg.lowrank.rank is not None or cfg.lowrank.energy is not None


def lowrank_ranks(cfg: Config, model: torch.nn.Module) -> dict[str, int]:
    """The SVD rank of each Linear layer the low-rank stage factorizes (``lowrank.rank`` or ``lowrank.energy``,
    ``lowrank.skip``); a rank that does not fit a layer is a ConfigError naming it."""
    from raydistill.core.surgery import low_rank_ranks

    r = cfg.lowrank
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    skip = r.skip if r.skip is not None else linears[-1:]  # by default the classifier keeps its full rank
    for name in skip:
        if name not in linears:
            close = difflib.get_close_matches(name, linears, n=1)
            raise ConfigError(f"lowrank.skip names '{name}', which is not a Linear layer of the student"
                              + (f"; did you mean '{close[0]}'?" if close else f"; its Linear layers: {linears}"))
    try:
        ranks = low_rank_ranks(model, rank=r.rank, energy=r.energy, skip=skip)
    except ValueError as e:
        raise ConfigError(f"lowrank.rank: {e}; lower lowrank.rank, use lowrank.energy, or leave the layer dense "
                          "with lowrank.skip") from None
    if not ranks:
        setting = f"lowrank.rank={r.rank}" if r.rank is not None else f"lowrank.energy={r.energy}"
        raise ConfigError(f"{setting} leaves no Linear layer of the student with fewer parameters (skipped: "
                          f"{skip}); lower it, or set lowrank.rank and lowrank.energy to null to turn the stage off")
    return ranks


def lowrank_student(ctx: RunContext, key: str, source: TeacherSource | None, start: str) -> None:
    """Factorize the Linear layers of the ``start`` student by truncated SVD (core.surgery), fine-tune with KD."""
    from raydistill.core.surgery import low_rank_factorize_

    if ctx.stages.done("student_lowrank", key, ctx.out / "student_lowrank.pt"):
        train_student(ctx, "student_lowrank", key, None)  # records the skip
        return
    cfg = ctx.cfg
    model, spec, _ = load_model(ctx.out / f"{start}.pt")
    ranks = lowrank_ranks(cfg, model)
    report = low_rank_factorize_(model, ranks=ranks)
    ctx.log(f"low rank: {start}'s Linear layers factorized, " + ", ".join(
        f"{n} rank {v['rank']} ({v['params_before']:,} -> {v['params_after']:,} params, rel. error "
        f"{v['rel_error']:.3f})" for n, v in report.items() if n != "skipped"))
    state = ctx.share({k: v.detach().clone() for k, v in model.state_dict().items()})
    job = ctx.stage_job("student_lowrank", {**spec, "lowrank": ranks}, jobs.lowrank_phases(cfg), teacher=source,
                        init_state=state)
    done_epochs = cfg.distill.epochs + (sum(p.epochs for p in jobs.prune_phases(cfg)) if start == "student_pruned"
                                        else 0)
    train_student(ctx, "student_lowrank", key, dataclasses.replace(job, first_epoch=done_epochs))


def train_student(ctx: RunContext, stage: str, key: str, job: StageJob | None) -> None:
    """Run a student stage on Ray Train unless its checkpoint is up to date; record its time and throughput."""
    path, t0 = ctx.out / f"{stage}.pt", time.perf_counter()
    if ctx.stages.done(stage, key, path):
        ctx.timings[stage] = {"seconds": ctx.stages.records[stage]["seconds"], "skipped": True}
        ctx.log(f"stage {stage}: up to date, skipped")
        return
    ctx.log(f"stage {stage}: training {ctx.cfg.student.model} ({where(ctx.cfg)})")
    train_model(ctx, stage, key, path, job)
    ctx.timings[stage] = {"seconds": time.perf_counter() - t0}


def train_model(ctx: RunContext, stage: str, key: str, path: Path, job: StageJob) -> None:
    """Fit ``job`` on Ray Train, save the final model as ``path`` and record the stage as done."""
    from raydistill.trainer import fit

    t0 = time.perf_counter()
    state, result = fit(job, key, ctx.out)
    spec = {**job.spec, "plan": state["plan"]}
    save_model(path, build_from_spec(spec, state["model"]), spec, {"stage": stage, "key": key})
    sps = [h["samples_per_s_global"] for h in (result.return_value or {}).get("history", [])]
    history = [{k: v for k, v in h.items() if isinstance(v, (int, float, str))}
               for h in (result.return_value or {}).get("history", [])]
    ctx.stages.record(stage, key, path, time.perf_counter() - t0,  # the history: track.log_run, also on a rerun
                      {"samples_per_s_median": sorted(sps)[len(sps) // 2] if sps else None, "history": history})


def init_state_from_teacher(ctx: RunContext, teacher: Teacher):
    """``student.init_from_teacher``: the student's initial tensors, copied from the teacher where they fit."""
    from raydistill.core.surgery import init_from_teacher_

    torch.manual_seed(ctx.cfg.seed)
    student0 = build_from_spec(ctx.s_spec)
    copied = init_from_teacher_(student0, teacher.model)
    ctx.log(f"init from teacher: copied {len(copied['copied'])} tensors")
    return ctx.share({k: v.clone() for k, v in student0.state_dict().items()})


def with_logit_cache(ctx: RunContext, teacher: Teacher) -> Teacher:
    """The teacher with its logit cache: reused if it matches this teacher, data, k and augmented views; built
    (one teacher pass by a Ray Data actor pool, or by this process: ``cache_in_process``) when absent. A
    user-given cache that does not match is refused.
    Commands building one cache at the same moment take turns (``cache.build_lock``): after waiting, the cache
    is checked again, so the teacher pass runs once and every command reads the one finished cache."""
    from raydistill.cache import build_cache, build_lock

    cfg, t0 = ctx.cfg, time.perf_counter()
    uri = cfg.cache.path or str(ctx.out / "logit_cache")
    info = reusable_cache(ctx, uri, teacher)
    built = False
    if info is None:
        with build_lock(uri, lambda who: ctx.log(f"logit cache {uri}: another command is building it ({who}); "
                                                 "waiting for it")):
            info = reusable_cache(ctx, uri, teacher)
            if info is None:
                transform = cache_settings(cfg, image_side(ctx.splits.shape))["transform"]
                in_process = cache_in_process(cfg, isinstance(ctx.splits, StreamData))
                ctx.log(f"logit cache: one teacher pass over {ctx.splits.rows('train')} samples x {cfg.cache.views} "
                        f"view(s) ({transform}) "
                        + ("in this process (local mode)" if in_process else
                           f"with {cfg.cache.num_actors} actor(s) (Ray Data)"))
                info = build_cache(uri, teacher_spec=teacher.spec, teacher_state=teacher.state(),
                                   teacher_sha256=teacher.sha256, splits=ctx.splits, data_fingerprint=ctx.data_fp,
                                   k=cfg.cache.k, views=cfg.cache.views, augment=cfg.data.augment,
                                   augment_pad=cfg.data.augment_pad, seed=cfg.seed, num_actors=cfg.cache.num_actors,
                                   cpus_per_actor=cache_actor_cpus(cfg),
                                   num_gpus_per_actor=cfg.scale.teacher_gpus, batch_size=cfg.cache.batch_size,
                                   num_threads=cfg.scale.torch_threads, in_process=in_process)
                built = True
    ctx.timings["logit_cache"] = {"seconds": time.perf_counter() - t0, **({} if built else {"skipped": True})}
    return dataclasses.replace(teacher, cache={**info.__dict__, "uri": uri})


def reusable_cache(ctx: RunContext, uri: str, teacher: Teacher):
    """The cache at ``uri`` (its ``cache.CacheInfo``) if it fits this run; None when there is none to reuse. A
    user-given cache that does not fit is refused (CacheError), never overwritten."""
    try:
        info = check_cache_for_run(ctx.cfg, uri, teacher.sha256, ctx.data_fp, image_side(ctx.splits.shape))
    except CacheError:
        if ctx.cfg.cache.path and cache_exists(uri):
            raise
        return None
    ctx.log(f"logit cache {uri}: up to date ({info.rows} rows), reused")
    return info


def students_to_train(ctx: RunContext, kd_key: str, prune_key: str, lowrank_key: str | None = None) -> bool:
    """Whether the KD, pruned or low-rank student still has to be trained (else no teacher actor is needed)."""
    done = ctx.stages.done("student_kd", kd_key, ctx.out / "student_kd.pt")
    return not (done and (ctx.cfg.prune.ratio == 0
                          or ctx.stages.done("student_pruned", prune_key, ctx.out / "student_pruned.pt"))
                and (lowrank_key is None
                     or ctx.stages.done("student_lowrank", lowrank_key, ctx.out / "student_lowrank.pt")))


def open_teacher_source(ctx: RunContext, teacher: Teacher, mode: str, start_actor: bool = True):
    """The teacher source for ``mode`` (``distill.teacher_mode``, or ``tune.teacher_mode`` for a sweep's trials),
    and the TeacherServer actor when one is started (``live``, unless ``start_actor`` is false because every
    student stage is up to date). The actor's process starts in the background: ``wait_for_teacher_server``."""
    from raydistill.teacher import start_teacher_server, teacher_actor_name

    if mode == "cache":
        return jobs.cached_teacher(teacher.cache["uri"], {k: v for k, v in teacher.cache.items() if k != "uri"}), None
    if mode == "inprocess":
        return jobs.inprocess_teacher(teacher.spec, ctx.share(teacher.state())), None
    if not start_actor:  # every student stage is up to date: no actor, so none to name (the name takes Ray's job id,
        # and a finished local-mode rerun runs without Ray: ``needs_no_ray``)
        return jobs.live_teacher(""), None
    name = teacher_actor_name(teacher.sha256)  # this run's own actor: another run's end never stops it
    ctx.timings["teacher_server_start"] = {"seconds": 0.0, "started": time.perf_counter()}
    return jobs.live_teacher(name), start_teacher_server(name, teacher.spec, teacher.state(), ctx.cfg.scale,
                                                         wait=False)


def wait_for_teacher_server(ctx: RunContext, source: TeacherSource, server) -> None:
    """Wait until the actor is ready; its start time (from the request, overlapping the baseline) is recorded."""
    if server is None:
        return
    import ray

    from raydistill.teacher import wait_ready

    wait_ready(server)
    started = ctx.timings["teacher_server_start"].pop("started")
    ctx.timings["teacher_server_start"]["seconds"] = time.perf_counter() - started
    where = {"name": source.actor_name, "pid": ray.get(server.pid.remote()),
             "node": ray.get_runtime_context().get_node_id()}
    atomic_write_text(ctx.out / "teacher_server.json", json.dumps(where))
    ctx.log(f"teacher actor '{source.actor_name}' is serving logits")


def import_for_later_stages(cfg: Config) -> None:
    """Import what the run's last steps use (torchao for int8, matplotlib for report.png) while the teacher
    actor's process starts (``run`` calls it there; a sweep has no int8 step): the driver has nothing else to do
    then, and the imports cost ~1.2 s on 2 cores (a profile of the default run: torchao 0.5 s, matplotlib 0.6 s)
    that would otherwise come after; Torch-Pruning too when the run prunes (0.9 s here, with timm and torchvision:
    the torch._dynamo they import is already loaded by then, by the first stage's optimizer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    if cfg.quantize.scheme != "none":
        import torchao.quantization  # noqa: F401
    if cfg.prune.ratio > 0:
        import torch_pruning  # noqa: F401  (imported on first use: raydistill.core.pruning._tp)


def stop_teacher_server(source: TeacherSource | None, server) -> dict | None:
    """The actor's statistics (requests, merged forward passes), then stop it."""
    if server is None:
        return None
    from raydistill import teacher as teachers

    return teachers.stop_teacher_server(source.actor_name, server)


def evaluate_models(ctx: RunContext, teacher: Teacher) -> dict[str, dict]:
    """One report row per model, measured on the held-out test split (``evaluate.evaluate_on_test``)."""
    budget = ctx.cfg.report.latency_budget_s
    models = {"teacher": evaluate_on_test(teacher.model, ctx.splits, budget)}
    for name in ("student_baseline", "student_kd", "student_pruned", "student_lowrank"):
        if (name == "student_pruned" and ctx.cfg.prune.ratio == 0) or (name == "student_lowrank"
                                                                       and not lowrank_on(ctx.cfg)):
            continue
        models[name] = evaluate_on_test(load_model(ctx.out / f"{name}.pt")[0], ctx.splits, budget)
    if "student_pruned" in models and ctx.cfg.prune.kind == "unstructured":  # zeros stored dense: say so
        from raydistill.core.metrics import sparse_size_bytes

        models["student_pruned"]["sparse_size_bytes"] = sparse_size_bytes(load_model(ctx.out / "student_pruned.pt")[0])
    return models


def deploy_student(ctx: RunContext, final: torch.nn.Module, final_name: str, models: dict) -> dict:
    """Export the final student (``deploy/``) if it passes the deploy gate; what happened, for the report."""
    from raydistill.evaluate import test_example
    from raydistill.export import deploy_gate, export_if_gate_passes

    gate = deploy_gate(models[final_name]["accuracy"], models["teacher"]["accuracy"], ctx.cfg.deploy.min_accuracy,
                       ctx.cfg.deploy.min_ratio_to_teacher)
    formats = ctx.cfg.deploy.formats
    exported = (export_if_gate_passes(final.eval(), test_example(ctx.splits), ctx.out / "deploy", gate,
                                      input_normalization(ctx.splits.name, ctx.splits.channel_stats))
                if "pt2" in formats else None)
    ctx.log(f"deploy gate: {gate['message']}")
    onnx = deploy_onnx(ctx, final, models[final_name], gate) if {"onnx", "onnx_int8"} & set(formats) else {}
    return {"model": final_name, "gate": gate, "export": exported, **onnx}


def deploy_onnx(ctx: RunContext, final: torch.nn.Module, row: dict, gate: dict) -> dict:
    """``deploy.formats`` with onnx: ``deploy/student.onnx``, checked with ONNX Runtime on the test split; with
    onnx_int8: ``deploy/student_int8.onnx``, ONNX Runtime's static int8, calibrated on validation samples. The
    report's ``deploy`` entries ``onnx`` and ``onnx_int8`` (``None`` when the gate failed)."""
    from raydistill.onnx_export import ONNX_FILE, export_onnx, export_onnx_int8, remove_stale_onnx

    formats = ctx.cfg.deploy.formats
    if not gate["passed"]:
        return {f: None for f in ("onnx", "onnx_int8") if f in formats}
    remove_stale_onnx(ctx.out / "deploy")
    data = ctx.splits  # in memory or streamed: the test split is read batch by batch
    example = torch.from_numpy(data.head("test", 2)[0])

    def test_batches():
        return ((torch.as_tensor(x), torch.as_tensor(y)) for x, y, _ in data.batches("test"))

    normalization = input_normalization(data.name, data.channel_stats)  # artifact.json's, as the pt2 export's
    out: dict[str, dict | None] = {}
    if "onnx" in formats:
        info = out["onnx"] = export_onnx(final, test_batches, example, ctx.out / "deploy", row, normalization,
                                         ctx.cfg.report.latency_budget_s)
        ctx.log(f"ONNX: {info['file']} matches PyTorch on the test split (accuracy {info['accuracy']:.4f}, largest "
                f"logit difference {info['max_abs_diff']:.2g}); ONNX Runtime {info['latency_ms_b1']:.3f} ms at batch "
                f"1, {info['latency_ms_b64']:.3f} ms at 64 (PyTorch {row['latency_ms_b1']:.3f} / "
                f"{row['latency_ms_b64']:.3f})")
    if "onnx_int8" in formats:
        fp32 = (ctx.out / "deploy" / ONNX_FILE).read_bytes() if "onnx" in formats else None
        calibration = torch.from_numpy(data.head("val", ctx.cfg.quantize.calibration_samples)[0])
        info = out["onnx_int8"] = export_onnx_int8(final, fp32, test_batches, example, calibration,
                                                   ctx.out / "deploy", row, normalization,
                                                   ctx.cfg.report.latency_budget_s)
        ctx.log(f"ONNX int8: {info['file']} (ONNX Runtime static int8, {info['calibration_samples']} calibration "
                f"samples) {info['fp32_onnx_size_bytes'] / info['size_bytes']:.1f}x smaller than fp32 ONNX, accuracy "
                f"{info['accuracy']:.4f} (PyTorch fp32 {info['torch_accuracy']:.4f}); {info['latency_ms_b1']:.3f} ms "
                f"at batch 1, {info['latency_ms_b64']:.3f} ms at 64")
    return out


def pruning_coverage(ctx: RunContext) -> dict:
    """Which layer groups of the student channel pruning reaches, and why the others are left whole (the
    classifier, attention projections, LayerNorm-coupled widths, ...): the report says it plainly."""
    from raydistill.core.pruning import ChannelPruner

    model = build_from_spec(ctx.s_spec).eval()
    pruner = ChannelPruner(model, torch.zeros(1, *spec_input_shape(ctx.s_spec)), importance="l1")
    return {"pruned_groups": sorted(pruner.channels), "not_pruned": pruner.skipped}


def build_report(ctx: RunContext, models: dict, server_stats: dict | None, teacher: Teacher, deploy: dict,
                 selection: dict | None = None) -> dict:
    kd, base = models["student_kd"], models["student_baseline"]
    gains: dict[str, Any] = {"kd_accuracy_gain_vs_baseline": kd["accuracy"] - base["accuracy"],
                             "student_macs_vs_teacher": kd["macs"] / models["teacher"]["macs"]}
    if selection is not None:
        gains["chosen_accuracy_gain_vs_baseline"] = models[selection["chosen"]]["accuracy"] - base["accuracy"]
    if "student_pruned" in models:
        pr = models["student_pruned"]
        gains.update({"pruned_macs_vs_kd": pr["macs"] / kd["macs"], "pruned_params_vs_kd": pr["params"] / kd["params"],
                      "pruned_accuracy_change_vs_kd": pr["accuracy"] - kd["accuracy"],
                      "pruned_latency_b64_vs_kd": pr["latency_ms_b64"] / kd["latency_ms_b64"]})
        if "sparse_size_bytes" in pr:  # unstructured: same dense shapes and MACs; smaller only when stored sparse
            gains.update({"pruned_sparsity": pr["sparsity"],
                          "pruned_sparse_size_vs_kd_dense_size": pr["sparse_size_bytes"] / kd["size_bytes"]})
    if "student_lowrank" in models:
        lr, before = models["student_lowrank"], models["student_pruned" if "student_pruned" in models else
                                                       (selection or {}).get("chosen", "student_kd")]
        gains.update({"lowrank_params_vs_its_input": lr["params"] / before["params"],
                      "lowrank_macs_vs_its_input": lr["macs"] / before["macs"],
                      "lowrank_accuracy_change_vs_its_input": lr["accuracy"] - before["accuracy"]})
    s = ctx.splits
    from raydistill.evaluate import LATENCY_THREADS

    return {"models": models, "timings": ctx.timings, "gains": gains,
            "data": {"name": s.name, "fingerprint": ctx.data_fp, "train": s.rows("train"), "val": s.rows("val"),
                     "test": s.rows("test"), "sample_shape": list(s.shape), "splits": s.describe(),
                     "streamed": isinstance(s, StreamData), "epochs_read_from": epochs_read_from(ctx.stages.records),
                     "normalization": input_normalization(s.name, s.channel_stats)},
            "throughput": {k: v.get("samples_per_s_median") for k, v in ctx.stages.records.items()},
            "teacher_server": server_stats, "latency_threads": LATENCY_THREADS,
            "latency_budget_s": ctx.cfg.report.latency_budget_s,
            **({"logit_cache": teacher.cache} if teacher.cache else {}), "deploy": deploy,
            **({"selection": selection} if selection else {}), "config": ctx.cfg.to_dict()}


def epochs_read_from(records: dict) -> dict[str, int]:
    """How many of the trained stages' epochs rank 0 read from each source ("memory", "stream", "local copy": a
    streamed worker's copy of its first epoch's rows, ``data.local_copy_mb``), over every stage's history."""
    from collections import Counter

    return dict(Counter(h["read_from"] for record in records.values() for h in record.get("history") or []
                        if "read_from" in h))


# ---- checks at the edge ---------------------------------------------------------------------------------------
def load_data(cfg: Config) -> Splits:
    d = cfg.data
    splits = load_splits(d.source, root=d.root, path=d.path, train=d.train, val=d.val, test=d.test,
                         split_column=d.split_column, label_column=d.label_column,
                       feature_column=d.feature_column, image_column=d.image_column, id_column=d.id_column,
                       shape=d.shape, image_size=d.image_size, val_fraction=d.val_fraction,
                       test_fraction=d.test_fraction, seed=d.seed, limit=d.limit)
    for name in ("train", "val", "test"):
        part = getattr(splits, name)
        bad = ~np.isfinite(part.x.reshape(len(part.x), -1)).all(axis=1)
        if bad.any():
            raise DataError(f"{int(bad.sum())} {name} samples contain NaN or inf "
                            f"(ids {part.ids[bad][:3].tolist()}...); "
                            "clean or drop them in the source data")
    return splits


def check_augment(cfg: Config, shape: tuple[int, ...]) -> None:
    """Crop and flip move pixels: they apply to images (C, H, W) only."""
    if cfg.data.augment != "none" and not is_image(shape):
        raise ConfigError(f"data.augment={cfg.data.augment} crops and flips images (C, H, W), but the samples have "
                          f"shape {tuple(shape)}; set data.augment: none")


def validate_models(cfg: Config, num_classes: int, shape: tuple[int, ...]) -> None:
    """Build the student (and teacher, or load its checkpoint) once on the driver, on the data's true sample
    ``shape``: bad factories, kwargs or checkpoints fail here with one line, before any Ray worker starts."""
    x = torch.zeros(2, *shape)
    roles = [("student", cfg.student.model, cfg.student.kwargs)]
    given = {path: load_model(path)[:2] for path in [cfg.teacher.checkpoint or "", *cfg.teacher.ensemble] if path}
    if cfg.teacher.ensemble:
        from raydistill.ensemble import check_member_classes

        main = given[cfg.teacher.checkpoint][1]["num_classes"] if cfg.teacher.checkpoint else num_classes
        check_member_classes(("teacher", {"num_classes": main}),
                             [(f"teacher.ensemble[{i}] ({p})", given[p][1]) for i, p in
                              enumerate(cfg.teacher.ensemble)], num_classes)
    if cfg.teacher.checkpoint:
        check_teacher_classes(cfg, given[cfg.teacher.checkpoint][1], num_classes)
    else:
        roles.append(("teacher", cfg.teacher.model, cfg.teacher.kwargs))
    for path, (model, spec) in given.items():  # a given teacher must run on this data's samples
        try:
            with torch.no_grad():
                model.eval()(x)
        except Exception as e:
            raise CheckpointError(f"teacher checkpoint {path} was trained on samples of shape "
                                  f"{spec_input_shape(spec)} and fails on this data's {tuple(shape)} "
                                  f"({str(e).splitlines()[0][:120]}); use a teacher trained on this data") from None
    if cfg.lowrank.rank is not None:  # a rank larger than a layer fails here; an energy needs trained weights
        lowrank_ranks(cfg, build_from_spec(model_spec(cfg.student.model, cfg.student.kwargs, num_classes, shape)))
    for role, name, kwargs in roles:
        model = build_from_spec(model_spec(name, kwargs, num_classes, shape)).eval()
        try:
            with torch.no_grad():
                out = model(x)
        except Exception as e:
            raise ModelError(f"{role} model '{name}' fails on input {tuple(x.shape[1:])}: "
                             f"{str(e).splitlines()[0][:120]}; check {role}.kwargs, data.shape or data.image_size"
                             ) from None
        if not (isinstance(out, torch.Tensor) and out.shape == (2, num_classes)):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelError(f"{role} model '{name}' returns {shape} for a batch of 2, expected (2, {num_classes}) "
                             f"logits; make it output one logit per class")


def check_deploy_formats(cfg: Config, student_spec: dict, sample_shape: tuple[int, ...]) -> None:
    """``deploy.formats`` with onnx or onnx_int8: the student must convert to ONNX, checked on the untrained
    student before any training (an op without an ONNX translation fails here, named, not after the run)."""
    if not {"onnx", "onnx_int8"} & set(cfg.deploy.formats):
        return
    from raydistill.onnx_export import check_onnx_exportable

    with torch.random.fork_rng():  # the driver's RNG stream stays as it was (local-mode stages run here)
        check_onnx_exportable(build_from_spec(student_spec), torch.randn(2, *sample_shape))


def check_teacher_classes(cfg: Config, spec: dict, num_classes: int) -> None:
    if spec["num_classes"] != num_classes:
        raise CheckpointError(f"teacher checkpoint {cfg.teacher.checkpoint} predicts {spec['num_classes']} "
                              f"classes but the data has {num_classes}; use a teacher trained on this data")


def take_run_folder(out: Path, quiet: bool) -> None:
    """One live command per run folder (``locks.lock_run_folder``: held until this process exits); another
    one's live lock refuses this command, a stale one (its process is gone) is taken over, and said so."""
    from raydistill.locks import describe, lock_run_folder

    stale = lock_run_folder(out)
    if stale:
        log(f"run folder {out}: took over the lock of a command that is no longer running ({describe(stale)})", quiet)


OUT_FIX = "pass an --out folder this user can create and write"


def check_run_folder(out: Path, cfg: Config) -> None:
    """Refuse a run folder that cannot be made or written (``locks.folder_problem``), and mixed results: an
    existing run folder must hold the same resolved config."""
    problem = folder_problem(out)
    if problem:
        raise RunFolderError(f"run folder {out}: {problem}; {OUT_FIX}")
    existing = out / "config.yaml"
    if existing.exists():
        old = config_mod.from_dict(__import__("yaml").safe_load(existing.read_text()))
        # the tune section only steers sweeps; it does not change any result of the pipeline
        keys = [k for k in config_mod.all_keys() if not k.startswith(("tune.", "track."))]  # nor does track
        diff = [k for k in keys if config_mod.get(old, k) != config_mod.get(cfg, k)]
        if diff:
            raise RunFolderError(f"run folder {out} holds results of another config "
                                 f"(differs in {', '.join(diff[:4])}); "
                                 "pass a new --out folder or delete the old one")


def check_cache_location(path: str | None) -> None:
    """A local ``cache.path`` must be a folder or one that can be made (``locks.folder_problem``), checked before
    anything is loaded. An existing folder is not required to be writable: a finished cache may be shared
    read-only (a URI is checked when it is opened)."""
    if not path or "://" in path or Path(path).is_dir():
        return
    problem = folder_problem(Path(path))
    if problem:
        raise CacheError(f"cache.path {path}: {problem}; set it to a folder this user can create and write "
                         "(or null: RUN/logit_cache)")


def check_given_cache(cfg: Config, out: Path, data_fp: str, image_size: int) -> bool:
    """Refuse a user-given cache that does not match before any training: with a teacher checkpoint the
    teacher's hash is known up front (a teacher trained in this run is checked once it exists). Returns whether
    the cache this run will use (``cache.path``, else ``RUN/logit_cache`` of an earlier try) is already built for
    this teacher and data: then no actor pool will build it, and its CPUs are not asked of the cluster."""
    if not (cfg.teacher.checkpoint and not cfg.teacher.ensemble):
        return False  # (an ensemble's cache is checked once the ensemble is built, in with_logit_cache)
    uri = cfg.cache.path or str(out / "logit_cache")
    if not cache_exists(uri):
        return False
    try:
        check_cache_for_run(cfg, uri, sha256_file(Path(cfg.teacher.checkpoint)), data_fp, image_size)
    except CacheError:
        if cfg.cache.path:
            raise
        return False  # the run's own cache of another teacher or data: rebuilt (with_logit_cache)
    return True


def cache_exists(uri: str) -> bool:
    from raydistill.cache import read_info

    try:
        read_info(uri)
        return True
    except CacheError:
        return False


# ---- stage records --------------------------------------------------------------------------------------------
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
