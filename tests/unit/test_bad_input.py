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
from smoke import SMOKE

from raydistill import cli
from raydistill.checkpoints import model_spec, save_model
from raydistill.models import build_model

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
    save_model(f["three_classes"], three, model_spec("cnn", {}, 3, (1, 8, 8)))
    f["garbage"] = str(d / "garbage.pt")
    Path(f["garbage"]).write_bytes(os.urandom(300))
    ten = build_model("cnn", num_classes=10, in_channels=1, image_size=8)
    good = d / "good.pt"
    save_model(good, ten, model_spec("cnn", {}, 10, (1, 8, 8)))
    f["truncated"] = str(d / "truncated.pt")
    Path(f["truncated"]).write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    f["good_teacher"] = str(good)
    from raydistill.checkpoints import build_from_spec

    for name, spec in (("cifar_shaped", model_spec("cnn", {}, 10, (3, 32, 32))),  # teachers of other samples
                       ("vector", model_spec("mlp", {}, 10, (40,)))):
        f[name] = str(d / f"{name}.pt")
        save_model(f[name], build_from_spec(spec).eval(), spec)
    f["vector_ensemble"] = json.dumps([f["vector"]])
    (d / "badmods.py").write_text("def not_a_module(num_classes):\n    return 42\n")
    sys.path.insert(0, str(d))
    (d / "bad.yaml").write_text("distill: {alpha: [unclosed\n")
    f["bad_yaml"] = str(d / "bad.yaml")
    sig = rng.standard_normal((40, 40)).astype(np.float32)  # a (2, 20) signal set and broken split files
    f["sig_train"] = _parquet(d / "sig_train.parquet", {"id": np.arange(40), "label": np.arange(40) % 4,
                                                        "features": list(sig)})
    f["sig_overlap"] = _parquet(d / "sig_overlap.parquet", {"id": np.arange(30, 50), "label": np.arange(20) % 4,
                                                            "features": list(sig[:20])})
    f["sig_labels"] = _parquet(d / "sig_labels.parquet", {"id": np.arange(100, 120), "label": np.arange(20) % 7,
                                                          "features": list(sig[:20])})
    f["sig_schema"] = _parquet(d / "sig_schema.parquet", {"id": np.arange(100, 120), "label": np.arange(20) % 4,
                                                          "features": list(sig[:20].astype(np.float64))})
    f["sig_short"] = _parquet(d / "sig_short.parquet", {"id": np.arange(100, 120), "label": np.arange(20) % 4,
                                                        "features": list(sig[:20, :30])})
    f["sig_null_label"] = _parquet(d / "sig_null_label.parquet", {
        "id": np.arange(40), "label": pa.array([i % 4 for i in range(39)] + [None], pa.int64()),
        "features": list(sig)})
    from raydistill.data import Arrays, write_parquet

    write_parquet(Arrays(sig.reshape(40, 2, 20), np.arange(40) % 4, np.arange(40), 4, (2, 20)), d / "written.parquet")
    f["sig_written"] = str(d / "written.parquet")  # its schema metadata records the shape (2, 20)
    write_parquet(Arrays(sig[:20].reshape(20, 4, 10), np.arange(20) % 4, np.arange(100, 120), 4, (4, 10)),
                  d / "sig_4x10.parquet")
    f["sig_4x10"] = str(d / "sig_4x10.parquet")  # rows of the signals' length, recorded as another shape
    return f


SIGNAL = ["--set", "data.source=parquet", "--set", "data.train=@sig_train", "--set", "data.shape=[2,20]",
          "--set", "student.model=mlp", "--set", "student.kwargs={}", "--set", "teacher.model=mlp",
          "--set", "teacher.kwargs={}"]


CASES = [  # (id, args, words the one-line message must contain)
    ("unknown key", ["--set", "distill.alpah=0.5"], ["distill.alpah", "did you mean 'distill.alpha'"]),
    ("wrong type", ["--set", "distill.epochs=ten"], ["distill.epochs must be an integer"]),
    ("ratio out of range", ["--set", "prune.ratio=1.0"], ["prune.ratio must be in [0, 1)"]),
    ("temperature <= 0", ["--set", "distill.temperature=0"], ["distill.temperature must be > 0"]),
    ("alpha out of range", ["--set", "distill.alpha=1.5"], ["distill.alpha must be in [0, 1]"]),
    ("bad choice", ["--set", "prune.importance=l3"], ["prune.importance must be one of"]),
    ("negative seed", ["--set", "seed=-1"], ["seed must be in [0, 2**32), got -1"]),
    ("negative data seed", ["--set", "data.seed=-3"], ["data.seed must be in [0, 2**32), got -3"]),
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
    ("factory returns no module", ["--set", "student.model=badmods:not_a_module",
                                  "--set", "student.kwargs={}"], ["nn.Module"]),
    ("unknown model name", ["--set", "student.model=cnnn"], ["did you mean", "cnn"]),
    ("corrupt checkpoint", ["--set", "teacher.checkpoint=@garbage"], ["corrupt"]),
    ("teacher trained on another sample shape", ["--set", "teacher.checkpoint=@cifar_shaped"],
     ["cifar_shaped.pt was trained on samples of shape (3, 32, 32) and fails on this data's (1, 8, 8)",
      "use a teacher trained on this data"]),
    ("ensemble member trained on another sample shape", ["--set", "teacher.ensemble=@vector_ensemble"],
     ["vector.pt was trained on samples of shape (40,) and fails on this data's (1, 8, 8)"]),
    ("truncated checkpoint", ["--set", "teacher.checkpoint=@truncated"], ["corrupt"]),
    ("missing checkpoint", ["--set", "teacher.checkpoint=/nonexistent/t.pt"], ["does not exist"]),
    ("hint without inprocess", ["--set", "distill.hint_student_layer=features.0",
                                "--set", "distill.hint_teacher_layer=features.0"], ["teacher_mode=inprocess"]),
    ("unreachable ray address", ["--address", "127.0.0.1:1"], ["cannot reach a Ray cluster", "127.0.0.1:1"]),
    ("views without augmentation", ["--set", "cache.views=3"], ["cache.views > 1 needs data.augment",
                                                                "set data.augment=crop or cache.views=1"]),
    ("unknown augmentation", ["--set", "data.augment=crop_flp"], ["data.augment must be one of",
                                                                  "did you mean 'crop_flip'"]),
    ("declared splits overlap", [*SIGNAL, "--set", "data.test=@sig_overlap"],
     ["sample ids are in both the train and the test split", "fix the split files"]),
    ("row length differs from data.shape", [*SIGNAL, "--set", "data.test=@sig_short"],
     ["sig_short.parquet has length 30 per row but data.shape [2, 20] needs 40"]),
    ("data.shape differs from the shape the files were written with (streamed)",
     [*SIGNAL, "--set", "data.train=null", "--set", "data.path=@sig_written", "--set", "data.shape=[4,10]"],
     ["data.shape [4, 10] differs from the shape [2, 20]", "written.parquet", "drop data.shape or set it to [2, 20]"]),
    ("data.shape differs from the shape the files were written with (in memory)",
     [*SIGNAL, "--set", "data.train=null", "--set", "data.path=@sig_written", "--set", "data.shape=[4,10]",
      "--set", "data.stream=false"], ["data.shape [4, 10] differs from the shape [2, 20]"]),
    ("a declared split written with another sample shape (streamed)", [*SIGNAL, "--set", "data.test=@sig_4x10"],
     ["declared test split", "sig_4x10.parquet was written with sample shape [4, 10]", "training data's is [2, 20]"]),
    ("a declared split written with another sample shape (in memory)",
     [*SIGNAL, "--set", "data.test=@sig_4x10", "--set", "data.stream=false"],
     ["sig_4x10.parquet was written with sample shape [4, 10] but the training data's is [2, 20]"]),
    ("labels outside 0..K-1 in a declared split", [*SIGNAL, "--set", "data.test=@sig_labels"],
     ["declared test split has label 6", "classes 0..3"]),
    ("split file with another schema", [*SIGNAL, "--set", "data.val=@sig_schema"],
     ["sig_schema.parquet has a different schema", "'features'"]),
    ("augmentation on a non-image shape", [*SIGNAL, "--set", "data.augment=crop"],
     ["data.augment=crop", "shape (2, 20)", "set data.augment: none"]),
    ("image model on a signal", [*SIGNAL, "--set", "student.model=cnn"], ["takes images (C, H, W)", "'mlp'"]),
    ("classwise shards of streamed data", [*SIGNAL, "--set", "data.shard=classwise", "--set", "scale.num_workers=2"],
     ["data.shard=classwise", "streamed", "set data.stream=false", "or data.shard=random"]),
    ("a missing label (streamed)", [*SIGNAL, "--set", "data.train=@sig_null_label"],
     ["labels in column 'label' must be integers 0..K-1, found 1 missing (null); drop those rows or label them"]),
    ("a missing label (in memory)", [*SIGNAL, "--set", "data.train=@sig_null_label", "--set", "data.stream=false"],
     ["label column 'label' has missing values; drop those rows"]),
    ("image column of feature lists (streamed)", [*SIGNAL, "--set", "data.image_column=features"],
     ["data.image_column 'features'", "sig_train.parquet holds list<", "not encoded image bytes"]),
    ("image column of numbers (in memory)", [*SIGNAL, "--set", "data.image_column=label", "--set", "data.stream=false"],
     ["data.image_column 'label'", "holds int64, not encoded image bytes", "or null to read data.feature_column"]),
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
    lines = [line for line in err.splitlines() if line.strip()]
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


@pytest.mark.parametrize("command", ["run", "tune", "cache-logits", "data prepare"])
@pytest.mark.parametrize("where", ["under a file", "a file"])
def test_an_output_folder_that_cannot_be_made_is_refused_before_any_work(command, where, tmp_path, capsys):
    """--out naming a file, or a folder under one: one line naming it, exit 2, before data or Ray (it was an
    OSError traceback from the folder's mkdir after the data had loaded); the file is untouched."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a user's file")
    out = blocker / "run" if where == "under a file" else blocker
    args = ["data", "prepare", "digits"] if command == "data prepare" else [command, *SMOKE_ARGS]
    code, err = _run_cli(capsys, [*args, "--out", str(out)])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    said = f"{blocker} is a file" if where == "under a file" or command != "data prepare" else \
        f"{blocker} already exists and is not an empty folder"  # prepare's own words for a taken --out
    assert lines[0].startswith("raydistill: error: ") and said in lines[0] and "--out" in lines[0], lines[0]
    assert blocker.read_text() == "a user's file" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("command", ["run", "tune", "cache-logits"])
def test_a_cache_path_that_cannot_be_a_folder_is_refused_before_any_work(command, tmp_path, capsys):
    """cache.path under a file: one line naming it, exit 2, nothing written (it was a NotADirectoryError
    traceback from reading cache.json there, after the teacher had trained)."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a user's file")
    sets = ["--set", "distill.teacher_mode=cache", "--set", f"cache.path={blocker / 'cache'}"]
    code, err = _run_cli(capsys, [command, *SMOKE_ARGS, *sets, "--out", str(tmp_path / "out")])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("raydistill: error: cache.path ") and f"{blocker} is a file" in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("flag,value,words", [("--max-macs", "-5", "tune.max_macs (--max-macs) must be >= 1"),
                                               ("--max-latency-ms", "0", "tune.max_latency_ms (--max-latency-ms) "
                                                                         "must be > 0")])
def test_a_sweep_constraint_that_no_trial_can_meet_is_refused_before_the_sweep(flag, value, words, tmp_path,
                                                                                capsys):
    """A bound no model can meet was accepted, and the whole sweep ran before "no completed trial met the
    constraints"; now it is one line, exit 2, nothing written."""
    code, err = _run_cli(capsys, ["tune", *SMOKE_ARGS, flag, value, "--out", str(tmp_path / "sweep")])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "sweep").exists()


def test_a_trial_larger_than_the_machine_is_refused_before_the_sweep(tmp_path, capsys):
    """tune.cpus_per_trial above what the private Ray has: Tune kept the trial PENDING forever with no line (seen:
    64 on this 2-core machine); now one line, exit 2, before the teacher trains (a private Ray's CPUs are known)."""
    code, err = _run_cli(capsys, ["tune", *SMOKE_ARGS, "--set", "tune.cpus_per_trial=64", "--out",
                                  str(tmp_path / "sweep")])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("raydistill: error: tune.cpus_per_trial=64 needs 64 CPUs for one trial but the Ray "
                               "cluster has "), lines[0]
    assert "lower tune.cpus_per_trial or add nodes" in lines[0] and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("command,sets,words", [  # (a Train worker: in local mode this process labels the cache)
    ("cache-logits", ["scale.num_workers=1", "cache.num_actors=100000"],
     "cache.num_actors=100000 teacher replicas x 0.5 CPUs (scale.teacher_cpus) need 50000 CPUs to build the logit "
     "cache"),
    ("run", ["scale.num_workers=1", "distill.teacher_mode=cache", "cache.num_actors=100000"],
     "need 50000 CPUs to build the logit cache"),
    ("run", ["scale.teacher_cpus=100000"], "scale.num_workers=0 x scale.cpus_per_worker=0.5 + "
                                           "scale.teacher_cpus=100000 for the teacher actor need 100000 CPUs at once"),
])
def test_a_teacher_pool_or_actor_larger_than_the_machine_is_refused_before_ray_starts(command, sets, words,
                                                                                        tmp_path, capsys):
    """cache.num_actors teacher replicas that cannot all be placed made Ray Data wait forever with no line (seen:
    64 on this 2-core machine, killed after minutes); a teacher actor larger than the machine was refused only
    after Ray had started, in words that named only the Train workers. A private Ray's CPUs are known before it
    starts (cluster.local_ray_cpus): one line, exit 2, nothing started or written."""
    argv = [command, *SMOKE_ARGS, *[a for s in sets for a in ("--set", s)], "--out", str(tmp_path / "run")]
    code, err = _run_cli(capsys, argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in err, err
    assert "lower" in lines[0] and "or add nodes" in lines[0] and not (tmp_path / "run").exists()


AUTO_WITH_NO_CLUSTER = """
import functools
import sys
import ray._private.services as services
from raydistill import cli

# Ray's "auto" joins the cluster named by RAY_TMPDIR/ray/ray_current_cluster (empty here) or any GCS process it
# finds on the machine: the other tests' Rays are hidden from this one, so the machine looks like a laptop with none
services.find_gcs_addresses = functools.cache(lambda: [])  # (ray.init clears its cache)
sys.exit(cli.main(sys.argv[1:]))
"""


def test_address_auto_with_no_cluster_running_is_the_users_error(tmp_path):
    """`--address auto` (Ray's "the cluster `ray start` left on this machine") with none running: one line, exit
    2 (it was Ray's ConnectionError traceback, reported as a bug)."""
    argv = ["run", *SMOKE_ARGS, "--address", "auto", "--out", str(tmp_path / "run")]
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path), "RAY_ADDRESS": ""}
    res = subprocess.run([sys.executable, "-c", AUTO_WITH_NO_CLUSTER, *argv], capture_output=True, text=True,
                         env=env, timeout=120)
    errors = [line for line in res.stderr.splitlines() if line.startswith("raydistill:")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert errors == ["raydistill: error: no running Ray cluster on this machine for address 'auto'; start one "
                      "with `ray start --head`, or drop --address / RAY_ADDRESS to run on a private local Ray"]


def test_a_folder_the_system_refuses_to_make_is_the_users_error():
    """What ``os.access`` cannot foresee (here /proc, where even root cannot make a folder) fails the mkdir
    itself: raised as the given user error naming the folder, not as an OSError."""
    from raydistill.errors import RunFolderError
    from raydistill.locks import make_folder

    if not Path("/proc/self").exists():
        pytest.skip("no /proc on this system")
    with pytest.raises(RunFolderError, match=r"cannot create the folder /proc/raydistill-test/run \(.+\); pass"):
        make_folder(Path("/proc/raydistill-test/run"), RunFolderError, "pass a folder you can write")


def test_nan_in_data_is_refused_before_training(files, tmp_path, capsys):
    code, err = _run_cli(capsys, ["run", "--out", str(tmp_path / "r"), *SMOKE_ARGS, "--set", "data.source=parquet",
                                  "--set", f"data.path={files['nan']}", "--set", "data.shape=[1,8,8]"])
    assert code == 2 and "contain NaN or inf" in err and not (tmp_path / "r").exists()


def test_disk_full_while_writing_keeps_old_outputs(tmp_path):
    """Real write failure: the file-size limit (RLIMIT_FSIZE) makes writes past 8 KiB fail with EFBIG."""
    out = tmp_path / "prepared"
    out.mkdir()
    sentinel = out / "keep.txt"
    sentinel.write_text("good output")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024, 8 * 1024))

    # `data prepare digits` writes its train split first, ~60 KB of Parquet (dictionary-encoded: digits' pixels take
    # few values): past the limit, so its atomic write fails for real.
    cmd = [sys.executable, "-m", "raydistill.cli", "data", "prepare", "digits", "--out", str(out / "digits")]
    res = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit)
    assert res.returncode == 2, res.stderr
    assert "no space left" in res.stderr and "Traceback" not in res.stderr
    assert sentinel.read_text() == "good output"  # existing outputs untouched
    leftovers = [p for p in out.rglob("*") if p.is_file() and p.name != "keep.txt"]
    assert not [p for p in leftovers if p.suffix == ".parquet" and not p.name.startswith(".")], leftovers


# ---- a bug is not bad input ------------------------------------------------------------------------------
def test_a_bug_inside_a_stage_shows_its_traceback_and_exits_1(monkeypatch, capsys, tmp_path):
    """A plain ValueError (here from inside the data stage, as numpy or torch would raise it) is a bug, not the
    user's input: exit 1 with the traceback and a hint to report it, never the one-line exit-2 message."""
    from raydistill import pipeline

    def broken_stage(cfg):
        raise ValueError("operands could not be broadcast together with shapes (3,) (4,)")

    monkeypatch.setattr(pipeline, "load_data", broken_stage)
    out = tmp_path / "r"
    code, err = _run_cli(capsys, ["run", "--out", str(out), *SMOKE_ARGS])
    assert code == 1, err
    assert "Traceback" in err and "could not be broadcast" in err and "this is a bug" in err
    assert "raydistill: error:" not in err
    assert not out.exists()


def test_a_user_error_raised_in_a_train_worker_comes_back_by_type():
    """Ray Train wraps a worker's exception in WorkerGroupError (and Ray tasks in RayTaskError): the NaN-loss
    error is found in that chain by its type, not by searching the message."""
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from raydistill.errors import NonFiniteLossError, first_user_error

    nan = NonFiniteLossError("loss became nan at step 3 (phase train); lower the lr")
    wrapped = RayTaskError("train_fn", "Traceback ...", nan).as_instanceof_cause()
    error = WorkerGroupError("Training failed", {0: wrapped, 1: RuntimeError("peer failed")})
    found = first_user_error(error)
    assert type(found) is NonFiniteLossError and str(found).startswith("loss became nan at step 3")
    assert first_user_error(WorkerGroupError("Training failed", {0: ValueError("a bug")})) is None
