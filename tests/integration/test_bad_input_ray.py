"""Bad input that is found once Ray is up (cluster resources, caches, a NaN loss): one line, exit status 2."""

import json
from pathlib import Path

import pytest
import torch
from smoke import SMOKE

from raydistill import cli
from raydistill.checkpoints import model_spec, save_model
from raydistill.models import build_model

SMOKE_ARGS = [a for k, v in SMOKE.items() for a in ("--set", f"{k}={json.dumps(v)}")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    ten = build_model("cnn", num_classes=10, in_channels=1, image_size=8)
    good = d / "good.pt"
    save_model(good, ten, model_spec("cnn", {}, 10, (1, 8, 8)))
    return {"good_teacher": str(good)}


def _run_cli(capsys, argv):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.ray
def test_gpu_requested_where_none_exists(ray_local, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, err = _run_cli(capsys, ["run", "--out", str(tmp_path / "r"), *SMOKE_ARGS, "--set", "scale.use_gpu=true"])
    assert code == 2 and "GPU" in err and "scale.use_gpu=false" in err
    assert not (tmp_path / "r").exists()  # failed fast, before writing anything


@pytest.mark.ray
def test_more_workers_than_cpus_fails_fast(ray_local, tmp_path, capsys):
    code, err = _run_cli(capsys, ["run", "--out", str(tmp_path / "r"), *SMOKE_ARGS, "--set", "scale.num_workers=64",
                                  "--set", "scale.cpus_per_worker=1"])
    assert code == 2 and "scale.num_workers=64 x scale.cpus_per_worker=1 + scale.teacher_cpus=0.5 for the teacher " \
        "actor need 64.5 CPUs at once but the cluster has " in err


@pytest.mark.ray
def test_cache_built_by_another_teacher_is_refused(ray_local, files, tmp_path, capsys):
    from raydistill.cache import build_cache
    from raydistill.data import fingerprint, load_splits

    splits = load_splits("digits", limit=SMOKE["data.limit"])
    other = build_model("cnn", num_classes=10, in_channels=1, image_size=8)
    uri = str(tmp_path / "cache")
    build_cache(uri, teacher_spec=model_spec("cnn", {}, 10, (1, 8, 8)), teacher_state=other.state_dict(),
                teacher_sha256="0" * 64, splits=splits, data_fingerprint=fingerprint(splits))
    code, err = _run_cli(capsys, ["run", "--out", str(tmp_path / "r"), *SMOKE_ARGS,
                                  "--set", f"teacher.checkpoint={files['good_teacher']}",
                                  "--set", "distill.teacher_mode=cache", "--set", f"cache.path={uri}"])
    assert code == 2 and "another teacher" in err and "cache-logits" in err
    assert not (tmp_path / "r").exists()  # refused before any training or writing


@pytest.mark.ray
def test_given_cache_of_augmented_views_is_checked_with_its_views(ray_local, files, tmp_path):
    """The early check of a user-given cache compares the same fingerprint as the run (views and transform
    included): the cache this config would build passes, one with another view count is refused."""
    from raydistill import config
    from raydistill.cache import CacheError, build_cache
    from raydistill.checkpoints import load_model
    from raydistill.data import fingerprint
    from raydistill.manifest import sha256_file
    from raydistill.pipeline import check_given_cache, load_data

    uri = str(tmp_path / "cache")
    overrides = {**SMOKE, "teacher.checkpoint": files["good_teacher"], "distill.teacher_mode": "cache",
                 "cache.path": uri, "data.augment": "crop", "cache.views": 2}
    cfg = config.load(None, overrides)
    splits = load_data(cfg)
    teacher, spec, _ = load_model(files["good_teacher"])
    build_cache(uri, teacher_spec=spec, teacher_state=teacher.state_dict(),
                teacher_sha256=sha256_file(Path(files["good_teacher"])),
                splits=splits, data_fingerprint=fingerprint(splits), views=2, augment="crop", seed=cfg.seed)
    assert check_given_cache(cfg, tmp_path / "r", fingerprint(splits), splits.shape[1])  # the matching cache: reused
    with pytest.raises(CacheError, match="3 views|2 views"):
        check_given_cache(config.load(None, {**overrides, "cache.views": 3}), tmp_path / "r", fingerprint(splits),
                          splits.shape[1])


@pytest.mark.ray
def test_a_finished_cache_is_reused_whatever_pool_would_have_built_it(ray_local, files, tmp_path, capsys):
    """cache.num_actors sizes the actor pool that builds a cache (with Train workers; in local mode the command's
    own process labels it); a command that reuses a finished cache starts no pool, so a pool larger than the
    machine is not refused (it was: "need 50000 CPUs to build the logit cache")."""
    sets = {"teacher.checkpoint": files["good_teacher"], "distill.teacher_mode": "cache", "prune.ratio": 0,
            "quantize.scheme": "none", "cache.path": str(tmp_path / "cache")}
    argv = ["run", "--out", str(tmp_path / "first"), *SMOKE_ARGS, *[a for k, v in sets.items()
                                                                    for a in ("--set", f"{k}={v}")]]
    assert cli.main(argv) == 0, capsys.readouterr().err[-3000:]
    capsys.readouterr()
    code = cli.main(["cache-logits", *argv[1:], "--set", "scale.num_workers=1", "--set", "cache.num_actors=100000",
                     "--out", str(tmp_path / "second")])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert f"logit cache {tmp_path / 'cache'}: up to date" in captured.out, captured.out[-3000:]


@pytest.mark.ray
def test_nan_loss_names_the_step_and_cause(ray_local, tmp_path, capsys):
    # A learning rate of 1e30 makes the first AdamW step blow the weights up: the loss turns inf/NaN at step 1.
    # (Local mode; with Train workers the stage is not restarted either: test_faults.py.)
    code, err = _run_cli(capsys, ["run", "--quiet", "--out", str(tmp_path / "r"), *SMOKE_ARGS,
                                  "--set", "teacher.lr=1e30"])
    lines = [line for line in err.splitlines() if line.startswith("raydistill:")]
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert "at step" in lines[0] and "learning rate" in lines[0] and "Traceback" not in err



def test_a_bug_in_a_stage_after_ray_started_exits_1_with_traceback(ray_local, tiny_teacher, monkeypatch, tmp_path,
                                                                   capsys):
    """Inside the baseline stage, with Ray up: a non-user ValueError keeps its traceback and exits 1."""
    from raydistill import pipeline

    def broken(ctx, init_state, teacher_sha):
        raise ValueError("Expected all tensors to be on the same device")  # what a bug inside torch looks like

    monkeypatch.setattr(pipeline, "train_baseline", broken)
    code, err = _run_cli(capsys, ["run", "--quiet", "--out", str(tmp_path / "r"), *SMOKE_ARGS,
                                  "--set", f"teacher.checkpoint={tiny_teacher}"])
    assert code == 1 and "Traceback" in err and "same device" in err and "this is a bug" in err, err[-2000:]
    assert "raydistill: error:" not in err
