"""The worker's training step: the loss mixing, gradient clipping and mixed precision (no Ray needed)."""

import pytest
import torch
import torch.nn.functional as F

from raydistill import config
from raydistill.core.losses import (
    dist_loss,
    dkd_loss,
    soft_kd_loss,
    sparse_topk_kd_loss,
    sparse_topk_log_probs,
    standardize_logits,
    teacher_topk,
    topk_log_probs,
)
from raydistill.job import Phase, TeacherSource
from raydistill.teacher import InprocessTeacher, TeacherOut, make_teacher
from raydistill.worker import train_step


def _phase(batch_size=16):
    return Phase("distill", epochs=1, lr=0.1, batch_size=batch_size, weight_decay=0.0, alpha=0.5)


def _setup(**overrides):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    cfg = config.load(None, overrides)
    x, y = torch.randn(16, 1, 8, 8) * 50, torch.randint(0, 10, (16,))
    teacher = TeacherOut(torch.randn(16, 10) * 5)
    return model, cfg, x, y, teacher, _phase()


class NormRecorder(torch.optim.SGD):
    """SGD that records the total gradient norm it is asked to apply."""

    norms: list

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return super().step(closure)


@pytest.mark.parametrize("bound", [0.01, 0.5, 2.0])
def test_applied_gradient_norm_never_exceeds_the_bound(bound):
    model, cfg, x, y, teacher, phase = _setup(**{"distill.grad_clip": bound})
    opt = NormRecorder(model.parameters(), lr=0.1)
    opt.norms = []
    for step in range(5):
        train_step(model, opt, x, y, teacher, phase, cfg, step)
    assert max(opt.norms) <= bound * (1 + 1e-5)


def test_without_clipping_the_same_gradients_are_larger():
    model, cfg, x, y, teacher, phase = _setup()
    opt = NormRecorder(model.parameters(), lr=0.0)
    opt.norms = []
    train_step(model, opt, x, y, teacher, phase, cfg, 0)
    assert opt.norms[0] > 0.01  # so the 0.01 bound above really clipped


def test_loss_is_the_visible_mix():
    model, cfg, x, y, teacher, phase = _setup()
    with torch.no_grad():
        logits = model(x)
    expected = 0.5 * F.cross_entropy(logits, y) + 0.5 * soft_kd_loss(logits, teacher.logits, 4.0)
    loss, _ = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, teacher, phase, cfg, 0)
    assert loss == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("overrides,soft", [
    ({"distill.loss": "dkd", "distill.dkd_alpha": 0.5, "distill.dkd_beta": 3.0},
     lambda s, t, y: dkd_loss(s, t, y, 4.0, 0.5, 3.0)),
    ({"distill.loss": "dist", "distill.dist_beta": 2.0, "distill.dist_gamma": 0.5},
     lambda s, t, y: dist_loss(s, t, 4.0, 2.0, 0.5)),
    ({"distill.logit_standardize": True},
     lambda s, t, y: soft_kd_loss(standardize_logits(s), standardize_logits(t), 4.0)),
    ({"distill.loss": "dkd", "distill.logit_standardize": True},
     lambda s, t, y: dkd_loss(standardize_logits(s), standardize_logits(t), y, 4.0, 1.0, 8.0)),
])
def test_distill_loss_picks_the_soft_term_of_the_visible_mix(overrides, soft):
    """distill.loss / logit_standardize replace only the soft term: (1 - alpha) * CE + alpha * <the core loss>."""
    model, cfg, x, y, teacher, phase = _setup(**overrides)
    with torch.no_grad():
        logits = model(x)
    expected = 0.5 * F.cross_entropy(logits, y) + 0.5 * soft(logits, teacher.logits, y)
    assert float(expected) != pytest.approx(
        float(0.5 * F.cross_entropy(logits, y) + 0.5 * soft_kd_loss(logits, teacher.logits, 4.0)), rel=1e-3)
    loss, _ = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, teacher, phase, cfg, 0)
    assert loss == pytest.approx(float(expected), rel=1e-5)


def test_bf16_autocast_on_cpu_trains():
    model, cfg, x, y, teacher, phase = _setup(**{"distill.precision": "bf16"})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    first, _ = train_step(model, opt, x / 50, y, teacher, phase, cfg, 0)
    for step in range(20):
        last, _ = train_step(model, opt, x / 50, y, teacher, phase, cfg, step)
    assert torch.isfinite(torch.tensor(last)) and last < first


def test_fp16_needs_a_gpu():
    with pytest.raises(config.ConfigError, match="fp16 needs scale.use_gpu=true"):
        config.load(None, {"distill.precision": "fp16"})


class RecordingTeacher:
    """A teacher whose answer encodes the request's sample ids; records how many requests are in flight."""

    def __init__(self):
        self.in_flight, self.max_in_flight, self.served = 0, 0, []

    def request(self, idx, xb, views):  # idx: the samples' ids (here equal to their positions)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return idx.clone()

    def result(self, idx):
        self.in_flight -= 1
        self.served.append(idx)
        return TeacherOut(F.one_hot(idx % 10, 10).float() * 10)


@pytest.mark.parametrize("depth", [1, 3, 50])
def test_prefetched_teacher_answers_reach_their_own_batch(depth, monkeypatch):
    """Each step must be trained against the teacher output requested for its own samples,
    whatever the prefetch depth."""
    from raydistill import worker

    model, cfg, *_ = _setup(**{"scale.teacher_prefetch": depth})
    x, y = torch.randn(100, 1, 8, 8), torch.arange(100) % 10
    seen = []

    def spy_step(model, opt, xb, yb, teacher_out, *args, **kwargs):
        seen.append((xb.clone(), teacher_out.logits.argmax(1)))
        opt.step()  # as train_step does (no gradients: nothing changes), so the scheduler's step follows one
        return 0.0, 0

    monkeypatch.setattr(worker, "train_step", spy_step)
    teacher = RecordingTeacher()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ConstantLR(opt, 1.0)
    phase = _phase(16)
    worker.run_epoch(model, opt, sched, teacher, worker.InMemoryTrain(x, y, torch.arange(100)), phase, cfg, 0, None,
                     torch.device("cpu"))
    assert len(seen) == 7 and teacher.in_flight == 0
    groups = -(-7 // depth)  # one request per group of `depth` batches (16 samples each), the last one shorter
    assert [len(r) for r in teacher.served] == [min(depth * 16, 100 - 16 * depth * g) for g in range(groups)]
    assert teacher.max_in_flight == min(2, groups)  # the next group is always asked for before this one is used
    for xb, t_arg in seen:  # the teacher's answer encodes the ids, so it must agree with the batch's own samples
        ids = torch.tensor([int(torch.nonzero((x == row).all(dim=(1, 2, 3)))[0]) for row in xb])
        assert torch.equal(t_arg, ids % 10)


# ---- augmentation: the student trains on exactly the views the teacher labelled -------------------------
def _write_cache(root, ids, V, K, transform):
    """A real cache folder (Parquet + cache.json) written without Ray: the row of (sample n, view v) has
    logits [n, v, 0, ...], so the teacher output a step receives says which row it was gathered from."""
    import json

    import numpy as np
    import pyarrow.parquet as pq

    from raydistill.cache import CacheInfo, _to_table, cache_fingerprint

    n = np.repeat(np.arange(len(ids)), V)
    v = np.tile(np.arange(V), len(ids))
    logits = np.zeros((len(n), K), np.float16)
    logits[:, 0], logits[:, 1] = n, v
    order = np.random.default_rng(0).permutation(len(n))  # rows in no particular order on disk
    table = _to_table([{"id": ids[n][order], "view": v[order].astype(np.int16), "logits": logits[order]}])
    root.mkdir()
    pq.write_table(table, root / "part-00000.parquet")
    info = CacheInfo(fingerprint=cache_fingerprint("t", "d", None, V, transform), format="full", k=None, views=V,
                     num_classes=K, rows=len(n), teacher_sha256="t", data_fingerprint="d", transform=transform)
    (root / "cache.json").write_text(json.dumps(info.__dict__))
    return info


@pytest.mark.parametrize("kind", ["crop", "crop_flip"])
def test_student_trains_on_exactly_the_cached_views(kind, tmp_path, monkeypatch):
    """Cache mode, V views: every step's pixels are one of the sample's V cached views, the teacher output
    it gets is that very (sample, view) row, and over V epochs each sample goes through all V views."""
    from raydistill import worker
    from raydistill.augment import augment_batch, make_augment, view_params

    V, N, seed = 3, 40, 5
    model, cfg, *_ = _setup(**{"data.augment": kind, "data.augment_pad": 3, "cache.views": V, "seed": seed,
                               "scale.teacher_prefetch": 3})
    x, y = torch.randn(N, 1, 8, 8), torch.arange(N) % 10
    ids = torch.arange(N) * 7 + 1000  # sample ids, not positions, define the views
    pad = 3  # 49 crops (x2 flips): a sample's V views rarely coincide, so a wrong view id shows
    info = _write_cache(tmp_path / "cache", ids.numpy(), V, 10, make_augment(kind, pad, seed, 8).transform)
    teacher = make_teacher(TeacherSource("cache", uri=str(tmp_path / "cache"), info=info.__dict__), cfg,
                           torch.device("cpu"), 0, ids.numpy(), image_size=8)
    # every sample's V candidate views, computed independently of the worker: (V, N, C, H, W)
    candidates = torch.stack([augment_batch(x, *view_params(ids.numpy(), v, seed, pad, kind == "crop_flip"), pad)
                              for v in range(V)])
    distinct = sum(len({candidates[v, n].numpy().tobytes() for v in range(V)}) == V for n in range(N))
    assert distinct > N * 0.8  # the views really differ
    steps = []
    monkeypatch.setattr(worker, "train_step",
                        lambda m, o, xb, yb, t_out, *a, **k: steps.append((xb, t_out)) or o.step() or (0.0, 0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ConstantLR(opt, 1.0)
    phase = _phase(8)
    shown = {n: [] for n in range(N)}  # the views each sample was trained on, epoch by epoch
    for epoch in range(V):
        steps.clear()
        worker.run_epoch(model, opt, sched, teacher, worker.InMemoryTrain(x, y, ids), phase, cfg, epoch, None,
                         torch.device("cpu"))
        assert len(steps) == N // 8
        for xb, t_out in steps:
            rows, views = t_out.logits[:, 0].long(), t_out.logits[:, 1].long()  # the cache rows it was given
            for pixels, n, v in zip(xb, rows.tolist(), views.tolist()):
                matches = [w for w in range(V) if torch.equal(pixels, candidates[w, n])]
                assert v in matches, (n, v, matches)  # the student sees the cached view the teacher labelled
                shown[n].append(v)
    assert all(sorted(vs) == list(range(V)) for vs in shown.values()), shown  # all V views used, once each


def test_live_teachers_see_the_students_pixels_and_a_fresh_view_every_epoch(monkeypatch):
    """Without a cache the view id is the epoch; the in-process teacher labels the very augmented batch."""
    from raydistill import worker
    from raydistill.augment import make_augment
    from raydistill.checkpoints import build_from_spec, model_spec

    spec = model_spec("cnn", {"widths": [4, 8], "hidden": 16}, 10, (1, 8, 8))
    model, cfg, *_ = _setup(**{"data.augment": "crop_flip", "seed": 2})
    teacher = InprocessTeacher(spec, build_from_spec(spec).state_dict(), torch.device("cpu"))
    x, y, ids = torch.randn(32, 1, 8, 8), torch.arange(32) % 10, torch.arange(32) + 50
    aug = make_augment("crop_flip", 0, 2, 8)
    steps = []
    monkeypatch.setattr(worker, "train_step",
                        lambda m, o, xb, yb, t_out, *a, **k: steps.append((xb, t_out)) or o.step() or (0.0, 0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ConstantLR(opt, 1.0)
    phase = _phase(32)
    epochs = []
    for epoch in range(2):
        steps.clear()
        worker.run_epoch(model, opt, sched, teacher, worker.InMemoryTrain(x, y, ids), phase, cfg, epoch, None,
                         torch.device("cpu"))
        (xb, t_out), = steps
        with torch.inference_mode():
            torch.testing.assert_close(t_out.logits, teacher.model(xb))  # the teacher labelled these pixels
        order = [int(torch.nonzero((aug(x, ids, epoch) == row).all(dim=(1, 2, 3)))[0]) for row in xb]
        assert torch.equal(xb, aug(x[order], ids[order], epoch))  # view id = epoch
        epochs.append(xb[torch.argsort(torch.tensor(order))])
    assert not torch.equal(epochs[0], epochs[1])  # a fresh view in the next epoch


# ---- top-k caches: the teacher distribution the step is given (cache.topk_loss) ----------------------------
def _write_topk_cache(root, ids, teacher_logits, k):
    """A real top-k cache folder (one view) written without Ray, as cache.LogitCacheActor stores it."""
    import json

    import numpy as np
    import pyarrow.parquet as pq

    from raydistill.cache import CacheInfo, _to_table, cache_fingerprint

    probs, idx = teacher_topk(teacher_logits, k)
    table = _to_table([{"id": ids, "view": np.zeros(len(ids), np.int16),
                        "topk_probs": probs.numpy().astype(np.float16), "topk_idx": idx.numpy().astype(np.int16)}])
    root.mkdir()
    pq.write_table(table, root / "part-00000.parquet")
    info = CacheInfo(fingerprint=cache_fingerprint("t", "d", k, 1, "none"), format="topk", k=k, views=1,
                     num_classes=teacher_logits.shape[1], rows=len(ids), teacher_sha256="t", data_fingerprint="d",
                     transform="none")
    (root / "cache.json").write_text(json.dumps(info.__dict__))
    return info, probs.half(), idx


@pytest.mark.parametrize("topk_loss", ["tail_filled", "sparse"])
def test_topk_cache_gives_the_step_the_chosen_target(topk_loss, tmp_path):
    """cache.topk_loss: sparse makes the step's soft term sparse_topk_kd_loss; tail_filled keeps topk_log_probs."""
    model, cfg, x, y, _, phase = _setup(**{"distill.teacher_mode": "cache", "cache.k": 3,
                                           "cache.topk_loss": topk_loss})
    ids = torch.arange(16) + 100
    info, probs, idx = _write_topk_cache(tmp_path / "cache", ids.numpy(), torch.randn(16, 10) * 4, 3)
    teacher = make_teacher(TeacherSource("cache", uri=str(tmp_path / "cache"), info=info.__dict__), cfg,
                           torch.device("cpu"), 0, ids.numpy(), image_size=8)
    out = teacher.result(teacher.request(ids, x, torch.zeros(16, dtype=torch.long)))
    expand = sparse_topk_log_probs if topk_loss == "sparse" else topk_log_probs
    torch.testing.assert_close(out.logits, expand(probs, idx, 10))
    with torch.no_grad():
        logits = model(x)
    if topk_loss == "sparse":
        soft = sparse_topk_kd_loss(logits, probs, idx, 4.0)
    else:
        soft = soft_kd_loss(logits, topk_log_probs(probs, idx, 10), 4.0)
    expected = 0.5 * F.cross_entropy(logits, y) + 0.5 * soft
    loss, _ = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, out, phase, cfg, 0)
    assert loss == pytest.approx(float(expected), rel=1e-5)


class _Killed(BaseException):
    """What a SIGKILL is to the loop: it ends there, nothing after it runs."""


class _KilledAtReport:
    """A one-process session (rank 0) whose process dies while reporting epoch ``kill_at``'s checkpoint: the moment
    a killed run may or may not have persisted that epoch. ``journal_first`` as in local mode (True) or on Train
    workers (False)."""

    rank, world, device = 0, 1, torch.device("cpu")

    def __init__(self, kill_at: int, journal_first: bool):
        self.kill_at, self.journal_first, self.reported = kill_at, journal_first, []

    def get_checkpoint(self):
        return None

    def report(self, metrics, state):
        if state is not None and metrics["epoch"] == self.kill_at:
            raise _Killed
        self.reported.append(metrics["epoch"])

    def progress(self, text):
        pass

    def prepare_model(self, model):
        return model


@pytest.mark.parametrize("local_mode", [True, False])
def test_an_epoch_is_journaled_before_its_checkpoint_in_local_mode_and_after_its_report_on_workers(local_mode,
                                                                                                     tmp_path):
    """Local mode: every epoch a resumed run may skip is in the journal; killed while epoch 1's checkpoint is
    being reported, the journal already holds epoch 1 (before 2026-12-05 the line came after the report, and a kill
    between the two left a checkpointed epoch unjournaled: the streamed kill-and-resume test saw epochs 0, 1, 3, 4,
    5). On Train workers the line follows the report (worker.journal says why): epoch 1 is not in it yet."""
    import json

    from raydistill import worker
    from raydistill.checkpoints import model_spec
    from raydistill.data import load_splits
    from raydistill.job import StageJob, baseline_phases

    cfg = config.load(None, {"data.limit": 64, "distill.epochs": 3})
    splits = load_splits("digits", limit=64)
    spec = model_spec("cnn", {"widths": [4, 8], "hidden": 8}, splits.num_classes, splits.shape)
    path = tmp_path / "journal.jsonl"
    job = StageJob(stage="student_baseline", config=cfg, spec=spec, data=splits, phases=baseline_phases(cfg),
                   journal=str(path), verbose=False)
    session = _KilledAtReport(kill_at=1, journal_first=local_mode)
    with pytest.raises(_Killed):
        worker.run_loop(job, session)
    assert session.reported == [0]
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == ([0, 1] if local_mode else [0])


def test_a_killed_processs_checkpoint_folder_is_removed_by_the_next_process_that_reports(tmp_path, monkeypatch):
    """A process SIGKILLed inside ``reported_state`` leaves its ``raydistill-ckpt-<pid>@<host>-*`` folder; the next
    process's first report removes it, and leaves a live process's folder, another host's and one named without
    pid and host."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import tempfile

    from raydistill import worker

    # a real process killed by pid inside reported_state, its TMPDIR this test's folder
    child = subprocess.Popen([sys.executable, "-c", "import os, sys, time, tempfile; tempfile.tempdir = sys.argv[1]\n"
                              "from raydistill.worker import reported_state\n"
                              "with reported_state({'epoch': 0}) as folder:\n"
                              "    print(folder, flush=True); time.sleep(600)", str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    orphan = child.stdout.readline().strip()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    host = socket.gethostname()
    assert os.path.basename(orphan).startswith(f"raydistill-ckpt-{child.pid}@{host}-") and os.path.isdir(orphan)
    live = tmp_path / f"raydistill-ckpt-1@{host}-live"  # pid 1 exists; not ours to remove
    elsewhere = tmp_path / f"raydistill-ckpt-{child.pid}@another-host-k2j4x_9q"  # a shared TMPDIR: not this host's
    old_style = tmp_path / "raydistill-ckpt-k2j4x_9q"  # named before folders carried pid and host
    live.mkdir(), elsewhere.mkdir(), old_style.mkdir()

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(worker, "_orphans_swept", False)
    with worker.reported_state({"epoch": 1}) as folder:
        assert os.path.basename(folder).startswith(f"raydistill-ckpt-{os.getpid()}@{host}-")
        assert not os.path.exists(orphan)
    assert not os.path.exists(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, elsewhere.name, old_style.name])
