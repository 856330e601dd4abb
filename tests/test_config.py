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
])
def test_bad_values_name_the_key_and_the_fix(key, value, match):
    with pytest.raises(ConfigError, match=match):
        config.load(None, {key: value})


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

    job = Path(__file__).resolve().parents[1] / "jobs" / "digits.yaml"
    assert config.load(job).to_dict() == config.load().to_dict()
