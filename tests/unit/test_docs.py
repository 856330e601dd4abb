"""Docs that are generated must stay current."""

from pathlib import Path

from raydistill import config

ROOT = Path(__file__).resolve().parents[2]


def test_config_reference_is_current():
    text = (ROOT / "docs" / "config.md").read_text()
    assert config.doc_table() in text, "docs/config.md is stale: regenerate it with `raydistill config --doc`"


def test_readme_starts_with_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash")[1:3]]
    assert blocks[0].endswith("raydistill run") and blocks[1].endswith("pytest")
    assert blocks[1] in (ROOT / ".ci" / "run").read_text()
