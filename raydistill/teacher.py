"""The shared teacher: one named Ray actor that serves teacher logits to every worker.

Why an actor: a teacher copy in every Ray Train worker (``teacher_mode: inprocess``) pays the
teacher's memory and forward pass once per worker; the actor loads it once, can sit on its own
GPU (or a fraction of one), and merges concurrent requests from all workers into one forward
pass. Paddle EDL's "teacher as a service" is the same idea.

Why a hand-written micro-batcher: ``@serve.batch`` does not work inside a plain actor (measured
with Ray 2.60), and Ray Serve would add an HTTP/proxy layer we do not need between workers and
the teacher. The batcher is ~30 lines of asyncio: requests that arrive within
``batch_window_ms`` of each other are concatenated, run in one forward pass on a single
executor thread (so the event loop keeps accepting requests meanwhile), and split back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any

import numpy as np
import ray
import torch

from raydistill.checkpoints import build_from_spec

NAMESPACE = "raydistill"


@ray.remote(max_restarts=3, max_task_retries=3)
class TeacherServer:
    """Async actor: ``await logits(x)`` with x (B, C, H, W) float32 numpy → (B, K) float32 numpy."""

    def __init__(self, spec: dict[str, Any], state: dict[str, torch.Tensor], batch_window_ms: float = 2.0,
                 max_batch: int = 4096, num_threads: int = 1, device: str | None = None):
        if num_threads > 0:
            torch.set_num_threads(num_threads)
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
        import os

        return os.getpid()


def start_teacher_server(name: str, spec: dict[str, Any], state: dict[str, torch.Tensor], *, num_cpus: float,
                         num_gpus: float, batch_window_ms: float, max_batch: int, num_threads: int):
    """Create (or reuse, by name) the run's shared teacher actor and wait until it is ready."""
    actor = TeacherServer.options(
        name=name, namespace=NAMESPACE, get_if_exists=True, num_cpus=num_cpus, num_gpus=num_gpus,
        max_concurrency=1000,
    ).remote(spec, state, batch_window_ms, max_batch, num_threads)
    ray.get(actor.get_stats.remote())  # surfaces construction errors here, not in a worker
    return actor


def get_teacher_server(name: str):
    """Look up a running teacher actor by name (Tune trials share it this way)."""
    return ray.get_actor(name, namespace=NAMESPACE)
