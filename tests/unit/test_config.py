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
    ("distill.alpha", 1.5, r"distill.alpha must be in \[0, 1\]"),
    ("distill.epochs", "ten", "distill.epochs must be an integer"),
    ("prune.importance", "l2", "prune.importance must be one of"),
    ("distill.teacher_mode", "liev", "did you mean 'live'"),
    ("data.source", "parquet", "data.path is not set"),
    ("data.augment", "crop_flp", "did you mean 'crop_flip'"),
    ("data.augment", "flip", "data.augment must be one of none, crop, crop_flip"),
    ("data.augment_pad", -1, "data.augment_pad must be >= 0"),
    ("cache.views", 0, "cache.views must be >= 1"),
    ("cache.views", 4, "cache.views > 1 needs data.augment.*set data.augment=crop or cache.views=1"),
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
