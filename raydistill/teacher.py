"""Teacher outputs for the training loop: the shared ``TeacherServer`` actor and the three sources a
worker reads them from (``live`` actor, ``inprocess`` copy, ``cache`` of Parquet logits).

Why an actor: a teacher copy in every Ray Train worker (``teacher_mode: inprocess``) pays the
teacher's memory and forward pass once per worker; the actor loads it once, can sit on its own
GPU (or a fraction of one), and merges concurrent requests from all workers into one forward
pass. Paddle EDL's "teacher as a service" is the same idea.

Why a hand-written micro-batcher: ``@serve.batch`` does not work inside a plain actor (measured
with Ray 2.60), and Ray Serve would add an HTTP/proxy layer we do not need between workers and
the teacher. The batcher is ~30 lines of asyncio: requests that arrive within
``batch_window_ms`` of each other are concatenated, run in one forward pass on a single
executor thread (so the event loop keeps accepting requests meanwhile), and split back.

Lifetime: one actor per run, not per teacher (``teacher_actor_name``: the teacher's hash and the Ray job
id of the command that starts it). Runs, sweeps and benchmarks that use the same teacher on one cluster
each get their own actor, so one of them ending (``stop_teacher_server``), being stopped (`ray job stop`)
or crashing never takes the teacher away from another. The actor is owned by its command's driver, so Ray
ends it with that driver: nothing outlives a crashed run, and no lease is needed. (A shared actor would
have to be detached, hold leases that its users renew, and keep its weights alive past the driver that
put them in the object store; the cost it would save, a teacher copy per concurrent run, is what
``distill.teacher_mode: cache`` saves for any number of runs: one cache file, see raydistill/cache.py.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from typing import Any, NamedTuple

import numpy as np
import ray
import torch

from raydistill.augment import make_augment
from raydistill.checkpoints import build_from_spec
from raydistill.config import Config, ScaleConfig
from raydistill.core.losses import TOPK_LOSSES, FeatureHooks
from raydistill.errors import CacheError, TeacherUnavailableError
from raydistill.job import TeacherSource, resolve

NAMESPACE = "raydistill"


@ray.remote(max_restarts=3, max_task_retries=3)
class TeacherServer:
    """Async actor: ``await logits(x)`` with x (B, C, H, W) float32 numpy → (B, K) float32 numpy."""

    def __init__(self, spec: dict[str, Any], state: dict[str, torch.Tensor] | list, batch_window_ms: float = 2.0,
                 max_batch: int = 4096, num_threads: int = 1, device: str | None = None):
        if num_threads > 0:
            torch.set_num_threads(num_threads)
        if isinstance(state, list):  # [ObjectRef]: the weights stay in the object store while the actor may restart
            # This get blocks no caller: the actor's event loop serves nothing before __init__ returns. Ray's
            # "Using blocking ray.get inside async actor" warning (meant for gets inside coroutines) is switched off
            # for it with Ray's own switch; a script's own ray.init() forwards actors' output, so it was printed.
            saved = os.environ.get("RAY_WARN_BLOCKING_GET_INSIDE_ASYNC")
            os.environ["RAY_WARN_BLOCKING_GET_INSIDE_ASYNC"] = "0"
            try:
                state = ray.get(state[0])
            finally:  # as it was: a get inside a coroutine would still warn
                if saved is None:
                    del os.environ["RAY_WARN_BLOCKING_GET_INSIDE_ASYNC"]
                else:
                    os.environ["RAY_WARN_BLOCKING_GET_INSIDE_ASYNC"] = saved
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = build_from_spec(spec, state).to(self.device).eval()
        self.window_s = batch_window_ms / 1000.0
        self.max_batch = max_batch
        self._pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task] = set()
        # One thread runs forwards so that torch never races itself and the loop stays free.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.stats = {"requests": 0, "samples": 0, "forward_passes": 0, "forward_s": 0.0,
                      "requests_by_rank": {}, "started": time.time()}

    async def logits(self, x: np.ndarray, rank: int = -1) -> np.ndarray:
        """Teacher logits for ``x`` (B, C, H, W) → (B, K); ``rank`` only feeds the statistics."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((x, fut))
        self.stats["requests"] += 1
        by_rank = self.stats["requests_by_rank"]
        by_rank[rank] = by_rank.get(rank, 0) + 1
        pending_samples = sum(len(a) for a, _ in self._pending)
        if pending_samples >= self.max_batch:
            self._start_flush(delay=0.0)
        elif not self._flush_scheduled:
            self._start_flush(delay=self.window_s)
        return await fut

    def _start_flush(self, delay: float) -> None:
        # "scheduled" means: a flush will still pick up what is pending now. It is cleared the
        # moment a flush takes the batch, so requests arriving during a forward pass schedule the
        # next flush instead of waiting on one that has already taken its batch.
        self._flush_scheduled = True
        task = asyncio.get_running_loop().create_task(self._flush(delay))
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _flush(self, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        batch, self._pending = self._pending, []
        self._flush_scheduled = False
        if not batch:
            return
        arrays = [a for a, _ in batch]
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._executor, self._forward, arrays)
        except Exception as e:  # hand the error to every waiting caller instead of hanging them
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        start = 0
        for a, fut in batch:
            if not fut.done():
                fut.set_result(out[start:start + len(a)])
            start += len(a)

    def _forward(self, arrays: list[np.ndarray]) -> np.ndarray:
        t0 = time.perf_counter()
        x = torch.from_numpy(np.concatenate(arrays)).to(self.device)  # (sum B, C, H, W)
        with torch.inference_mode():
            out = self.model(x).float().cpu().numpy()  # (sum B, K)
        self.stats["forward_passes"] += 1
        self.stats["samples"] += len(x)
        self.stats["forward_s"] += time.perf_counter() - t0
        return out

    def get_stats(self) -> dict[str, Any]:
        return dict(self.stats)

    def reset_stats(self) -> None:
        self.stats.update(requests=0, samples=0, forward_passes=0, forward_s=0.0, requests_by_rank={})

    def pid(self) -> int:
        return os.getpid()


_WEIGHTS: dict[str, Any] = {}  # actor name -> ObjectRef of its weights, kept alive for the actor's restarts


def teacher_actor_name(teacher_sha256: str) -> str:
    """The TeacherServer name for this command's teacher: per run, not per teacher (the module doc says why).
    The Ray job id is unique on a cluster for as long as it runs, and every command is one Ray job."""
    import ray

    return f"teacher-{teacher_sha256[:12]}-{ray.get_runtime_context().get_job_id()}"


def start_teacher_server(name: str, spec: dict[str, Any], state: dict[str, torch.Tensor], scale: ScaleConfig,
                         wait: bool = True):
    """Create (or reuse, by name) a shared teacher actor sized by ``scale``; with ``wait``, wait until it is
    ready (else call ``wait_ready`` before using it: its process starts meanwhile). Every caller (the
    pipeline, the sweep, the benchmarks) starts it here.

    The weights go to the actor as an object ref inside a list; this process keeps the ref (``_WEIGHTS``) so
    that a restarted actor (``max_restarts``) finds them again."""
    from raydistill.console import native_stderr_muted

    _WEIGHTS[name] = ray.put(state)
    # Ray's core worker logs at every creation of a restartable actor with object-store arguments that they may
    # be lost on a restart; ours cannot be (this process holds them), so the line is muted unless --verbose.
    with native_stderr_muted():
        actor = TeacherServer.options(
            name=name, namespace=NAMESPACE, get_if_exists=True, num_cpus=scale.teacher_cpus,
            num_gpus=scale.teacher_gpus, max_concurrency=1000,
        ).remote(spec, [_WEIGHTS[name]], scale.teacher_batch_window_ms, scale.teacher_max_batch, scale.torch_threads)
    if wait:
        wait_ready(actor)
    return actor


def wait_ready(actor) -> None:
    """Block until the actor is constructed; its construction errors surface here, not in a worker."""
    ray.get(actor.get_stats.remote())


def stop_teacher_server(name: str, actor) -> dict[str, Any]:
    """The actor's statistics (requests, merged forward passes), then stop it and drop its weights (it is this
    run's own actor: ``teacher_actor_name``)."""
    stats = ray.get(actor.get_stats.remote())
    ray.kill(actor)
    _WEIGHTS.pop(name, None)
    return stats


def get_teacher_server(name: str):
    """Look up a running teacher actor by name (Tune trials share it this way)."""
    return ray.get_actor(name, namespace=NAMESPACE)


# ---- the logit cache a run expects ------------------------------------------------------------------------
def cache_settings(cfg: Config, image_size: int) -> dict[str, Any]:
    """What a run's cache must hold besides the teacher and the data: k, the number of augmented views and
    the transform that defines them. The one rule the driver's and the worker's checks share."""
    transform = make_augment(cfg.data.augment, cfg.data.augment_pad, cfg.seed, image_size).transform
    return {"k": cfg.cache.k, "views": cfg.cache.views, "transform": transform}


def check_cache_for_run(cfg: Config, uri: str, teacher_sha: str, data_fp: str, image_size: int):
    """The cache at ``uri`` (its ``cache.CacheInfo``) if it holds this teacher's outputs for this data, k and
    augmented views; otherwise CacheError naming what differs."""
    from raydistill.cache import cache_fingerprint, check_cache

    want = cache_settings(cfg, image_size)
    return check_cache(uri, cache_fingerprint(teacher_sha, data_fp, **want), teacher_sha256=teacher_sha,
                       data_fingerprint=data_fp, **want)


# ---- teacher sources: same interface, request(idx, x, views) now → result(handle) one step later ----------
# ids are the samples' ids (the cache looks them up), x the batch (B, *shape) as the
# student sees it (augmented), views (B,) the view id of each sample (the cache's row; live teachers
# label x itself and ignore it). ``views`` on a teacher is how many views it holds per sample (the
# cache) or None (any view: a fresh one every epoch). result() returns a TeacherOut.
class TeacherOut(NamedTuple):
    logits: torch.Tensor  # (B, K); from a top-k cache, the log-distribution rebuilt from it (cache.topk_loss)
    feature: torch.Tensor | None = None  # the teacher's hint feature when the hint loss is on


class LiveTeacher:
    """Logits from the run's shared TeacherServer actor, looked up by name (loaded once there).

    An actor that cannot be found, or that died for good while a request was out, raises
    ``TeacherUnavailableError`` (never Ray's lookup traceback), a transient error: the stage restarts its workers
    from their last checkpoint (``trainer.should_restart``), and if the actor stays gone the driver reports it in
    one line."""

    def __init__(self, actor_name: str, device: torch.device, rank: int):
        try:
            self.actor = get_teacher_server(actor_name)
        except ValueError as e:  # Ray: "Failed to look up actor with name ..." (none, or it died)
            raise self.unavailable(actor_name, str(e)) from None
        self.name, self.device, self.rank = actor_name, device, rank
        self.views = None

    @staticmethod
    def unavailable(name: str, why: str) -> TeacherUnavailableError:
        why = why.strip().splitlines()[0][:160] if why.strip() else "no reason given"
        return TeacherUnavailableError(f"the teacher actor '{name}' of this run is gone ({why}); rerun the same "
                                       "command to resume from the last epoch checkpoint with a new one")

    def request(self, ids: torch.Tensor, xb: torch.Tensor, views: torch.Tensor):
        return self.actor.logits.remote(xb.numpy(), self.rank)  # a future: the student step runs meanwhile

    def result(self, ref) -> TeacherOut:
        # The request went out one step earlier, so this get normally finds the answer waiting.
        try:
            out = ray.get(ref)
        except ray.exceptions.RayActorError as e:  # died for good (restarts spent, or killed without restart)
            raise self.unavailable(self.name, type(e).__name__) from None
        return TeacherOut(torch.tensor(out, device=self.device))  # copy: object-store arrays are read-only


class InprocessTeacher:
    """A teacher copy inside this worker (the baseline the shared actor is measured against)."""

    def __init__(self, spec: dict, state: dict, device: torch.device, hint_layer: str | None = None):
        self.model = build_from_spec(spec, state).to(device).eval()
        self.device = device
        self.hooks = FeatureHooks(self.model, [hint_layer]) if hint_layer else None
        self.hint_layer = hint_layer
        self.samples = 0  # teacher forward samples so far (a per-trial teacher's cost, for the sweep report)
        self.views = None

    def request(self, ids: torch.Tensor, xb: torch.Tensor, views: torch.Tensor) -> TeacherOut:
        self.samples += len(xb)
        with torch.inference_mode():
            logits = self.model(xb.to(self.device))  # (B, K)
        feat = self.hooks.features[self.hint_layer].clone() if self.hooks else None
        return TeacherOut(logits.clone(), feat)

    def result(self, handle: TeacherOut) -> TeacherOut:
        return handle


class CachedTeacher:
    """Teacher outputs read from the Parquet logit cache, joined to the batches by sample id.

    No teacher is in memory at all; a step costs a sorted-id lookup and one gather from a (N, V, K) float32
    array: the row of each sample in the view the student is shown (V cached views, FKD; V = 1 without
    augmentation). With in-memory data N is this worker's shard; with streamed data (any id may come) it is
    every cached sample: N x V x K x 4 bytes per worker (a top-k cache is expanded to K too), so for many
    classes the cache grows with the data where the training data itself does not.
    A top-k cache is expanded here, once, to the full log-distribution its loss targets, by
    ``cache.topk_loss``: ``tail_filled`` (``core.losses.topk_log_probs``: the residual mass spread over
    the other classes) or ``sparse`` (``core.losses.sparse_topk_log_probs``: the top-k renormalised, the
    other classes at -inf, so the soft loss is ``sparse_topk_kd_loss``). Its steps cost the same as a
    full cache's: rebuilding it every step made top-5 KD 0.86x as fast as full-logit KD
    (benchmarks/throughput.py).
    """

    def __init__(self, uri: str, info: dict, ids: np.ndarray | None, device: torch.device,
                 topk_loss: str = "tail_filled"):
        from raydistill.cache import CacheInfo, load_for_ids

        cached = load_for_ids(uri, ids, CacheInfo(**info))  # rows aligned with ``ids`` (None: every cached id)
        self.order = np.argsort(cached["ids"], kind="stable")  # sample id -> row by binary search
        self.sorted_ids = cached["ids"][self.order]
        self.device, self.views = device, info["views"]
        if "logits" in cached:
            self.logits = torch.from_numpy(cached["logits"]).float()  # (N, V, K)
        else:
            probs = torch.from_numpy(cached["topk_probs"])  # (N, V, k)
            classes = torch.from_numpy(cached["topk_idx"].astype(np.int64))
            n, v, k = probs.shape
            self.logits = TOPK_LOSSES[topk_loss](probs.reshape(n * v, k), classes.reshape(n * v, k),
                                              info["num_classes"]).reshape(n, v, -1)

    def request(self, ids: torch.Tensor, xb: torch.Tensor, views: torch.Tensor) -> TeacherOut:
        wanted = ids.numpy()
        pos = np.clip(np.searchsorted(self.sorted_ids, wanted), 0, len(self.sorted_ids) - 1)
        if not np.array_equal(self.sorted_ids[pos], wanted):
            missing = wanted[self.sorted_ids[pos] != wanted][:3].tolist()
            raise CacheError(f"the logit cache has no entry for sample ids {missing}; rebuild it for this data")
        rows = torch.from_numpy(self.order[pos])
        return TeacherOut(self.logits[rows, views].to(self.device))  # (B, K)

    def result(self, handle: TeacherOut) -> TeacherOut:
        return handle


def make_teacher(source: TeacherSource | None, cfg: Config, device: torch.device, rank: int,
                 shard_ids: np.ndarray | None, image_size: int):
    """Open ``source`` inside a worker: a LiveTeacher, InprocessTeacher or CachedTeacher (None: no teacher)."""
    if source is None:
        return None
    if source.mode == "live":
        return LiveTeacher(source.actor_name, device, rank)
    if source.mode == "cache":
        # a sweep trial may change data.augment, seed or cache.views: the cache must still hold its views
        try:
            check_cache_for_run(cfg, source.uri, source.info["teacher_sha256"], source.info["data_fingerprint"],
                                image_size)
        except CacheError as e:
            raise CacheError(f"{e} (this stage trains on {cache_settings(cfg, image_size)})") from None
        return CachedTeacher(source.uri, source.info, shard_ids, device, cfg.cache.topk_loss)
    return InprocessTeacher(source.spec, resolve(source.state), device, cfg.distill.hint_teacher_layer)
