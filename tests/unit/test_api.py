"""The Python API without Ray: configs from every kind of input, overrides, load_student, typed errors."""

import json

import pytest
import torch

import raydistill
from raydistill.checkpoints import build_from_spec, model_spec, save_model
from raydistill.errors import CheckpointError, ConfigError, RunFolderError


def test_import_loads_neither_torch_nor_ray():
    import subprocess
    import sys

    code = "import sys, raydistill; print('torch' in sys.modules, 'ray' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("argv", [["--help"], ["run", "--set", "nosuch.key=1"], ["run", "missing.yaml"],
                                  ["tune", "--set", "nosuch.key=1"], ["verify", "missing-run"]])
def test_the_cli_answers_help_and_a_mistyped_config_before_importing_torch(argv, tmp_path):
    """The parser and the config check come before torch's import (~2 s on 2 cores): `--help`, an unknown key or a
    missing file answer at once. (A value the config checks against a model or augmentation may still load it.)"""
    import subprocess
    import sys

    code = ("import sys\nfrom raydistill.cli import main\ntry:\n    rc = main(sys.argv[1:])\n"
            "except SystemExit as e:\n    rc = e.code\nprint(rc, 'torch' in sys.modules, file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path)
    rc, torch_loaded = res.stderr.split()[-2:]
    assert (rc, torch_loaded) == ("0" if argv == ["--help"] else "2", "False"), res.stderr


def test_config_from_path_dict_config_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("distill:\n  epochs: 3\n")
    cfg = raydistill.load_config(path, distill={"alpha": 0.7}, seed=5, **{"prune.ratio": 0.25})
    assert (cfg.distill.epochs, cfg.distill.alpha, cfg.seed, cfg.prune.ratio) == (3, 0.7, 5, 0.25)
    assert raydistill.load_config({"distill": {"epochs": 4}}).distill.epochs == 4
    again = raydistill.load_config(cfg, distill={"epochs": 6})
    assert (again.distill.epochs, again.distill.alpha) == (6, 0.7) and cfg.distill.epochs == 3
    assert raydistill.load_config(None).distill.epochs == raydistill.load_config({}).distill.epochs


@pytest.mark.parametrize("call, match", [
    (lambda: raydistill.load_config(None, **{"distill.alhpa": 0.5}), "did you mean 'distill.alpha'"),
    (lambda: raydistill.load_config(None, distill=0.5), "a section takes a dict"),
    (lambda: raydistill.load_config(42), "a config is a YAML path"),
    (lambda: raydistill.load_config("/no/such.yaml"), "does not exist"),
    (lambda: raydistill.run(None, "/tmp/never-written", distill={"alpha": 2}), "distill.alpha must be in"),
    (lambda: raydistill.tune(None, "/tmp/never-written", trials=0), "tune.num_trials must be >= 1"),
])
def test_bad_input_raises_the_clis_user_errors(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def _run_folder(tmp_path, names):
    spec = model_spec("cnn", {"widths": [4], "hidden": 8}, 10, (1, 8, 8))
    torch.manual_seed(0)
    models = {name: build_from_spec(spec) for name in names}
    for name, model in models.items():
        save_model(tmp_path / f"{name}.pt", model, spec)
    return models


def test_load_student_picks_the_final_student(tmp_path):
    models = _run_folder(tmp_path, ["student_baseline", "student_kd", "student_pruned"])
    x = torch.randn(3, 1, 8, 8)
    loaded = raydistill.load_student(tmp_path)
    assert not loaded.training
    assert torch.equal(loaded(x), models["student_pruned"].eval()(x))
    (tmp_path / "report.json").write_text(json.dumps({"deploy": {"model": "student_kd"}}))
    assert torch.equal(raydistill.load_student(tmp_path)(x), models["student_kd"].eval()(x))
    assert torch.equal(raydistill.load_student(tmp_path, "student_baseline")(x), models["student_baseline"].eval()(x))


def test_load_student_errors(tmp_path):
    with pytest.raises(RunFolderError, match="does not exist"):
        raydistill.load_student(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="holds no student checkpoint"):
        raydistill.load_student(tmp_path)
    _run_folder(tmp_path, ["student_kd"])
    with pytest.raises(CheckpointError, match="has no teacher.pt; pass one of: student_kd"):
        raydistill.load_student(tmp_path, "teacher")
