"""The typed contract between a driver and the training loop: what one Train stage (or Tune trial) runs.

    StageJob(stage, config, spec, data, phases=(Phase, ...), teacher=TeacherSource | None, init_state)

The pipeline, the sweep and the benchmarks build jobs only with the builders below (``*_phases``,
``*_teacher``, ``StageJob``), so a phase list or a teacher source is written in one place. A job
crosses the Ray boundary as plain data (``to_plain``: the config as its dict, phases as dicts,
object refs as they are) and the worker rebuilds the typed job with ``StageJob.from_plain`` (the
config through ``config.from_dict``, so its defaults and checks live in config.py alone).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from raydistill.config import Config, from_dict

TEACHER_MODES = ("live", "inprocess", "cache")  # how a student stage gets its teacher's outputs
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # distill.precision → autocast dtype


@dataclass(frozen=True)
class PruneSchedule:
    """Progressive channel pruning within a phase: sparsity rises from 0 to ``ratio`` over its epochs."""

    ratio: float
    importance: str  # core.pruning.IMPORTANCES
    schedule: str  # core.pruning.SCHEDULES
    kind: str = "channel"  # core.pruning.PRUNE_KINDS: channel (ChannelPruner) | unstructured (MagnitudePruner)


@dataclass(frozen=True)
class Phase:
    """Epochs with one optimizer and one mix of losses: (1 - alpha)·CE + alpha·KD + beta·hard-KD (+ hint)."""

    name: str  # train | distill | prune | finetune
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    alpha: float = 0.0
    beta: float = 0.0
    prune: PruneSchedule | None = None
    remove_after: bool = False  # remove the pruned channels physically after the phase's last epoch

    @property
    def uses_teacher_logits(self) -> bool:
        return self.alpha > 0 or self.beta > 0


@dataclass(frozen=True)
class TeacherSource:
    """Where a student stage's teacher outputs come from (``teacher.make_teacher`` opens it in a worker).

    live: the shared TeacherServer actor, by name; inprocess: a teacher copy per worker, from its spec
    and an object ref of its weights; cache: the Parquet logit cache at ``uri`` with its ``info``
    (``cache.CacheInfo`` fields)."""

    mode: str  # TEACHER_MODES
    actor_name: str | None = None
    spec: dict | None = None
    state: Any = None  # ray.ObjectRef of the teacher's state dict, or the dict (``resolve``)
    uri: str | None = None
    info: dict | None = None


@dataclass(frozen=True)
class StageJob:
    """One run of the training loop: a model (``spec``) trained through ``phases`` on ``data``."""

    stage: str  # teacher | student_baseline | student_kd | student_pruned | trial | a benchmark's name
    config: Config
    spec: dict  # checkpoints.model_spec of the model being trained
    data: Any  # ray.ObjectRef of data.Splits, the Splits (``resolve``), or a stream.StreamData
    phases: tuple[Phase, ...]
    teacher: TeacherSource | None = None
    init_state: Any = None  # ray.ObjectRef of a state dict to start from, or the dict (None: fresh init from the seed)
    journal: str | None = None  # JSON-lines file of finished epochs (fault tests read it)
    verbose: bool = True  # rank 0 prints one line per epoch
    first_epoch: int = 0  # global number of its first epoch: a stage that continues another keeps its data order
    checkpoint_dir: str | None = None  # local mode: where the loop keeps its epoch checkpoints (Train keeps none)
    progress: Any = None  # multi-worker: a ray.util.queue.Queue that rank 0's epoch lines go to (the driver prints)

    @property
    def total_epochs(self) -> int:
        return sum(p.epochs for p in self.phases)

    # ---- the Ray boundary ------------------------------------------------------------------------
    def to_plain(self) -> dict[str, Any]:
        """Plain data for Ray to ship (``train_loop_config``, ``tune.with_parameters``)."""
        return {"stage": self.stage, "config": self.config.to_dict(), "spec": self.spec, "data": self.data,
                "phases": [dataclasses.asdict(p) for p in self.phases],
                "teacher": _fields(self.teacher) if self.teacher else None, "init_state": self.init_state,
                "journal": self.journal, "verbose": self.verbose, "first_epoch": self.first_epoch,
                "checkpoint_dir": self.checkpoint_dir, "progress": self.progress}

    @classmethod
    def from_plain(cls, plain: dict[str, Any]) -> StageJob:
        phases = tuple(Phase(**{**p, "prune": PruneSchedule(**p["prune"]) if p["prune"] else None})
                       for p in plain["phases"])
        teacher = TeacherSource(**plain["teacher"]) if plain["teacher"] else None
        return cls(stage=plain["stage"], config=from_dict(plain["config"]), spec=plain["spec"], data=plain["data"],
                   phases=phases, teacher=teacher, init_state=plain["init_state"], journal=plain["journal"],
                   verbose=plain["verbose"], first_epoch=plain["first_epoch"], checkpoint_dir=plain["checkpoint_dir"],
                   progress=plain["progress"])


def resolve(ref: Any) -> Any:
    """What a job's ``data``, ``init_state`` or teacher ``state`` holds: the value behind a Ray object ref, or the
    value itself. A local-mode run trains in the command's own process and hands its values over as they are while
    its Ray is still starting, and always when it starts no Ray (``pipeline.RunContext.share``)."""
    import ray

    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def _fields(obj) -> dict[str, Any]:
    # not dataclasses.asdict: that deep-copies its values, object refs included
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


# ---- phase builders: the one place each stage's epochs, rates and loss weights are chosen ------------------
def teacher_phases(cfg: Config) -> tuple[Phase, ...]:
    t = cfg.teacher
    return (Phase("train", t.epochs, t.lr, t.batch_size, t.weight_decay),)


def baseline_phases(cfg: Config) -> tuple[Phase, ...]:
    """The student on labels only, with the KD student's budget (so the KD gain is measured fairly)."""
    d = cfg.distill
    return (Phase("train", d.epochs, d.lr, d.batch_size, d.weight_decay),)


def kd_phases(cfg: Config) -> tuple[Phase, ...]:
    d = cfg.distill
    return (Phase("distill", d.epochs, d.lr, d.batch_size, d.weight_decay, alpha=d.alpha, beta=d.beta),)


def prune_phases(cfg: Config) -> tuple[Phase, ...]:
    """Prune while distilling (then remove the channels), then fine-tune with KD; () when prune.ratio is 0.

    ``prune.kind: unstructured`` removes nothing: its fine-tune phase holds the mask (a one-shot schedule at
    the final ratio re-picks exactly the weights already at zero)."""
    d, p = cfg.distill, cfg.prune
    if p.ratio <= 0:
        return ()
    weights = dict(alpha=d.alpha, beta=d.beta)
    channels = p.kind == "channel"
    schedule = PruneSchedule(p.ratio, p.importance, p.schedule, p.kind)
    phases = [Phase("prune", p.epochs, p.lr, d.batch_size, d.weight_decay, **weights, prune=schedule,
                    remove_after=channels)]
    if p.finetune_epochs > 0:
        hold = None if channels else PruneSchedule(p.ratio, p.importance, "oneshot", p.kind)
        phases.append(Phase("finetune", p.finetune_epochs, p.lr, d.batch_size, d.weight_decay, **weights,
                            prune=hold))
    return tuple(phases)


def lowrank_phases(cfg: Config) -> tuple[Phase, ...]:
    """KD fine-tuning of the student whose Linear layers were factorized by truncated SVD (``lowrank``)."""
    d, r = cfg.distill, cfg.lowrank
    return (Phase("finetune", r.finetune_epochs, r.lr, d.batch_size, d.weight_decay, alpha=d.alpha, beta=d.beta),)


def trial_phases(cfg: Config) -> tuple[Phase, ...]:
    """A sweep trial runs the pipeline's student stages as one loop: distill, then prune, then fine-tune."""
    return kd_phases(cfg) + prune_phases(cfg)


# ---- teacher source builders ---------------------------------------------------------------------------
def live_teacher(actor_name: str) -> TeacherSource:
    return TeacherSource("live", actor_name=actor_name)


def inprocess_teacher(spec: dict, state_ref: Any) -> TeacherSource:
    return TeacherSource("inprocess", spec=spec, state=state_ref)


def cached_teacher(uri: str, info: dict) -> TeacherSource:
    return TeacherSource("cache", uri=uri, info=dict(info))
