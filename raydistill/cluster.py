"""Where a command's Ray comes from: connect to a cluster or start a local one, and check that the
cluster can do what the config asks before anything is written (fail in seconds, not hang)."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any

from raydistill.config import Config
from raydistill.errors import ClusterError

CLUSTER_WORKERS = 2  # scale.num_workers: null on a cluster: data-parallel workers by default


def joins_cluster(address: str | None) -> bool:
    """Whether this command joins an existing cluster (``--address`` / ``RAY_ADDRESS``, or the cluster a script
    connected this process to with its own ``ray.init(address=...)`` before calling the API) instead of starting
    Ray."""
    return bool(address or os.environ.get("RAY_ADDRESS")) or ray_in_process() == "cluster"


def ray_in_process() -> str | None:
    """The Ray this process is already on, before raydistill starts one: None (none yet), "local" (this process
    started it: ``init_ray``, or a script's own plain ``ray.init()``) or "cluster" (it connected to a running one:
    ``ray.init(address=...)``, Ray Client)."""
    if "ray" not in sys.modules:  # not imported: not initialized (and this check costs no import)
        return None
    import ray

    if not ray.is_initialized():
        return None
    # Ray has no public "did this process start its Ray": the driver's node object is a head it started, or a
    # connection to one (connect_only); Ray Client has none
    node = getattr(ray._private.worker, "_global_node", None)
    return "local" if node is not None and getattr(node, "head", False) else "cluster"


def resolve_scale(cfg: Config, address: str | None) -> Config:
    """``cfg`` with ``scale.num_workers: null`` (auto) made concrete: Ray Train local mode (0) for a command that
    starts its own local Ray, ``CLUSTER_WORKERS`` data-parallel workers for one that joins a cluster."""
    if cfg.scale.num_workers is not None:
        return cfg
    workers = CLUSTER_WORKERS if joins_cluster(address) else 0
    return dataclasses.replace(cfg, scale=dataclasses.replace(cfg.scale, num_workers=workers))


def init_ray(address: str | None, quiet: bool, verbose: bool = False, dashboard: bool = True) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS``, or start a local Ray in-process. Ray's own INFO lines, its
    workers' forwarded output and its non-actionable warnings are shown only with ``verbose``.

    ``dashboard``: whether a private local Ray starts Ray's dashboard, whose State API Ray Tune needs (a sweep
    hangs without it). ``raydistill run`` and ``cache-logits`` start theirs without it unless ``--verbose``
    (``pipeline.open_run``): nothing they run uses it once Train's placement-group cleaner is left out on a private Ray
    (``trainer.unused_train_callback``), and it is the private Ray's largest part: measured on 2 cores, a private
    Ray started, used for one task, idle 10 s and stopped cost 8.1-8.8 busy CPU-s with its dashboard and 4.7-5.3
    without (3 runs each, alternately). A cluster keeps its own dashboard."""
    global _started_locally, _private_gcs
    import ray

    from raydistill.console import quiet_libraries

    quiet_libraries(verbose)
    target = address or os.environ.get("RAY_ADDRESS")
    if target and target not in ("auto", "local"):
        check_reachable(target)  # also when Ray is already up here: a wrong address is refused, never ignored
    if ray.is_initialized():  # this command's earlier start, or a script's own ray.init() before the API call
        _started_locally = ray_in_process() == "local"
        return
    kwargs: dict[str, Any] = {"include_dashboard": True, "log_to_driver": verbose,
                              "logging_level": "INFO" if verbose else "ERROR"}
    # set on every start, not only on a local one: a process that ran locally, shut Ray down and now joins a
    # cluster must not keep treating it as this one machine (resource waits, Train's preemption watcher)
    _started_locally = not joins_cluster(address)
    if _started_locally:
        # A private local Ray: address="local" never joins a cluster that `ray start` left on this machine, nor
        # follows a stale `ray_current_cluster` file a crashed one left (ray.init() with no address would).
        address = "local"
        # On a 2-core laptop, overcommit logical CPUs: Train workers take fractions and the teacher
        # actor and Train's controller must still fit (measured: otherwise runs wait forever).
        kwargs["num_cpus"] = local_ray_cpus()
        kwargs["_system_config"] = dict(PRIVATE_RAY_SYSTEM_CONFIG)  # a copy: Ray adds its session's keys to it
        kwargs["include_dashboard"] = dashboard
        _wait_longer_for_the_dashboard()  # without the dashboard too: ray.init still waits for its API server
        # Ray gives its local raylet a fixed 30 s to register; on a machine loaded far beyond its cores that is
        # not always enough (measured here at load average 30-45 on 2 cores), and a second try then succeeds.
        for attempt in range(LOCAL_START_ATTEMPTS):
            try:
                ray.init(address=address, **kwargs)
                _private_gcs = ray.get_runtime_context().gcs_address
                return
            except Exception as e:  # Ray raises a bare Exception for this
                if "timed out during startup" not in str(e) or attempt == LOCAL_START_ATTEMPTS - 1:
                    raise
                ray.shutdown()
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as e:
        # "auto" (Ray's: the cluster that `ray start` recorded on this machine) when none runs: Ray's
        # ConnectionError("Could not find any running Ray instance ..."), the user's input, not a bug
        if target != "auto" or "Could not find any running Ray instance" not in str(e):
            raise
        raise ClusterError("no running Ray cluster on this machine for address 'auto'; start one with `ray start "
                           "--head`, or drop --address / RAY_ADDRESS to run on a private local Ray") from None


LOCAL_START_ATTEMPTS = 3

# How long ray.init waits for a private local Ray's dashboard to publish its address. Ray's own limit is 60 s
# (RAY_DASHBOARD_STARTUP_TIMEOUT_S, read once when Ray is imported), after which ray.init raises and the command ends
# in Ray's traceback. Measured here (2 cores, the test suite's two workers plus a unit-test run beside them): a
# private Ray's dashboard had loaded its 9 modules 28 s after the session began but had not published its address
# 73 s in. A sweep needs that dashboard (Tune uses its State API), so a private start waits longer on a loaded
# machine instead of failing; a user's own RAY_DASHBOARD_STARTUP_TIMEOUT_S wins. Without the dashboard
# (``include_dashboard=False``) Ray still starts its API server (a usage-statistics module only) and waits for it
# as long, then logs an error and goes on: the same longer wait keeps that line off a loaded machine's console.
DASHBOARD_START_TIMEOUT_S = 300


def _wait_longer_for_the_dashboard() -> None:
    from ray._private import ray_constants

    if "RAY_DASHBOARD_STARTUP_TIMEOUT_S" not in os.environ:
        ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = max(ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S,
                                                            DASHBOARD_START_TIMEOUT_S)

# A private local Ray collects no Prometheus metrics. Why: at exit, the driver's metrics recorder flushes to the
# node's metrics agent and, when that export fails, waits 10 s for it ("open_telemetry_metric_recorder.cc: Failed
# to export metrics to the metrics agent" in the driver's log, after "Core worker is destructed"); measured here on
# 4 of 8 default runs in a row (2 cores), 10 s of a ~55 s command. Nobody scrapes a private Ray's metrics: it ends
# with the command. Ray's dashboard, State API and Ray Data/Train progress do not use them. A cluster that a
# command joins keeps its own settings.
# Nor does it prestart idle workers when the command connects (Ray's default: two here). Why: whatever the command
# asks of Ray (the teacher actor, Train workers, Ray Data tasks) starts its processes then anyway, and two idle
# workers poll for as long as the Ray lives. Measured (2-core host, 2026-12-04, 30 s after start-up): an idle
# private Ray took 5.7-8.7 % of a core with them (7 runs; each idle worker ~1 %) and 4.7-5.9 % without (10 runs);
# the suite starts ~15 private Rays and keeps two for its whole length. The default run is not faster for it:
# 24.3 s with them and 23.8 s without (means of 7 runs each, run alternately; 20.7-27.3 s), the same report.
PRIVATE_RAY_SYSTEM_CONFIG = {"enable_metrics_collection": False, "prestart_worker_first_driver": False}


def local_ray_cpus() -> int:
    """The logical CPUs of a private local Ray (``init_ray``)."""
    return max(4, os.cpu_count() or 1)


def init_ray_in_background(address: str | None, quiet: bool, verbose: bool = False,
                           dashboard: bool = True) -> Future:
    """``init_ray`` on a helper thread while this one goes on (the pipeline trains its teacher in Ray Train's local
    mode meanwhile, which needs no Ray); the returned Future gives the seconds the start took, or its error.

    Why the helper thread stays alive (idle) while that Ray is up: Ray starts its GCS, raylet and dashboard
    processes with the parent-death signal set (prctl PR_SET_PDEATHSIG, Ray's fate sharing), and Linux sends it
    when the *thread* that started them exits. Measured here: with that thread gone, the driver's next ray.put
    ended the process ("The connection to the plasma store is failed. Terminate the process.")."""
    import ray

    from raydistill.console import quiet_libraries

    quiet_libraries(verbose)
    if threading.current_thread() is threading.main_thread():
        # what ray.init installs when called on the main thread (it cannot from a helper): SIGTERM exits through
        # sys.exit, so atexit shuts Ray down
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    future: Future = Future()

    def target() -> None:
        t0 = time.perf_counter()
        try:
            init_ray(address, quiet, verbose, dashboard)
        except BaseException as e:  # handed to whoever waits on the future
            future.set_exception(e)
            return
        future.set_result(time.perf_counter() - t0)
        while ray.is_initialized():  # keeps Ray's processes alive (see above); ends once Ray is shut down
            time.sleep(1.0)

    threading.Thread(target=target, name="raydistill-ray-start", daemon=True).start()
    return future


_started_locally = False  # True when this process started its own Ray (no autoscaler to wait for)
_private_gcs: str | None = None  # the GCS address of the Ray ``init_ray`` started for this process (not a script's)


def started_locally() -> bool:
    """Whether this process started the Ray it uses (``init_ray`` with no cluster to join): one node, this
    machine."""
    return _started_locally


def private_ray() -> bool:
    """Whether the Ray this process is on is one ``init_ray`` started for it: it ends with the command (or with
    the script's ``ray.shutdown()``), and nothing else runs on it. Not a script's own ``ray.init()``, which may be
    the script's for longer, nor a cluster."""
    if _private_gcs is None or ray_in_process() != "local":
        return False
    import ray

    return ray.get_runtime_context().gcs_address == _private_gcs


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


def train_gpus(cfg: Config) -> int:
    """The GPUs a Train stage takes: one per worker with ``scale.use_gpu`` (local mode trains on one GPU here)."""
    return max(1, cfg.scale.num_workers) if cfg.scale.use_gpu else 0


def resource_needs(cfg: Config) -> dict[str, float]:
    """The CPUs and GPUs a run's Train stages and teacher actor take at once."""
    s = cfg.scale
    need = {"CPU": s.num_workers * s.cpus_per_worker + (s.teacher_cpus if cfg.distill.teacher_mode == "live" else 0)}
    need_gpu = train_gpus(cfg) + s.teacher_gpus
    if need_gpu:
        need["GPU"] = need_gpu
    return need


def cache_actor_cpus(cfg: Config) -> float:
    """The CPUs of each teacher replica in the Ray Data actor pool that builds the logit cache."""
    return cfg.scale.teacher_cpus or 0.5


def cache_in_process(cfg: Config, streamed: bool) -> bool:
    """Whether the command's own process runs the logit cache's teacher pass (``cache.build_cache(in_process=True)``)
    instead of a Ray Data actor pool: Ray Train's local mode (the students train in this process too) on in-memory
    data, the teacher on CPU. The pool's actor process, imports and Ray Data executor cost seconds on a laptop for
    a pass the loop makes in milliseconds on small data; a streamed set, data-parallel workers or a teacher GPU
    keep the pool (``cache.num_actors`` replicas)."""
    return cfg.scale.num_workers == 0 and not streamed and not cfg.scale.teacher_gpus


def cache_needs(cfg: Config) -> dict[str, float]:
    """The CPUs and GPUs the logit cache's actor pool (``cache.num_actors`` teacher replicas) takes at once; it
    runs between the teacher's and the students' stages, not beside them."""
    need = {"CPU": cfg.cache.num_actors * cache_actor_cpus(cfg)}
    if cfg.scale.teacher_gpus:
        need["GPU"] = cfg.cache.num_actors * cfg.scale.teacher_gpus
    return need


def check_trial_resources(cfg: Config, address: str | None, teacher_cpus: float) -> None:
    """Refuse a sweep whose trials can never be scheduled: Tune keeps such a trial PENDING forever, silently (seen:
    ``tune.cpus_per_trial=64`` on a laptop waited with no line). A private local Ray's CPUs are known before it
    is up (``local_ray_cpus``); a cluster is asked through its autoscaler first, as ``check_resources`` does.
    ``teacher_cpus``: what the shared teacher actor holds for the whole sweep (live mode), else 0."""
    need = cfg.tune.cpus_per_trial + teacher_cpus
    if joins_cluster(address):
        have = _ask_and_wait({"CPU": need}, [{"CPU": need}], cfg.scale.resource_wait_s).get("CPU", 0)
    elif ray_in_process():  # the local Ray a script started with its own ray.init(num_cpus=...)
        import ray

        have = ray.cluster_resources().get("CPU", 0)
    else:
        have = local_ray_cpus()
    if need > have:
        beside = f" + {teacher_cpus:g} for the shared teacher actor" if teacher_cpus else ""
        raise ClusterError(f"tune.cpus_per_trial={cfg.tune.cpus_per_trial:g}{beside} needs {need:g} CPUs for one "
                           f"trial but the Ray cluster has {have:g}, so no trial could ever start; lower "
                           "tune.cpus_per_trial or add nodes")


def check_resources(cfg: Config, wait_s: float | None = None, builds_cache: bool = False) -> None:
    """Refuse, instead of waiting forever, a request the cluster can never satisfy: the Train stages with the
    teacher actor beside them and, with ``builds_cache``, the logit cache's actor pool (Ray Data waits forever
    for actors that cannot be placed; seen: ``cache.num_actors=64`` on a laptop).

    On a local Ray (started here) the answer is immediate. On a cluster the request is passed to
    the autoscaler (``request_resources``) and we wait up to ``scale.resource_wait_s`` for the
    nodes to join (GPU workers often start at zero), then fail naming what is missing.
    """
    s = cfg.scale
    need, gpus = resource_needs(cfg), train_gpus(cfg)
    cache = cache_needs(cfg) if builds_cache else {}
    wants = {k: max(need.get(k, 0), cache.get(k, 0)) for k in {*need, *cache}}
    wait_s = (0.0 if _started_locally else s.resource_wait_s) if wait_s is None else wait_s
    bundle = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
    have = _ask_and_wait(wants, [bundle] * s.num_workers, wait_s)
    if s.use_gpu and have.get("GPU", 0) < gpus:
        raise ClusterError(f"scale.use_gpu=true with scale.num_workers={s.num_workers} needs {gpus} GPU(s) "
                           f"but the cluster has {int(have.get('GPU', 0))}; set scale.use_gpu=false or add GPU nodes")
    if s.teacher_gpus > have.get("GPU", 0):
        raise ClusterError(f"scale.teacher_gpus={s.teacher_gpus} but the cluster has {int(have.get('GPU', 0))} GPU(s); "
                           "set scale.teacher_gpus=0 or add a GPU node")
    _refuse(cfg, need, cache, have)


def _ask_and_wait(wants: dict[str, float], bundles: list[dict], wait_s: float) -> dict[str, float]:
    """The cluster's resources, after asking its autoscaler for ``bundles`` and waiting up to ``wait_s`` for
    ``wants`` when they are not there yet (GPU nodes often start at zero)."""
    import ray

    if wait_s > 0 and any(ray.cluster_resources().get(k, 0) < v for k, v in wants.items()):
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
        deadline = time.time() + wait_s
        while time.time() < deadline and any(ray.cluster_resources().get(k, 0) < v for k, v in wants.items()):
            time.sleep(2)
    return ray.cluster_resources()


def check_local_cpus(cfg: Config, builds_cache: bool = False) -> None:
    """``check_resources``' CPU checks for a private local Ray before it starts: its CPUs are known
    (``local_ray_cpus``), so a request it can never meet is refused at once, without starting it."""
    cache = cache_needs(cfg) if builds_cache else {}
    # CPUs only: the GPUs a private Ray will have are what it detects when it starts (check_resources then)
    _refuse(cfg, resource_needs(cfg), {"CPU": cache["CPU"]} if cache else {}, {"CPU": local_ray_cpus()})


def _refuse(cfg: Config, need: dict[str, float], cache: dict[str, float], have: dict[str, float]) -> None:
    """The one-line refusals of CPUs (and a cache pool's GPUs) that ``have`` cannot give."""
    s = cfg.scale
    if need["CPU"] > have.get("CPU", 0):
        live = cfg.distill.teacher_mode == "live"
        parts = [f"scale.num_workers={s.num_workers} x scale.cpus_per_worker={s.cpus_per_worker:g}"] \
            + ([f"scale.teacher_cpus={s.teacher_cpus:g} for the teacher actor"] if live else [])
        raise ClusterError(f"{' + '.join(parts)} need {need['CPU']:g} CPUs at once but the cluster has "
                           f"{have.get('CPU', 0):g}; lower them or add nodes")
    for key, have_n in (("CPU", have.get("CPU", 0)), ("GPU", have.get("GPU", 0))):
        if cache.get(key, 0) > have_n:
            per = f"{cache_actor_cpus(cfg):g} CPUs (scale.teacher_cpus)" if key == "CPU" else \
                f"{s.teacher_gpus:g} GPUs (scale.teacher_gpus)"
            raise ClusterError(f"cache.num_actors={cfg.cache.num_actors} teacher replicas x {per} need "
                               f"{cache[key]:g} {key}s to build the logit cache but the cluster has {have_n:g}; "
                               "lower cache.num_actors or add nodes")
