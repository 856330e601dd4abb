from pathlib import Path

import pytest

from raydistill import config
from raydistill.config import ConfigError


def test_default_config_is_valid_and_round_trips(tmp_path):
    cfg = config.load()
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert config.load(path).to_dict() == cfg.to_dict()


def test_overrides_are_typed_and_applied():
    cfg = config.load(None, dict([config.parse_override("distill.alpha=0.25"),
                                  config.parse_override("prune.importance=taylor"),
                                  config.parse_override("student.kwargs={widths: [8, 16]}")]))
    assert cfg.distill.alpha == 0.25 and cfg.prune.importance == "taylor"
    assert cfg.student.kwargs == {"widths": [8, 16]}


def test_the_default_kwargs_stay_with_the_default_cnn(tmp_path):
    """The default teacher/student kwargs are the built-in cnn's sizes: naming another model without kwargs of its
    own gives it none (it would otherwise be handed `widths`, which it does not take); kwargs that are set stay."""
    from raydistill.checkpoints import build_from_spec, model_spec

    default = config.load()
    cfg = config.load(None, {"teacher.model": "mlp", "student.model": "mlp"})
    assert cfg.teacher.kwargs == {} and cfg.student.kwargs == {}
    assert config.load(None, {"teacher.model": "cnn"}).teacher.kwargs == default.teacher.kwargs == \
        {"widths": [64, 128], "hidden": 256}
    assert config.load(None, {"student.model": "mlp", "student.kwargs": {"hidden": [8]}}).student.kwargs == \
        {"hidden": [8]}
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("student:\n  model: mlp\n")  # the same from a YAML file; the teacher keeps the cnn's
    from_yaml = config.load(yaml_path)
    assert from_yaml.student.kwargs == {} and from_yaml.teacher.kwargs == default.teacher.kwargs
    model = build_from_spec(model_spec("mlp", from_yaml.student.kwargs, 4, (40,)))  # builds on a tabular shape
    assert model(__import__("torch").zeros(2, 40)).shape == (2, 4)
    # a resolved config written out and read back keeps what it resolved to (config.yaml of a run)
    yaml_path.write_text(cfg.to_yaml())
    assert config.load(yaml_path).to_dict() == cfg.to_dict()


def test_local_paths_are_made_absolute_against_the_current_directory(tmp_path, monkeypatch):
    """Relative paths in a config mean the command's current directory, which Tune trials and Ray workers do not
    share: the loaded config holds them absolute. URIs and zoo weight names stay as given."""
    monkeypatch.chdir(tmp_path)
    cfg = config.load(None, {"data.source": "parquet", "data.train": "d/train.parquet", "data.val": "d/val",
                             "data.test": "s3://bucket/test/", "teacher.checkpoint": "t/teacher.pt",
                             "teacher.ensemble": ["a.pt", "/abs/b.pt"], "cache.path": "cache",
                             "track.mlflow_uri": "sqlite:///mlflow.db"})
    assert cfg.data.train == str(tmp_path / "d/train.parquet") and cfg.data.val == str(tmp_path / "d/val")
    assert cfg.data.test == "s3://bucket/test/" and cfg.track.mlflow_uri == "sqlite:///mlflow.db"
    assert cfg.teacher.checkpoint == str(tmp_path / "t/teacher.pt")
    assert cfg.teacher.ensemble == [str(tmp_path / "a.pt"), "/abs/b.pt"] and cfg.cache.path == str(tmp_path / "cache")
    assert config.load(None, {"data.source": "imagefolder", "data.root": "~/imgs"}).data.root == \
        str(Path.home() / "imgs")
    assert config.load(None, {"teacher.pretrained": "w.pth"}).teacher.pretrained == str(tmp_path / "w.pth")
    assert config.load(None, {"teacher.pretrained": "IMAGENET1K_V1"}).teacher.pretrained == "IMAGENET1K_V1"
    # a run folder's config.yaml, read back from elsewhere, names the same files
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    monkeypatch.chdir(tmp_path / "..")
    assert config.load(tmp_path / "c.yaml").to_dict() == cfg.to_dict()


def test_int_accepted_for_float_but_not_bool():
    assert config.load(None, {"distill.temperature": 2}).distill.temperature == 2.0
    with pytest.raises(ConfigError, match="distill.temperature must be a number"):
        config.load(None, {"distill.temperature": True})


@pytest.mark.parametrize("key,value,match", [
    ("distill.alpah", 0.5, "did you mean 'distill.alpha'"),
    ("prune.ratoi", 0.5, "did you mean 'prune.ratio'"),
    ("distil", {}, "did you mean 'distill'"),
    ("prune.ratio", 1.0, r"prune.ratio must be in \[0, 1\)"),
    ("prune.ratio", -0.1, r"prune.ratio must be in \[0, 1\)"),
    ("distill.temperature", 0, "distill.temperature must be > 0"),
    ("report.latency_budget_s", -1, "report.latency_budget_s must be >= 0 seconds"),
    ("distill.alpha", 1.5, r"distill.alpha must be in \[0, 1\]"),
    ("distill.epochs", "ten", "distill.epochs must be an integer"),
    ("prune.importance", "l2", "prune.importance must be one of"),
    ("distill.teacher_mode", "liev", "did you mean 'live'"),
    ("data.source", "parquet", "neither data.path nor data.train is set"),
    ("data.augment", "crop_flp", "did you mean 'crop_flip'"),
    ("data.augment", "flip", "data.augment must be one of none, crop, crop_flip"),
    ("data.augment_pad", -1, "data.augment_pad must be >= 0"),
    ("cache.views", 0, "cache.views must be >= 1"),
    ("cache.views", 4, "cache.views > 1 needs data.augment.*set data.augment=crop or cache.views=1"),
    ("distill.loss", "dkdd", "distill.loss must be one of kd, dkd, dist, got 'dkdd'; did you mean 'dkd'"),
    ("distill.loss", "kl", "distill.loss must be one of kd, dkd, dist"),
    ("distill.dkd_alpha", -0.5, "distill.dkd_alpha must be >= 0"),
    ("distill.dkd_beta", float("nan"), "distill.dkd_beta must be >= 0, got nan"),
    ("distill.dist_beta", -1, "distill.dist_beta must be >= 0"),
    ("distill.dist_gamma", "nan", "distill.dist_gamma must be >= 0, got nan"),  # YAML `nan` is the string
    ("cache.topk_loss", "spares", "cache.topk_loss must be one of tail_filled, sparse.*did you mean 'sparse'"),
    ("data.image_size", "24x40", r"data.image_size must be an integer or a list \[a, b, ...\], got '24x40'"),
    ("data.image_size", [24], r"data.image_size must be a positive integer \(a square\) or \[height, width\]"),
    ("data.image_size", [24, "a"], "data.image_size must be an integer, got 'a'"),
])
def test_bad_values_name_the_key_and_the_fix(key, value, match):
    with pytest.raises(ConfigError, match=match):
        config.load(None, {key: value})


def test_augmented_views_config():
    cfg = config.load(None, {"data.augment": "crop_flip", "cache.views": 4, "data.augment_pad": 2})
    assert (cfg.data.augment, cfg.cache.views, cfg.data.augment_pad) == ("crop_flip", 4, 2)
    assert config.load(None, {"data.augment": "crop"}).cache.views == 1  # one view, drawn afresh: fine too


@pytest.mark.parametrize("key,values", [("cache.views", [1, 2]), ("data.augment", ["none", "crop"]), ("seed", [0, 1])])
def test_sweep_over_the_views_needs_a_live_teacher(key, values):
    """One logit cache serves every trial of a cache-mode sweep, so its views cannot be a search key."""
    base = {"data.augment": "crop", "tune.space": {"distill.alpha": {"choice": [0.0, 0.5]}, key: {"choice": values}}}
    with pytest.raises(ConfigError, match=f"tune.space searches {key}.*tune.teacher_mode=live"):
        config.load(None, base)
    assert config.load(None, {**base, "tune.teacher_mode": "live"}).tune.space[key] == {"choice": values}


def test_logit_losses_config():
    cfg = config.load(None, {"distill.loss": "dkd", "distill.logit_standardize": True, "distill.dkd_beta": 2})
    assert (cfg.distill.loss, cfg.distill.logit_standardize, cfg.distill.dkd_beta) == ("dkd", True, 2.0)
    assert config.load(None, {"cache.topk_loss": "sparse", "cache.k": 5}).cache.topk_loss == "sparse"
    space = {"distill.alpha": {"choice": [0.0, 0.5]}, "distill.loss": {"choice": ["kd", "dkd", "dist"]}}
    assert config.load(None, {"tune.space": space}).tune.space == space  # the losses are a search key


@pytest.mark.parametrize("overrides,match", [
    ({"distill.loss": "dist", "distill.logit_standardize": True},
     "logit_standardize is for the KL losses.*set distill.logit_standardize=false or distill.loss=kd or dkd"),
    ({"distill.logit_standardize": True, "distill.teacher_mode": "cache", "cache.k": 5},
     r"top-k cache \(cache.k=5\).*set cache.k=null"),
    ({"tune.space": {"distill.alpha": {"choice": [0.0, 0.5]}, "distill.loss": {"choice": ["kd", "dkdd"]}}},
     r"tune.space\['distill.loss'\] must be one of kd, dkd, dist, got 'dkdd'; did you mean 'dkd'"),
    ({"distill.logit_standardize": True,
      "tune.space": {"distill.alpha": {"choice": [0.0, 0.5]}, "distill.loss": {"grid": ["kd", "dist"]}}},
     "includes dist, which does not take distill.logit_standardize=true"),
])
def test_logit_loss_combinations_that_cannot_run_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config.load(None, overrides)


def test_hint_needs_inprocess_teacher():
    with pytest.raises(ConfigError, match="teacher_mode=inprocess"):
        config.load(None, {"distill.hint_student_layer": "features.0", "distill.hint_teacher_layer": "features.0"})


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("distill: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(p)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")


def test_yaml_never_executes_code(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("distill: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError):
        config.load(p)


def test_doc_table_lists_every_key():
    table = config.doc_table()
    for key in config.all_keys():
        assert f"`{key}`" in table


def test_digits_job_is_the_embedded_default():
    from pathlib import Path

    job = Path(__file__).resolve().parents[2] / "jobs" / "digits.yaml"
    assert config.load(job).to_dict() == config.load().to_dict()
