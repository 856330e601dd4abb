"""Bad input for the distillation losses, several teachers, pruning kinds and the low-rank stage: one line
naming the problem and the fix, exit status 2, nothing written (through the real CLI, before any Ray start)."""

import json

import pytest
import torch
from smoke import SMOKE

from raydistill import cli, config
from raydistill.checkpoints import model_spec, save_model
from raydistill.errors import ConfigError
from raydistill.models import build_model

SMOKE_ARGS = [a for k, v in SMOKE.items() for a in ("--set", f"{k}={json.dumps(v)}")]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    d = tmp_path_factory.mktemp("teachers")
    paths = {}
    for name, classes in (("ten", 10), ("three", 3)):
        torch.manual_seed(0)
        paths[name] = str(d / f"{name}.pt")
        save_model(paths[name], build_model("cnn", classes, 1, 8), model_spec("cnn", {}, classes, (1, 8, 8)))
    return paths


CASES = [  # (id, --set overrides, words the one-line message must contain)
    ("unknown loss", ["distill.loss=dkdd"], ["distill.loss must be one of", "did you mean 'dkd'"]),
    ("unknown loss far off", ["distill.loss=hinton"], ["distill.loss must be one of kd, dkd, dist"]),
    ("negative loss weight", ["distill.dkd_beta=-1"], ["distill.dkd_beta must be >= 0", "-1.0"]),
    ("NaN loss weight", ["distill.dist_gamma=.nan"], ["distill.dist_gamma must be >= 0", "nan"]),
    ("NaN alpha", ["distill.alpha=.nan"], ["distill.alpha must be in [0, 1]"]),
    ("teachers with other class counts", ["teacher.ensemble=[@three]"],
     ["different numbers of classes", "teacher 10", "teacher.ensemble[0]", "3", "data has 10"]),
    ("weights for other teachers", ["teacher.ensemble=[@ten]", "teacher.weights=[1, 2, 3]"],
     ["teacher.weights has 3 entries for 2 teachers"]),
    ("negative teacher weight", ["teacher.ensemble=[@ten]", "teacher.weights=[1, -2]"],
     ["teacher.weights must be >= 0"]),
    ("NaN teacher weight", ["teacher.ensemble=[@ten]", "teacher.weights=[1, .nan]"], ["teacher.weights must be >= 0"]),
    ("rank larger than the layer", ["lowrank.rank=100"],
     ["lowrank.rank", "rank 100 is larger than layer '9'", "rank at most 64", "lowrank.skip"]),
    ("rank and energy", ["lowrank.rank=4", "lowrank.energy=0.9"], ["set one of them"]),
    ("energy out of range", ["lowrank.energy=1.5"], ["lowrank.energy must be in (0, 1]"]),
    ("low-rank skip of no layer", ["lowrank.rank=4", "lowrank.skip=[fc]"], ["lowrank.skip names 'fc'"]),
    ("unknown prune kind", ["prune.kind=unstructred"], ["prune.kind must be one of", "did you mean 'unstructured'"]),
    ("unstructured with taylor", ["prune.kind=unstructured", "prune.importance=taylor"],
     ["prune.kind=unstructured", "prune.importance=l1"]),
]


@pytest.mark.parametrize("name,sets,words", CASES, ids=[c[0] for c in CASES])
def test_one_line_exit_2(name, sets, words, teachers, capsys, tmp_path):
    out = tmp_path / "run"
    sets = [s.replace("@ten", teachers["ten"]).replace("@three", teachers["three"]) for s in sets]
    code = cli.main(["run", "--out", str(out), *SMOKE_ARGS, *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("raydistill: error: ") and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists() or not any(out.iterdir()), "a rejected run wrote files"


def test_good_settings_pass_validation():
    cfg = config.load(None, {"prune.kind": "unstructured", "lowrank.energy": 0.9, "teacher.weights": [2.0]})
    assert cfg.prune.kind == "unstructured" and cfg.lowrank.energy == 0.9
    with pytest.raises(ConfigError, match="positive sum"):
        config.load(None, {"teacher.weights": [0.0]})
