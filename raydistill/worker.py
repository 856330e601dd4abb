"""The loop every Ray Train worker runs: one straight function, ``train_fn_per_worker(job)``.

The driver describes a stage as a ``job.StageJob`` (config, model spec, data, phases, teacher
source), which arrives here as plain data and is rebuilt typed with ``StageJob.from_plain``.
Teacher source (raydistill/teacher.py), pruning schedule and loss weights are picked by small
functions; the mixing of the losses is written out in ``train_step`` where it happens.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import itertools
import json
import math
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
from collections import deque

import ray
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F

from raydistill.augment import epoch_views, make_augment
from raydistill.checkpoints import build_from_spec
from raydistill.config import Config, DistillConfig
from raydistill.console import line
from raydistill.core.losses import (
    FeatureHooks,
    HintAdapter,
    dist_loss,
    dkd_loss,
    hard_kd_loss,
    hint_loss,
    soft_kd_loss,
    standardize_logits,
)
from raydistill.core.metrics import accuracy_over
from raydistill.core.pruning import ChannelPruner, MagnitudePruner, sparsity_schedule
from raydistill.data import image_side, shard_indices
from raydistill.errors import NonFiniteLossError
from raydistill.job import PRECISIONS, Phase, StageJob, resolve
from raydistill.teacher import InprocessTeacher, TeacherOut, make_teacher


class HintStudent(torch.nn.Module):
    """Student plus its FitNets adapter in one module, so DDP also averages the adapter's grads."""

    def __init__(self, student: torch.nn.Module, layer: str, adapter: HintAdapter):
        super().__init__()
        self.student, self.adapter = student, adapter
        self.hooks = FeatureHooks(student, [layer])
        self.layer = layer

    def forward(self, x):
        logits = self.student(x)
        return logits, self.adapter(self.hooks.features[self.layer])


# ---- the step and the epoch ---------------------------------------------------------------------------
def soft_term(s_logits: torch.Tensor, t_logits: torch.Tensor, yb: torch.Tensor, d: DistillConfig) -> torch.Tensor:
    """The soft loss ``distill.alpha`` weighs, picked by ``distill.loss`` (core.losses.LOGIT_LOSSES), on the
    student's and teacher's (B, K) logits; yb (B,) are the labels (DKD splits off the target class)."""
    if d.logit_standardize:  # Sun et al. 2024: z-scored logits into the temperature softmax (kd, dkd)
        s_logits, t_logits = standardize_logits(s_logits), standardize_logits(t_logits)
    if d.loss == "kd":
        return soft_kd_loss(s_logits, t_logits, d.temperature)
    if d.loss == "dkd":
        return dkd_loss(s_logits, t_logits, yb, d.temperature, d.dkd_alpha, d.dkd_beta)
    if d.loss == "dist":
        return dist_loss(s_logits, t_logits, d.temperature, d.dist_beta, d.dist_gamma)
    raise AssertionError(f"distill.loss {d.loss!r} passed config.validate but has no branch here")


def train_step(model, opt, xb, yb, teacher_out: TeacherOut | None, phase: Phase, cfg: Config, step: int,
               scaler: torch.amp.GradScaler | None = None) -> tuple[float, int]:
    """One optimizer step on the mixed objective; returns (loss, correct predictions).

    ``distill.precision`` bf16/fp16 runs the forward under autocast (fp16 with a GradScaler,
    which ``scaler`` is); the losses are computed in fp32 from the upcast logits.
    """
    d = cfg.distill
    alpha, beta = phase.alpha, phase.beta
    dtype = PRECISIONS[d.precision]
    with torch.autocast(xb.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(xb)
    s_logits, s_feat = out if isinstance(out, tuple) else (out, None)  # (B, K), adapted student feature
    s_logits = s_logits.float()
    s_feat = s_feat.float() if s_feat is not None else None
    t = teacher_out

    loss = (1 - alpha) * F.cross_entropy(s_logits, yb)
    if alpha > 0:
        loss = loss + alpha * soft_term(s_logits, t.logits, yb, d)  # distill.loss: kd | dkd | dist
    if beta > 0:
        loss = loss + beta * hard_kd_loss(s_logits, t.logits)  # DeiT: the teacher's argmax as the label
    if s_feat is not None and d.hint_weight > 0:
        loss = loss + d.hint_weight * hint_loss(s_feat, t.feature)  # adapter applied in HintStudent.forward

    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"loss became {loss.item()} at step {step} (phase {phase.name}); probable cause: learning rate "
            f"{phase.lr} too high or bad input values; lower the lr or check the data for NaN/inf")
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
    else:
        loss.backward()
    if d.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), d.grad_clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return loss.item(), int((s_logits.argmax(1) == yb).sum())


class InMemoryTrain:
    """This worker's shard of in-memory training data: x (N, *shape), y (N,), ids (N,) tensors; every epoch a
    seeded permutation of the whole shard (a full shuffle)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor):
        self.x, self.y, self.ids = x, y, ids
        self.shape, self.rows = tuple(x.shape[1:]), len(x)

    def batches(self, epoch: int, batch_size: int, seed: int):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(self.rows, generator=g)
        for i in range(0, self.rows, batch_size):  # same count on every rank (equal shards)
            b = perm[i:i + batch_size]
            yield self.x[b], self.y[b], self.ids[b]

    def head(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[:n], self.y[:n]

    def expect(self, epochs: list[tuple[int, int, int]]) -> None:  # nothing to read ahead: it is all in memory
        pass

    def read_from(self, epoch: int) -> str:
        return "memory"

    def close(self) -> None:
        pass


class StreamedTrain:
    """This worker's shard of a streamed training split (``ray.train.get_dataset_shard``, or the whole Ray
    Dataset in a Tune trial): read block by block as Ray Data produces them (``iter_batches(batch_size=None)``),
    shuffled by the file order (reshuffled per epoch by Ray Data) and a local shuffle buffer of
    ``data.shuffle_buffer`` rows seeded by the epoch (``stream.ShuffleBuffer``: numpy rows, not Ray Data's
    buffer of Arrow blocks, which cost more CPU in this process than decoding the rows; see there).

    A reader thread runs ahead of training by at most ``READ_AHEAD_BYTES`` of batches, and goes on into the
    next epoch the loop said it will ask for (``expect``) as soon as it has read this one. Why: every epoch is a
    new Ray Data execution, whose first batch took 0.25-0.8 s on a 2-core machine (start-up, the shuffle buffer
    filling), while the rest of the epoch waited ~0.03 s in all; read ahead, that start-up overlaps the end of
    the previous epoch and its validation instead of stalling the steps (torch's DataLoader with persistent
    workers and prefetching does the same across epochs).

    With ``local_copy_mb`` > 0 and a shard that fits in it and in half the temp folder's free disk, the first epoch
    read also goes to a ``stream.LocalCopy`` (when a later epoch is announced), and every later epoch reads that
    copy (a full seeded permutation of the worker's rows) instead of the stream. The reader thread reads the copy
    ahead too: ``os.preadv`` releases the GIL, so on a GPU the reads overlap the steps as the stream's do."""

    READ_AHEAD_BYTES = 64 * 2**20
    _END = object()

    def __init__(self, shard, data, world: int, shuffle_buffer: int, local_copy_mb: int = 0):
        from raydistill.stream import head

        self.shard, self.data, self.buffer = shard, data, shuffle_buffer
        self.shape, self.rows = tuple(data.shape), data.train.rows // world  # Ray Data splits rows equally
        self._head = head(data, "train", 64)
        self._epochs: list[tuple[int, int, int]] = []  # (epoch, batch size, seed) the loop will ask for, in order
        self._queue = self._thread = self._stop = None
        self.copy = None  # the stream.LocalCopy that later epochs read, once an epoch has filled one
        self._read_from: dict[int, str] = {}  # epoch -> "stream" or "local copy", set as the reader starts it
        self._lock = threading.Lock()
        # float32 rows (8-bit ones take a quarter), ids and labels: what this worker's copy will take at most
        need = self.rows * (4 * math.prod(self.shape) + 16)
        self.will_copy = 0 < need <= local_copy_mb * 2**20 and need <= shutil.disk_usage(tempfile.gettempdir()).free / 2

    def expect(self, epochs: list[tuple[int, int, int]]) -> None:
        """The (epoch, batch size, seed) the loop will ask for, in order: the reader runs ahead through them."""
        self._stop_reader()
        self._epochs, self._stop = list(epochs), threading.Event()  # this list: what ``batches`` is owed next
        item_bytes = 4 * math.prod(self.shape) * max([bs for _, bs, _ in epochs] or [1])
        self._queue = queue.Queue(maxsize=min(32, max(2, self.READ_AHEAD_BYTES // item_bytes)))
        # the reader gets its own queue and stop event: one that close() gave up waiting for must never feed the
        # queue of the reader that replaced it
        self._thread = threading.Thread(target=self._read, args=(tuple(epochs), self._queue, self._stop),
                                        name="raydistill-stream-reader", daemon=True)
        self._thread.start()

    def _read(self, epochs: tuple[tuple[int, int, int], ...], out: queue.Queue, stop: threading.Event) -> None:
        from raydistill.stream import LocalCopy, ShuffleBuffer, standardize, to_arrays

        def put(item) -> bool:  # False once stopped
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        rows = ShuffleBuffer(self.buffer)

        # 8-bit samples go through the buffer (and the local copy) as their uint8 pixels (a quarter of float32's
        # bytes to copy), each batch standardized as it leaves: the same floats, elementwise, as standardizing first
        def leaving(batches):
            for x, y, ids in batches:
                yield (standardize(self.data, x) if x.dtype == "uint8" else x), y, ids

        def shuffled(epoch: int, batch_size: int, seed: int, copy):  # one epoch's batches: fresh arrays, not views
            rows.restart(seed * 100_003 + epoch)
            try:
                # whole blocks (up to stream.STREAM_BLOCK_BYTES): Ray Data's per-batch cost is paid per block
                for block in self.shard.iter_batches(batch_size=None, batch_format="pyarrow"):
                    block_rows = to_arrays(self.data, block, "the streamed training rows", writable=False,
                                           pixels=True)
                    if copy is not None and not copy.add(*block_rows):
                        # dropped (a failed write: disk full, say): this and every later epoch stream, and no later
                        # epoch writes a copy again only to fail the same way
                        copy, self.will_copy = None, False
                    rows.add(*block_rows)
                    yield from leaving(rows.batches(batch_size))
                yield from leaving(rows.drain(batch_size))
                with self._lock:  # close() may be dropping the copy: a reader it stopped publishes nothing
                    if copy is not None and not stop.is_set() and copy.finish():
                        self.copy, copy = copy, None
            finally:  # stopped, failed or dropped mid-epoch: the half-written copy goes
                if copy is not None:
                    copy.close()

        try:
            for i, (epoch, batch_size, seed) in enumerate(epochs):
                self._read_from[epoch] = "stream" if self.copy is None else "local copy"
                if self.copy is not None:
                    batches = leaving(self.copy.batches(batch_size, seed * 100_003 + epoch))
                else:
                    # a copy only for a later epoch to read: the last epoch announced (a one-epoch stage, a stage
                    # resumed at its last epoch) would write the worker's whole share to disk for nothing
                    copy = LocalCopy(self.shape) if self.will_copy and i < len(epochs) - 1 else None
                    batches = shuffled(epoch, batch_size, seed, copy)
                for batch in batches:
                    if not put((epoch, tuple(torch.from_numpy(a) for a in batch))):
                        return
                if not put((epoch, self._END)):
                    return
        except BaseException as error:  # handed to the loop, raised there with its traceback
            put((None, error))

    def read_from(self, epoch: int) -> str:
        """Where ``epoch``'s rows came from (the loop has read it): "stream" or "local copy"."""
        return self._read_from.get(epoch, "stream")

    def close(self) -> None:
        """Stop the reader and drop the local copy (the loop is over)."""
        self._stop_reader()
        with self._lock:
            if self.copy is not None:
                self.copy.close()
                self.copy = None

    def _stop_reader(self) -> None:
        """Stop the reader (the loop ended early or failed): it drops what it read ahead and exits."""
        if self._thread is not None:
            self._stop.set()
            # brief: a reader waiting inside Ray Data for its next block sees the flag at its next put; Ctrl-C
            # must not wait for that (the thread is a daemon)
            self._thread.join(timeout=1)
            self._thread = None

    def batches(self, epoch: int, batch_size: int, seed: int):
        if not self._epochs or self._epochs[0] != (epoch, batch_size, seed):  # not announced: read it alone
            self.expect([(epoch, batch_size, seed)])
        self._epochs.pop(0)
        while True:
            got, item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            assert got == epoch, (got, epoch)  # the reader follows the announced order
            if item is self._END:
                return
            yield item

    def head(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self._head[0][:n]), torch.from_numpy(self._head[1][:n])


def run_epoch(model, opt, sched, teacher, data, phase: Phase, cfg: Config, epoch: int, pruner, device) -> dict:
    """One pass over this worker's training data (``InMemoryTrain`` or ``StreamedTrain``): batches of x
    (B, *shape), y (B,) and the samples' ids (B,), which define their augmented views."""
    bs = phase.batch_size
    scaler = torch.amp.GradScaler(device.type) if cfg.distill.precision == "fp16" else None
    uses_teacher = teacher is not None and (phase.uses_teacher_logits or cfg.distill.hint_weight > 0)
    # Ask the teacher for `teacher_prefetch` batches in one request, and keep the next such group in flight
    # while stepping on this one: with the live actor a round trip (serialization, scheduling, the merged
    # forward) is longer than one small student step, and one call per batch paid that overhead per batch.
    depth = cfg.scale.teacher_prefetch if uses_teacher else 0
    # data.augment: every sample is shown in one view per epoch (a cached one in cache mode, else a fresh
    # one), regenerated from (seed, id, view); the teacher is asked about exactly these pixels.
    augment = make_augment(cfg.data.augment, cfg.data.augment_pad, cfg.seed, image_side(data.shape))
    cached_views = getattr(teacher, "views", None)

    def in_view(batch):  # (x (B, *shape) in this epoch's view, y, ids, views (B,))
        x, y, ids = batch
        views = torch.from_numpy(epoch_views(ids.numpy(), epoch, cfg.seed, cached_views))
        return augment(x, ids, views), y, ids, views

    batches = (in_view(b) for b in data.batches(epoch, bs, cfg.seed))

    def ask(group):  # one teacher request for a group of batches: (group, the request handle)
        return group, teacher.request(torch.cat([g[2] for g in group]), torch.cat([g[0] for g in group]),
                                      torch.cat([g[3] for g in group]))

    def with_teacher():  # (x, y, teacher output) per batch, in order, the next group always requested
        groups = iter(lambda: list(itertools.islice(batches, depth)), [])
        pending = deque(ask(g) for g in itertools.islice(groups, 2))
        while pending:
            group, handle = pending.popleft()
            out, start = teacher.result(handle), 0  # the next group is in flight meanwhile
            pending.extend(ask(g) for g in itertools.islice(groups, 1))  # and the one after goes out now
            for x, y, _, _ in group:
                part = slice(start, start + len(y))
                yield x, y, TeacherOut(out.logits[part], None if out.feature is None else out.feature[part])
                start += len(y)

    steps = with_teacher() if uses_teacher else ((x, y, None) for x, y, _, _ in batches)
    t0, total_loss, correct, seen = time.perf_counter(), 0.0, 0, 0
    for i, (xb, yb, t_out) in enumerate(steps):
        loss, c = train_step(model, opt, xb.to(device), yb.to(device), t_out, phase, cfg, step=i, scaler=scaler)
        sched.step()
        if pruner is not None:
            pruner.reapply_masks_()  # masked channels stay exactly zero through every optimizer step
        total_loss, correct, seen = total_loss + loss * len(yb), correct + c, seen + len(yb)
    seconds = time.perf_counter() - t0
    return {"loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1), "epoch_s": seconds,
            "samples_per_s": seen / seconds, "samples": seen}


# ---- checkpoints ------------------------------------------------------------------------------------------
def write_train_state(state: dict, folder: str) -> str:
    """Write the state into ``folder`` as a checkpoint's contents (``load_train_state`` reads it back)."""
    torch.save(state, os.path.join(folder, "state.pt"))
    return folder


@contextlib.contextmanager
def reported_state(state: dict):
    """The state written to a temporary folder, for a checkpoint to report, removed when the block ends (the
    pattern of Ray's checkpointing guide). ``ray.train.report`` (upload mode SYNC, Ray's default) and
    ``tune.report`` copy the folder into run storage before they return, and neither deletes it (Ray Train does
    only in ASYNC mode). Before, written with ``tempfile.mkdtemp`` and never removed, every epoch of every
    multi-worker stage and Tune trial left a ``raydistill-ckpt-*`` folder in /tmp for good (1,512 on this
    machine after a day of test runs).

    The folder's name carries this process's pid and host: a process killed by SIGKILL while its folder exists (a
    Train worker killed mid-report, an out-of-memory kill) cannot remove it, so the first report of every process
    removes the folders of this host's processes that are gone (``remove_orphaned_checkpoint_folders``)."""
    global _orphans_swept
    if not _orphans_swept:
        _orphans_swept = True
        remove_orphaned_checkpoint_folders(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(prefix=f"{CKPT_PREFIX}{os.getpid()}@{socket.gethostname()}-") as tmp:
        yield write_train_state(state, tmp)


CKPT_PREFIX = "raydistill-ckpt-"
_orphans_swept = False


def remove_orphaned_checkpoint_folders(tmp_dir: str) -> list[str]:
    """Remove ``raydistill-ckpt-<pid>@<host>-*`` folders in ``tmp_dir`` whose process no longer exists; returns
    their paths. Only this host's (a TMPDIR shared between nodes or containers holds pids that mean nothing here);
    a folder of a live process, one whose pid this user may not signal, and one named without pid and host
    (written before names carried them) are left."""
    removed, here = [], socket.gethostname()
    for folder in glob.glob(os.path.join(tmp_dir, f"{CKPT_PREFIX}*@*-*")):
        pid, _, host = os.path.basename(folder)[len(CKPT_PREFIX):].rsplit("-", 1)[0].partition("@")
        if host != here or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or a new process with that pid: its folder, if any, is left alone too)
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def load_train_state(ckpt) -> dict | None:
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)


LOCAL_CHECKPOINTS_KEPT = 2  # as CheckpointConfig(num_to_keep=2) for multi-worker stages


def keep_local_checkpoint(root: str, state: dict, epoch: int) -> str:
    """Local mode: write the epoch's state as ``root/checkpoint_<epoch>`` (complete or absent: written aside,
    then renamed) and drop all but the newest ``LOCAL_CHECKPOINTS_KEPT``."""
    os.makedirs(root, exist_ok=True)
    tmp = write_train_state(state, tempfile.mkdtemp(prefix=".tmp-", dir=root))
    final = os.path.join(root, f"checkpoint_{epoch:06d}")
    if os.path.exists(final):  # an epoch redone after a resume
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in sorted(glob.glob(os.path.join(root, "checkpoint_*")))[:-LOCAL_CHECKPOINTS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def last_local_checkpoint(root: str):
    """The newest complete local-mode checkpoint under ``root`` (a ray.train.Checkpoint), or None."""
    for tmp in glob.glob(os.path.join(root, ".tmp-*")):  # left by a process killed mid-write
        shutil.rmtree(tmp, ignore_errors=True)
    done = sorted(glob.glob(os.path.join(root, "checkpoint_*")))
    return ray.train.Checkpoint.from_directory(done[-1]) if done else None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = model.module if hasattr(model, "module") else model
    return model.student if isinstance(model, HintStudent) else model


def check_same_masks(pruner: ChannelPruner, world: int) -> None:
    """Every rank must pick the same channels (weights are DDP-synchronized); verify it cheaply."""
    if world == 1:
        return
    digest = hashlib.sha256(repr(sorted((k, sorted(v)) for k, v in pruner.masked.items())).encode())
    mine = torch.tensor(list(digest.digest()[:8]), dtype=torch.int64)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    torch.distributed.all_gather(gathered, mine)
    assert all(torch.equal(g, mine) for g in gathered), "ranks chose different channels to prune"


# ---- where the loop runs: a Ray Train worker, or a single-process Ray Tune trial -------------------------
class TrainSession:
    """The loop as one of a TorchTrainer's data-parallel workers, or alone in Ray Train's local mode
    (``job.checkpoint_dir`` set: this process, its own epoch checkpoints)."""

    def __init__(self, job: StageJob):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.local_dir, self.queue = job.checkpoint_dir, job.progress
        if self.local_dir:
            self.device = torch.device("cuda" if job.config.scale.use_gpu and torch.cuda.is_available() else "cpu")
        else:
            self.device = ray.train.torch.get_device()

    @property
    def journal_first(self) -> bool:
        """Local mode: the epoch's journal line before its checkpoint (see ``journal``)."""
        return bool(self.local_dir)

    def get_checkpoint(self):
        return last_local_checkpoint(self.local_dir) if self.local_dir else ray.train.get_checkpoint()

    def dataset_shard(self, data, cfg: Config):
        return ray.train.get_dataset_shard("train")  # TorchTrainer(datasets={"train": ...}), split per worker

    def report(self, metrics: dict, state: dict | None) -> None:
        if state is None:
            ray.train.report(metrics, checkpoint=None)
        elif self.local_dir:  # local mode: the checkpoint stays where the run resumes from
            path = keep_local_checkpoint(self.local_dir, state, metrics["epoch"])
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(path))
        else:
            with reported_state(state) as folder:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def progress(self, text: str) -> None:
        if self.queue is not None:
            self.queue.put(text)  # the driver prints it (workers' own output reaches the console only with --verbose)
        else:
            line(text)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.local_dir:
            return model.to(self.device)
        return ray.train.torch.prepare_model(model)  # DDP when world > 1


class TuneSession:
    """The loop inside a Ray Tune function trial: one process, reports feed the scheduler (ASHA)."""

    rank, world = 0, 1
    journal_first = False  # a trial's job has no journal (only ``raydistill run`` keeps one)

    def __init__(self):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def get_checkpoint(self):
        from ray import tune

        return tune.get_checkpoint()

    def dataset_shard(self, data, cfg: Config):
        from raydistill.stream import train_dataset

        # a trial is one process: the whole stream is its shard
        return train_dataset(data, cfg.seed, buffer_mb=cfg.data.stream_buffer_mb)

    def report(self, metrics: dict, state: dict | None) -> None:
        from ray import tune

        if state is None:
            tune.report(metrics)
        else:
            with reported_state(state) as folder:
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    def progress(self, text: str) -> None:
        pass  # a sweep's console shows trials, not epochs

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)


def journal(path: str | None, entry: dict) -> None:
    """Append one line per finished epoch to the run's journal (what ran, where, in which process).

    Before or after the epoch's checkpoint: the session's ``journal_first``. In local mode the line comes first:
    the checkpoint is on disk once the loop has written it, so a run killed between the two redoes that one epoch
    and journals it twice, and no epoch a resumed run skips is missing here (with the line after the report, a
    kill in between left a checkpointed epoch unjournaled). With Train workers the line comes after the report:
    Train takes a reported checkpoint asynchronously and its result queue holds one, so a returned report means the
    previous epoch's checkpoint is Train's, and a worker killed right after the line redoes at most that epoch (with
    the line first, up to two). Best effort: on a multi-node cluster the run folder may not be mounted where rank 0
    runs."""
    if not path:
        return
    try:
        with open(path, "a") as f:
            f.write(json.dumps({**entry, "time": time.time()}) + "\n")
    except OSError:
        pass


def with_hint_adapter(model, teacher, cfg: Config, example, device):
    """The student wrapped with its FitNets adapter when the hint loss is on (its teacher is in-process)."""
    d = cfg.distill
    if not (d.hint_student_layer and isinstance(teacher, InprocessTeacher)):
        return model
    adapter = HintAdapter.for_models(model, teacher.model, d.hint_student_layer, d.hint_teacher_layer, example)
    return HintStudent(model, d.hint_student_layer, adapter.to(device))


def make_pruner(model, example, phase: Phase) -> ChannelPruner | MagnitudePruner | None:
    """The pruner of a phase with a pruning schedule (``prune.kind``): channels or single weights."""
    if phase.prune is None:
        return None
    if phase.prune.kind == "unstructured":
        return MagnitudePruner(model)
    return ChannelPruner(model, example, importance=phase.prune.importance)


def prune_step_(pruner: ChannelPruner | MagnitudePruner | None, phase: Phase, epoch_in_phase: int, ddp, x, y, device,
                world: int) -> float:
    """Raise the sparsity to this epoch's point of the schedule (masks); returns the ratio (0 without pruning).
    x (B, *shape), y (B,): a batch of training samples for Taylor importance's gradients."""
    if pruner is None:
        return 0.0
    p = phase.prune
    ratio = sparsity_schedule(epoch_in_phase + 1, phase.epochs, p.ratio, p.schedule)
    if p.importance == "taylor":  # Taylor needs fresh gradients |w * dL/dw|
        ddp.zero_grad()
        out = ddp(x[: phase.batch_size].to(device))
        F.cross_entropy(out[0] if isinstance(out, tuple) else out, y[: phase.batch_size].to(device)).backward()
    pruner.mask_(ratio)
    check_same_masks(pruner, world)
    return ratio


def open_train_data(job: StageJob, session):
    """This worker's training data and the data its validation reads (``.batches("val")``): an in-memory shard
    of the Splits behind ``job.data``, or, for a streamed run (a StreamData), the worker's Ray Data shard."""
    cfg = job.config
    from raydistill.stream import StreamData

    if isinstance(job.data, StreamData):
        shard = session.dataset_shard(job.data, cfg)
        return StreamedTrain(shard, job.data, session.world, cfg.data.shuffle_buffer, cfg.data.local_copy_mb), job.data
    splits = resolve(job.data)
    shard = shard_indices(splits.train.y, session.world, session.rank, cfg.data.shard, cfg.seed)
    x, y = torch.from_numpy(splits.train.x[shard]), torch.from_numpy(splits.train.y[shard])  # (N, *shape), (N,)
    ids = torch.from_numpy(splits.train.ids[shard])  # (N,) sample ids: with the seed they define the augmented views
    return InMemoryTrain(x, y, ids), splits


# ---- the worker loop ----------------------------------------------------------------------------------
def train_fn_per_worker(plain_job: dict) -> dict:
    """Ray Train entry point: returns (on rank 0, to Result.return_value) the epoch history and plan."""
    job = StageJob.from_plain(plain_job)
    summary, _ = run_loop(job, TrainSession(job))
    return summary


def run_loop(job: StageJob, session) -> tuple[dict, torch.nn.Module]:
    """One stage's loop, on ``scale.torch_threads`` intra-op threads. In Ray Train's local mode it runs in the
    caller's own process (the command; a script calling ``raydistill.run``), so the caller's thread count is
    restored when it returns: torch's setting is process-wide, and a script's own torch work after the call, like
    the command's evaluation and export, must not be left on the loop's one thread."""
    threads = torch.get_num_threads()
    try:
        return _run_loop(job, session)
    finally:
        torch.set_num_threads(threads)


def _run_loop(job: StageJob, session) -> tuple[dict, torch.nn.Module]:
    cfg = job.config
    if cfg.scale.torch_threads > 0:
        torch.set_num_threads(cfg.scale.torch_threads)
    torch.manual_seed(cfg.seed)
    rank, device = session.rank, session.device

    data, val = open_train_data(job, session)
    shard_ids = data.ids.numpy() if isinstance(data, InMemoryTrain) else None  # None: a stream, any id may come
    teacher = make_teacher(job.teacher, cfg, device, rank, shard_ids, image_side(data.shape))

    spec = dict(job.spec)
    resumed = load_train_state(session.get_checkpoint())
    if resumed is not None:
        spec["plan"] = resumed["plan"]
        model = build_from_spec(spec, resumed["model"])
    else:
        model = build_from_spec(spec, resolve(job.init_state) if job.init_state is not None else None)
    model.to(device)
    start_epoch = resumed["epoch"] + 1 if resumed else job.first_epoch
    example = data.head(2)[0].to(device)

    # the (epoch, batch size, seed) still to run: a stream reads ahead through them
    data.expect([(e, phase.batch_size, cfg.seed) for phase, e0, e1 in phase_spans(job)
                 for e in range(max(start_epoch, e0), e1)])
    try:
        return train_phases(job, session, model, spec, data, val, teacher, resumed, start_epoch, example)
    finally:
        data.close()


def phase_spans(job: StageJob) -> list[tuple[Phase, int, int]]:
    """(phase, first epoch, end epoch) of every phase: epochs are numbered globally from ``job.first_epoch``, and
    they seed the data order and the views."""
    spans, e0 = [], job.first_epoch
    for phase in job.phases:
        spans.append((phase, e0, e0 + phase.epochs))
        e0 += phase.epochs
    return spans


def train_phases(job: StageJob, session, model, spec: dict, data, val, teacher, resumed: dict | None,
                 start_epoch: int, example: torch.Tensor) -> tuple[dict, torch.nn.Module]:
    """The epochs of every phase from ``start_epoch`` on: train, prune, validate, report a checkpoint."""
    cfg, rank, world, device = job.config, session.rank, session.world, session.device
    history = []
    for phase_idx, (phase, e0, e1) in enumerate(phase_spans(job)):
        if start_epoch >= e1:  # finished before a restart
            continue
        # each phase starts from a seed of its own: a stage that continues another (the pipeline's prune stage
        # after KD) runs exactly as the same phase inside one loop (a sweep trial)
        torch.manual_seed(cfg.seed * 1_000_003 + e0)
        pruner = make_pruner(model, example, phase)
        ddp = session.prepare_model(with_hint_adapter(model, teacher, cfg, example, device))
        opt = torch.optim.AdamW(ddp.parameters(), lr=phase.lr, weight_decay=phase.weight_decay)
        steps = phase.epochs * math.ceil(data.rows / phase.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
        if resumed is not None and resumed["phase"] == phase_idx and resumed["opt"] is not None:
            opt.load_state_dict(resumed["opt"])
            sched.load_state_dict(resumed["sched"])

        for epoch in range(max(start_epoch, e0), e1):
            ratio = prune_step_(pruner, phase, epoch - e0, ddp, *data.head(phase.batch_size), device, world)
            stats = run_epoch(ddp, opt, sched, teacher, data, phase, cfg, epoch, pruner, device)
            plan = spec.get("plan") or []
            removed = False
            if pruner is not None and phase.remove_after and epoch == e1 - 1:
                plan = plan + pruner.remove_()  # physically smaller model from here on
                spec["plan"], removed = plan, True
            metrics = {"stage": job.stage, "phase": phase.name, "epoch": epoch, "ratio": ratio,
                       "samples_per_s_global": stats["samples_per_s"] * world, "read_from": data.read_from(epoch),
                       **stats}
            if isinstance(teacher, InprocessTeacher):
                metrics["teacher_forward_samples"] = teacher.samples
            if rank == 0:
                metrics["val_acc"] = accuracy_over(unwrap(ddp), ((x, y) for x, y, _ in val.batches("val")))  # as is
                if job.verbose:
                    session.progress(
                        f"[{job.stage}] epoch {epoch - job.first_epoch + 1}/{job.total_epochs} "
                        f"{phase.name}: loss {stats['loss']:.4f} train_acc {stats['train_acc']:.3f} "
                        f"val_acc {metrics['val_acc']:.3f} {metrics['samples_per_s_global']:.0f} samples/s"
                        + (f" sparsity {ratio:.2f}" if pruner is not None else ""))
                state = {"model": {k: v.detach().cpu() for k, v in unwrap(ddp).state_dict().items()},
                         "plan": plan, "epoch": epoch, "phase": phase_idx if not removed else phase_idx + 1,
                         "opt": None if removed else opt.state_dict(),
                         "sched": None if removed else sched.state_dict()}
                line = {"stage": job.stage, "epoch": epoch, "pid": os.getpid(), "rank": rank}
                if session.journal_first:  # the order that keeps the journal whole (see ``journal``)
                    journal(job.journal, line)
                session.report(metrics, state)
                if not session.journal_first:
                    journal(job.journal, line)
            else:
                session.report(metrics, None)
            history.append(metrics)
        model = unwrap(ddp)  # Torch-Pruning removes channels in place: same object, fewer channels

    return {"history": history, "plan": spec.get("plan") or []}, model
