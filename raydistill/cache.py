"""Persistent teacher-logit cache: one teacher pass over the training data, stored as Parquet.

FKD (Shen & Xing 2021) and ReLabel showed that precomputed soft labels make a KD epoch as cheap as
a plain one; torchdistill dropped its cache because reading it was slower than the images. Here
the cache is small (fp16 logits or top-k probabilities) and is joined to the in-memory training
shard once per worker by sample id, so a KD step reads its teacher outputs with one gather.

Views (FKD): with ``data.augment`` none the cache holds one row per sample (view 0, the plain image).
With random augmentation it holds ``cache.views`` = V rows per sample, view 0..V-1, each the teacher's
output on that sample's augmented view. A view is not drawn from an RNG: its crop and flip are a pure
function of (seed, sample id, view id) (raydistill/augment.py), so the worker regenerates exactly the
pixels the teacher labelled and trains the student on them; in epoch e a sample uses view
(e + offset(id)) % V, so every cached view gets used. The augmentation kind, pad and seed (the
``transform`` string) and V are part of the fingerprint.

Layout of a cache folder (local path or any pyarrow filesystem URI such as s3://bucket/cache):

    cache.json           # fingerprint, format, k, views, num_classes, rows, teacher/data hashes, transform
    part-00000.parquet   # rows = samples x views; columns: id int64, view int16, and either
                         #   logits list<float16>            (format "full")
                         #   topk_probs list<float16>, topk_idx list<int16>   (format "topk")

Every file is written under a temporary name of its own and then moved into place, cache.json last, so a
reader sees a whole cache or none. Several commands building one cache at the same moment take turns on a
file lock (``build_lock``): the first runs the teacher pass, the others re-check and reuse its cache.

The fingerprint covers the teacher weights (sha256), the data fingerprint, the transform, the number
of views and k. A cache whose fingerprint does not match what the run expects is refused with a
message saying what differs; it is never used. Computing it runs the teacher in a Ray Data actor pool
(``map_batches`` with a callable class) over range(samples x views), so several teacher replicas (or
GPUs) share the work. In Ray Train's local mode on in-memory data (a laptop run: the student trains in the
command's own process) the command's own process runs the same callable over the same positions instead
(``in_process``): on the digits smoke set the pool took 2.7-5.6 s and 3-9 CPU-s for what the loop does in
0.01 s (an actor process, its imports and Ray Data's executor). The logits were the same bit for bit on digits
(full and top-k); with 3 cropped views one row in 3,774 differed by one fp16 step (other batches, other sums).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydistill.augment import Augment, make_augment
from raydistill.data import image_side
from raydistill.errors import CacheError


@dataclass
class CacheInfo:
    fingerprint: str
    format: str  # "full" | "topk"
    k: int | None
    views: int
    num_classes: int
    rows: int
    teacher_sha256: str
    data_fingerprint: str
    transform: str
    build_seconds: float = 0.0
    teacher_forward_samples: int = 0


def cache_fingerprint(teacher_sha256: str, data_fingerprint: str, k: int | None, views: int = 1,
                      transform: str = "none") -> str:
    """``transform`` is ``augment.Augment.transform`` (what defines the views), ``views`` their count V."""
    blob = json.dumps([teacher_sha256, data_fingerprint, transform, views, k], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):
        import os

        return pafs.LocalFileSystem(), os.path.abspath(uri)


def _write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    import os
    import uuid

    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"  # a name of its own: writers never share a temp file
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


@contextmanager
def build_lock(uri: str, on_wait: Callable[[str], None] = lambda who: None) -> Iterator[None]:
    """Hold ``CACHE/.build.lock`` (``locks.FileLock``, fcntl) while checking and building the cache at ``uri``, so
    that of several commands building one cache at the same moment one runs the teacher pass and the others,
    re-checking under the lock, reuse its result. ``on_wait(owner)`` is called when another command holds it.
    A cache on an object store (s3://, gs://) has no file lock: concurrent builders there each write a whole
    cache (temp object, then move; cache.json last)."""
    from raydistill.locks import FileLock, describe

    fs, root = _fs(uri)
    if not isinstance(fs, pafs.LocalFileSystem):
        yield
        return
    fs.create_dir(root, recursive=True)
    lock = FileLock(f"{root}/.build.lock")
    if not lock.try_acquire():
        on_wait(describe(lock.owner()))
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# ---- building ---------------------------------------------------------------------------------------------
class TeacherLogits:
    """Ray Data callable class: one teacher replica per actor, loaded once in its constructor."""

    def __init__(self, spec: dict, state_ref, data_ref, k: int | None, views: int = 1, augment: Augment = Augment(),
                 num_threads: int = 1, stream=None):
        import torch

        from raydistill.checkpoints import build_from_spec
        from raydistill.job import resolve  # in a Ray Data actor: object refs; in the command's process: the values

        if num_threads > 0:
            torch.set_num_threads(num_threads)

        # refs arrive wrapped in a list so Ray does not resolve them into copies per call
        self.model = build_from_spec(spec, resolve(state_ref[0])).eval()
        # in memory: zero-copy numpy from the object store, rows picked by position; streamed: rows arrive in the batch
        self.train = resolve(data_ref[0]).train if stream is None else None
        self.k, self.views, self.augment, self.stream = k, views, augment, stream

    def __call__(self, batch) -> dict[str, np.ndarray]:
        """``batch``: a pyarrow Table (``batch_format="pyarrow"``: the streamed rows are read by the training
        stream's own reader, ``stream.to_arrays``); returns numpy columns."""
        import torch

        from raydistill.core.losses import teacher_topk

        if self.stream is None:
            i = batch.column("id").to_numpy()  # positions in range(samples x views)
            rows, views = i // self.views, i % self.views  # (B,) position in the training split, (B,) view id
            ids, x = self.train.ids[rows].astype(np.int64), self.train.x[rows]
        else:  # streamed rows, each labelled in every view
            from raydistill.stream import to_arrays

            x, _, ids = to_arrays(self.stream, batch, "the training rows the teacher labels")
            rows, views = np.repeat(np.arange(len(ids)), self.views), np.tile(np.arange(self.views), len(ids))
            ids, x = ids[rows], x[rows]
        x = self.augment(torch.from_numpy(np.ascontiguousarray(x)), ids, views)  # (B, *shape)
        with torch.inference_mode():
            logits = self.model(x)  # (B, K)
        out = {"id": ids, "view": views.astype(np.int16)}
        if self.k is None:
            out["logits"] = logits.numpy().astype(np.float16)
        else:
            probs, idx = teacher_topk(logits, self.k)  # (B, k) float32, (B, k) int64
            out["topk_probs"] = probs.numpy().astype(np.float16)
            out["topk_idx"] = idx.numpy().astype(np.int16)
        return out


def _to_table(parts: list[dict[str, np.ndarray]]) -> pa.Table:
    cols: dict[str, Any] = {}
    for name in parts[0]:
        arr = np.concatenate([p[name] for p in parts])
        if arr.ndim == 2:  # (N, D) -> list<...> column of fixed length D
            flat = pa.array(arr.reshape(-1))
            cols[name] = pa.FixedSizeListArray.from_arrays(flat, arr.shape[1])
        else:
            cols[name] = pa.array(arr)
    return pa.table(cols)


def build_cache(uri: str, *, teacher_spec: dict, teacher_state: dict, teacher_sha256: str, splits,
                data_fingerprint: str, k: int | None = None, views: int = 1, augment: str = "none",
                augment_pad: int = 0, seed: int = 0, num_actors: int = 1, cpus_per_actor: float = 0.5,
                num_gpus_per_actor: float = 0.0, batch_size: int = 512, num_threads: int = 1,
                in_process: bool = False) -> CacheInfo:
    """Compute teacher outputs for every training sample in each of its ``views`` augmented views with a
    Ray Data actor pool; write the cache. ``augment``, ``augment_pad`` and ``seed`` are the config's
    ``data.augment``, ``data.augment_pad`` and ``seed``: they define the views (raydistill/augment.py).
    ``in_process`` (in-memory ``splits`` only): this process runs the teacher pass, with its own torch threads,
    and Ray is not used."""
    import time

    import ray

    num_classes = splits.num_classes
    if k is not None and not 1 <= k <= num_classes:
        raise CacheError(f"cache top-k must be in [1, {num_classes}], got {k}; set k to at most the class count")
    if views < 1 or (views > 1 and augment == "none"):
        raise CacheError(f"a cache of {views} views needs random augmentation; set data.augment=crop or cache.views=1")
    aug = make_augment(augment, augment_pad, seed, image_side(splits.shape))
    t0 = time.perf_counter()
    n = splits.rows("train") * views  # one teacher forward per (sample, view)
    from raydistill.stream import StreamData, train_dataset

    if in_process:
        assert not isinstance(splits, StreamData), "a streamed training set is labelled by the actor pool"
        label = TeacherLogits(teacher_spec, [teacher_state], [splits], k, views, aug, num_threads=0)
        parts = [label(pa.table({"id": np.arange(i, min(i + batch_size, n), dtype=np.int64)}))
                 for i in range(0, n, batch_size)]
        return _write_cache(uri, parts, n, t0, teacher_sha256=teacher_sha256, data_fingerprint=data_fingerprint,
                            k=k, views=views, num_classes=num_classes, transform=aug.transform)
    state_ref = ray.put(teacher_state)
    kwargs = {"spec": teacher_spec, "state_ref": [state_ref], "k": k, "views": views, "augment": aug,
              "num_threads": num_threads}
    if isinstance(splits, StreamData):  # the training rows stream through the actors, each labelled in every view
        ds, kwargs = train_dataset(splits, seed, shuffle_files=False), {**kwargs, "data_ref": None, "stream": splits}
        batch_size = max(1, batch_size // views)
    else:
        ds = ray.data.range(n, override_num_blocks=max(1, min(n // batch_size + 1, 4 * num_actors)))
        kwargs["data_ref"] = [ray.put(splits)]
    out = ds.map_batches(
        TeacherLogits, fn_constructor_kwargs=kwargs,
        batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor, num_gpus=num_gpus_per_actor)
    from raydistill.console import native_stderr_muted

    batches = iter(out.iter_batches(batch_size=None, batch_format="numpy"))
    # the actor pool starts before the first batch comes back, and the core worker then writes to stderr that
    # each actor's constructor arguments are in the object store with max_restarts > 0 (ray-project/ray#53727):
    # Ray Data's own setting, nothing a user can act on (shown with --verbose)
    with native_stderr_muted():
        first = next(batches, None)
    parts = [dict(b) for b in ([first] if first is not None else [])] + [dict(b) for b in batches]
    return _write_cache(uri, parts, n, t0, teacher_sha256=teacher_sha256, data_fingerprint=data_fingerprint, k=k,
                        views=views, num_classes=num_classes, transform=aug.transform)


def _write_cache(uri: str, parts: list[dict[str, np.ndarray]], n: int, t0: float, *, teacher_sha256: str,
                 data_fingerprint: str, k: int | None, views: int, num_classes: int, transform: str) -> CacheInfo:
    """Write the teacher outputs ``parts`` (``n`` rows in all) as the cache at ``uri``, cache.json last."""
    import time

    table = _to_table(parts).sort_by([("id", "ascending"), ("view", "ascending")])
    assert table.num_rows == n, (table.num_rows, n)
    info = CacheInfo(fingerprint=cache_fingerprint(teacher_sha256, data_fingerprint, k, views, transform),
                     format="topk" if k else "full", k=k, views=views, num_classes=num_classes, rows=table.num_rows,
                     teacher_sha256=teacher_sha256, data_fingerprint=data_fingerprint, transform=transform,
                     teacher_forward_samples=table.num_rows)
    fs, root = _fs(uri)
    fs.create_dir(root, recursive=True)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    _write_atomic(fs, f"{root}/part-00000.parquet", sink.getvalue().to_pybytes())
    info.build_seconds = time.perf_counter() - t0
    # cache.json last: a folder without it (a crash mid-write) is not a cache
    _write_atomic(fs, f"{root}/cache.json", json.dumps(info.__dict__, indent=2).encode())
    return info


# ---- reading ----------------------------------------------------------------------------------------------
def read_info(uri: str) -> CacheInfo:
    fs, root = _fs(uri)
    try:
        with fs.open_input_stream(f"{root}/cache.json") as f:
            return CacheInfo(**json.loads(f.read()))
    except FileNotFoundError:
        raise CacheError(f"no logit cache at {uri} (cache.json missing); "
                         "build it with `raydistill cache-logits`") from None
    except (json.JSONDecodeError, TypeError) as e:
        raise CacheError(f"logit cache {uri} has a corrupt cache.json ({e}); "
                         "rebuild it with `raydistill cache-logits`") from None


def check_cache(uri: str, expected_fingerprint: str, *, teacher_sha256: str, data_fingerprint: str,
                k: int | None, views: int = 1, transform: str = "none") -> CacheInfo:
    """Refuse a cache built from another teacher, other data, another k, transform or number of views — say which."""
    info = read_info(uri)
    if info.fingerprint == expected_fingerprint:
        return info
    why = []
    if info.teacher_sha256 != teacher_sha256:
        why.append("another teacher")
    if info.data_fingerprint != data_fingerprint:
        why.append("other data")
    if info.k != k:
        why.append(f"k={info.k} (this run wants k={k})")
    if info.transform != transform:
        why.append(f"another transform ({info.transform!r}; this run wants {transform!r})")
    if info.views != views:
        why.append(f"{info.views} views (this run wants {views})")
    raise CacheError(f"logit cache {uri} was built from {' and '.join(why) or 'other inputs'}; "
                     "rebuild it with `raydistill cache-logits` or point cache.path elsewhere")


def load_for_ids(uri: str, ids: np.ndarray | None, info: CacheInfo) -> dict[str, np.ndarray]:
    """Teacher outputs for ``ids`` (N,) (None: every cached sample), in that order, every view: {"ids": (N,),
    "logits": (N, V, K)} or {"ids", "topk_probs": (N, V, k), "topk_idx": (N, V, k)}; [n, v] is sample ids[n] in
    view v."""
    fs, root = _fs(uri)
    path = f"{root}/part-00000.parquet"
    try:
        table = pq.read_table(path, filesystem=fs)
    except FileNotFoundError:
        raise CacheError(f"logit cache shard {path} is missing; "
                         "rebuild the cache with `raydistill cache-logits`") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise CacheError(f"logit cache shard {path} is corrupt ({str(e).splitlines()[0][:100]}); "
                         "rebuild the cache with `raydistill cache-logits`") from None
    V = info.views
    cached_ids, cached_views = table.column("id").to_numpy(), table.column("view").to_numpy()
    order = np.lexsort((cached_views, cached_ids)).reshape(-1, V)  # (samples, V): a sample's rows, view 0..V-1
    if len(cached_ids) % V or not (np.all(cached_views[order] == np.arange(V))
                                   and np.all(cached_ids[order] == cached_ids[order[:, :1]])):
        raise CacheError(f"logit cache {uri} does not hold views 0..{V - 1} of every sample; "
                         "rebuild it with `raydistill cache-logits`")
    sample_ids = cached_ids[order[:, 0]]  # (samples,) ascending
    ids = sample_ids if ids is None else np.asarray(ids)
    pos = np.clip(np.searchsorted(sample_ids, ids), 0, len(sample_ids) - 1)
    found = sample_ids[pos] == ids
    if not found.all():
        missing = ids[~found][:3].tolist()
        raise CacheError(f"logit cache {uri} has no entry for sample ids {missing}...; rebuild it for this data")
    rows = order[pos]  # (N, V) table rows
    out = {"ids": ids}
    for name in ("logits", "topk_probs", "topk_idx"):
        if name in table.column_names:
            col = table.column(name).combine_chunks()
            width = col.type.list_size
            flat = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
            out[name] = flat[rows]  # (N, V, width)
    return out
