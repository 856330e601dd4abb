"""The worker's training step: the loss mixing, gradient clipping and mixed precision (no Ray needed)."""

import pytest
import torch
import torch.nn.functional as F

from raydistill import config
from raydistill.core.losses import soft_kd_loss
from raydistill.worker import TeacherOut, train_step


def _setup(**overrides):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    cfg = config.load(None, overrides).to_dict()
    x, y = torch.randn(16, 1, 8, 8) * 50, torch.randint(0, 10, (16,))
    teacher = TeacherOut(torch.randn(16, 10) * 5)
    phase = {"name": "distill", "alpha": 0.5, "beta": 0.0, "lr": 0.1}
    return model, cfg, x, y, teacher, phase


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

    def request(self, idx, xb):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return idx.clone()

    def result(self, idx):
        self.in_flight -= 1
        self.served.append(idx)
        return TeacherOut(F.one_hot(idx % 10, 10).float() * 10)


@pytest.mark.parametrize("depth", [1, 3, 50])
def test_prefetched_teacher_answers_reach_their_own_batch(depth, monkeypatch):
    """Each step must be trained against the teacher output requested for its own samples, whatever the prefetch depth."""
    from raydistill import worker

    model, cfg, *_ = _setup(**{"scale.teacher_prefetch": depth})
    x, y = torch.randn(100, 1, 8, 8), torch.arange(100) % 10
    seen = []

    def spy_step(model, opt, xb, yb, teacher_out, *args, **kwargs):
        seen.append((xb.clone(), teacher_out.logits.argmax(1)))
        return 0.0, 0

    monkeypatch.setattr(worker, "train_step", spy_step)
    teacher = RecordingTeacher()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ConstantLR(opt, 1.0)
    phase = {"name": "distill", "alpha": 0.5, "beta": 0.0, "lr": 0.1, "batch_size": 16}
    worker.run_epoch(model, opt, sched, teacher, x, y, phase, cfg, 0, None, torch.device("cpu"))
    assert len(seen) == 7 and teacher.in_flight == 0
    assert teacher.max_in_flight == min(depth, 7)
    for xb, t_arg in seen:  # the teacher's answer encodes the ids, so it must agree with the batch's own samples
        ids = torch.tensor([int(torch.nonzero((x == row).all(dim=(1, 2, 3)))[0]) for row in xb])
        assert torch.equal(t_arg, ids % 10)
