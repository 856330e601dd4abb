"""Bad input: one line naming the problem and the fix, exit status 2, no traceback, good outputs untouched."""

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raydistill import cli
from raydistill.checkpoints import model_spec, save_model
from raydistill.models import build_model

from conftest import SMOKE

SMOKE_ARGS = [a for k, v in SMOKE.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def _parquet(path: Path, rows: dict) -> str:
    pq.write_table(pa.table(rows), path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    f = {}
    f["no_label"] = _parquet(d / "no_label.parquet", {"features": [[0.0] * 64] * 4})
    f["short"] = _parquet(d / "short.parquet", {"label": [0, 1], "features": [[0.0] * 10] * 2})
    f["empty"] = _parquet(d / "empty.parquet", {"label": pa.array([], pa.int64()),
                                                "features": pa.array([], pa.list_(pa.float32()))})
    nan = rng.standard_normal((40, 64)).astype(np.float32)
    nan[:, 0] = np.nan
    f["nan"] = _parquet(d / "nan.parquet", {"label": np.arange(40) % 4, "features": list(nan)})
    bad_img = d / "imgs" / "cat"
    bad_img.mkdir(parents=True)
    (bad_img / "broken.png").write_bytes(b"not a png at all")
    (d / "imgs" / "dog").mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "imgs" / "dog" / "ok.png")
    f["imgs"] = str(d / "imgs")
    three = build_model("cnn", num_classes=3, in_channels=1, image_size=8)
    f["three_classes"] = str(d / "three.pt")
    save_model(f["three_classes"], three, model_spec("cnn", {}, 3, 1, 8))
    f["garbage"] = str(d / "garbage.pt")
    Path(f["garbage"]).write_bytes(os.urandom(300))
    ten = build_model("cnn", num_classes=10, in_channels=1, image_size=8)
    good = d / "good.pt"
    save_model(good, ten, model_spec("cnn", {}, 10, 1, 8))
    f["truncated"] = str(d / "truncated.pt")
    Path(f["truncated"]).write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    f["good_teacher"] = str(good)
    (d / "badmods.py").write_text("def not_a_module(num_classes):\n    return 42\n")
    sys.path.insert(0, str(d))
    (d / "bad.yaml").write_text("distill: {alpha: [unclosed\n")
    f["bad_yaml"] = str(d / "bad.yaml")
    return f


CASES = [  # (id, args, words the one-line message must contain)
    ("unknown key", ["--set", "distill.alpah=0.5"], ["distill.alpah", "did you mean 'distill.alpha'"]),
    ("wrong type", ["--set", "distill.epochs=ten"], ["distill.epochs must be an integer"]),
    ("ratio out of range", ["--set", "prune.ratio=1.0"], ["prune.ratio must be in [0, 1)"]),
    ("temperature <= 0", ["--set", "distill.temperature=0"], ["distill.temperature must be > 0"]),
    ("alpha out of range", ["--set", "distill.alpha=1.5"], ["distill.alpha must be in [0, 1]"]),
    ("bad choice", ["--set", "prune.importance=l3"], ["prune.importance must be one of"]),
    ("bad yaml", ["@bad_yaml"], ["not valid YAML"]),
    ("missing config file", ["/nonexistent/cfg.yaml"], ["does not exist"]),
    ("class-count mismatch", ["--set", "teacher.checkpoint=@three_classes"], ["predicts 3 classes", "has 10"]),
    ("missing data root", ["--set", "data.source=imagefolder", "--set", "data.root=/nonexistent/imgs"],
     ["/nonexistent/imgs"]),
    ("missing parquet path", ["--set", "data.source=parquet", "--set", "data.path=/nonexistent/x.parquet"],
     ["/nonexistent/x.parquet"]),
    ("empty data set", ["--set", "data.source=parquet", "--set", "data.path=@empty", "--set", "data.shape=[1,8,8]"],
     ["empty"]),
    ("parquet without label", ["--set", "data.source=parquet", "--set", "data.path=@no_label",
                               "--set", "data.shape=[1,8,8]"], ["label"]),
    ("wrong feature length", ["--set", "data.source=parquet", "--set", "data.path=@short",
                              "--set", "data.shape=[1,8,8]"], ["10", "64"]),
    ("image does not decode", ["--set", "data.source=imagefolder", "--set", "data.root=@imgs"], ["broken.png"]),
    ("factory does not import", ["--set", "student.model=nope_pkg.mod:make"], ["nope_pkg"]),
    ("factory returns no module", ["--set", "student.model=badmods:not_a_module", "--set", "student.kwargs={}"], ["nn.Module"]),
    ("unknown model name", ["--set", "student.model=cnnn"], ["did you mean", "cnn"]),
    ("corrupt checkpoint", ["--set", "teacher.checkpoint=@garbage"], ["corrupt"]),
    ("truncated checkpoint", ["--set", "teacher.checkpoint=@truncated"], ["corrupt"]),
    ("missing checkpoint", ["--set", "teacher.checkpoint=/nonexistent/t.pt"], ["does not exist"]),
    ("hint without inprocess", ["--set", "distill.hint_student_layer=features.0",
                                "--set", "distill.hint_teacher_layer=features.0"], ["teacher_mode=inprocess"]),
    ("unreachable ray address", ["--address", "127.0.0.1:1"], ["cannot reach a Ray cluster", "127.0.0.1:1"]),
    ("views without augmentation", ["--set", "cache.views=3"], ["cache.views > 1 needs data.augment",
                                                                "set data.augment=crop or cache.views=1"]),
    ("unknown augmentation", ["--set", "data.augment=crop_flp"], ["data.augment must be one of",
                                                                  "did you mean 'crop_flip'"]),
]


def _resolve(args, files):
    """'@name' -> the fixture file's path; 'key=@name' -> 'key=<path>'."""
    out = []
    for a in args:
        if a.startswith("@"):
            a = files[a[1:]]
        elif "=@" in a:
            key, name = a.split("=@")
            a = f"{key}={files[name]}"
        out.append(a)
    return out


def _run_cli(capsys, argv):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("name,args,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2(name, args, words, files, capsys, tmp_path):
    out = tmp_path / "run"
    argv = ["run", "--out", str(out), *SMOKE_ARGS, *_resolve(args, files)]  # the case's own --set wins
    code, err = _run_cli(capsys, argv)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("raydistill: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists() or not any(out.iterdir()), "a rejected run wrote files"


def test_debug_flag_shows_the_traceback(capsys):
    code = cli.main(["--debug", "run", "--set", "distill.alpah=0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err


@pytest.fixture()
def good_run(tmp_path):
    """A folder holding a finished run's outputs for the default smoke config."""
    from raydistill import config

    out = tmp_path / "good"
    out.mkdir()
    cfg = config.load(None, SMOKE)
    (out / "config.yaml").write_text(cfg.to_yaml())
    (out / "report.json").write_text('{"models": {}}')
    return out


def test_run_folder_of_another_config_is_refused(good_run, capsys):
    before = {p.name: p.read_bytes() for p in good_run.iterdir()}
    code, err = _run_cli(capsys, ["run", "--out", str(good_run), *SMOKE_ARGS, "--set", "distill.alpha=0.9"])
    assert code == 2 and "another config" in err and "distill.alpha" in err
    assert {p.name: p.read_bytes() for p in good_run.iterdir()} == before


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
    assert code == 2 and "needs 64 CPUs" in err


@pytest.mark.ray
def test_cache_built_by_another_teacher_is_refused(ray_local, files, tmp_path, capsys):
    from raydistill.cache import build_cache
    from raydistill.data import fingerprint, load_splits

    splits = load_splits("digits", limit=SMOKE["data.limit"])
    other = build_model("cnn", num_classes=10, in_channels=1, image_size=8)
    uri = str(tmp_path / "cache")
    build_cache(uri, teacher_spec=model_spec("cnn", {}, 10, 1, 8), teacher_state=other.state_dict(),
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
    build_cache(uri, teacher_spec=spec, teacher_state=teacher.state_dict(), teacher_sha256=sha256_file(Path(files["good_teacher"])),
                splits=splits, data_fingerprint=fingerprint(splits), views=2, augment="crop", seed=cfg.seed)
    check_given_cache(cfg, fingerprint(splits), splits.shape[1], uses_cache=True)  # the matching cache is accepted
    with pytest.raises(CacheError, match="3 views|2 views"):
        check_given_cache(config.load(None, {**overrides, "cache.views": 3}), fingerprint(splits), splits.shape[1],
                          uses_cache=True)


def test_nan_in_data_is_refused_before_training(files, tmp_path, capsys):
    code, err = _run_cli(capsys, ["run", "--out", str(tmp_path / "r"), *SMOKE_ARGS, "--set", "data.source=parquet",
                                  "--set", f"data.path={files['nan']}", "--set", "data.shape=[1,8,8]"])
    assert code == 2 and "contain NaN or inf" in err and not (tmp_path / "r").exists()


@pytest.mark.ray
def test_nan_loss_names_the_step_and_cause(ray_local, tmp_path, capsys):
    # A learning rate of 1e30 makes the first AdamW step blow the weights up: the loss turns inf/NaN at step 1.
    # (No restarts: Ray Train would rerun the stage twice by default and fail the same way.)
    code, err = _run_cli(capsys, ["run", "--quiet", "--out", str(tmp_path / "r"), *SMOKE_ARGS, "--set", "teacher.lr=1e30",
                                  "--set", "scale.max_failures=0"])
    lines = [l for l in err.splitlines() if l.startswith("raydistill:")]
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert "at step" in lines[0] and "learning rate" in lines[0] and "Traceback" not in err


def test_disk_full_while_writing_keeps_old_outputs(tmp_path):
    """Real write failure: the file-size limit (RLIMIT_FSIZE) makes writes past 64 KiB fail with EFBIG."""
    out = tmp_path / "prepared"
    out.mkdir()
    sentinel = out / "keep.txt"
    sentinel.write_text("good output")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    # `data prepare digits` writes ~0.5 MB of Parquet: past the limit, so its atomic write fails for real.
    cmd = [sys.executable, "-m", "raydistill.cli", "data", "prepare", "digits", "--out", str(out / "digits")]
    res = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit)
    assert res.returncode == 2, res.stderr
    assert "no space left" in res.stderr and "Traceback" not in res.stderr
    assert sentinel.read_text() == "good output"  # existing outputs untouched
    leftovers = [p for p in out.rglob("*") if p.is_file() and p.name != "keep.txt"]
    assert not [p for p in leftovers if p.suffix == ".parquet" and not p.name.startswith(".")], leftovers
