"""Run-folder manifests: tamper, truncate and delete are detected; HMAC signing."""

import argparse
import json

import pytest

from raydistill.manifest import (
    MANIFEST_NAME,
    IntegrityError,
    add_verify_parser,
    cmd_verify,
    verify_file,
    verify_run,
    write_manifest,
)

CONFIG = {"data": {"source": "digits"}, "seed": 0}


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
    monkeypatch.delenv("RAYDISTILL_SIGNING_KEY", raising=False)


@pytest.fixture
def run(tmp_path):
    """A small run folder: checkpoints, a nested file, Ray's storage and a leftover temp file."""
    (tmp_path / "teacher.pt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "student_kd.pt").write_bytes(b"student weights" * 10)
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "student.pt2").write_bytes(b"program" * 20)
    (tmp_path / "ray_train" / "teacher-abc").mkdir(parents=True)
    (tmp_path / "ray_train" / "teacher-abc" / "checkpoint.pt").write_bytes(b"ray owns this")
    (tmp_path / ".teacher.pt.x1y2.tmp").write_bytes(b"half written")
    return tmp_path


def test_records_every_artifact_but_ray_and_temp_files(run):
    manifest = write_manifest(run, config=CONFIG)
    assert sorted(manifest["files"]) == ["config.yaml", "deploy/student.pt2", "student_kd.pt", "teacher.pt"]
    assert manifest["files"]["teacher.pt"]["bytes"] == 1024
    assert manifest["created_by"].startswith("raydistill ")
    assert len(manifest["config_sha256"]) == 64 and "hmac_sha256" not in manifest
    assert json.loads((run / MANIFEST_NAME).read_text()) == manifest
    assert not list(run.glob(f".{MANIFEST_NAME}.*.tmp"))


def test_untouched_run_is_clean(run):
    write_manifest(run, config=CONFIG)
    (run / "notes.txt").write_text("extra files are fine")
    (run / "ray_train" / "teacher-abc" / "checkpoint.pt").write_bytes(b"ray rewrote it")
    assert verify_run(run) == []
    assert verify_file(run / "teacher.pt") is True
    assert verify_file(run / "deploy" / "student.pt2") is True  # nearest manifest is the parent's
    assert verify_file(run / "notes.txt") is False  # not recorded: not checked


def test_flipped_byte_is_detected(run):
    write_manifest(run)
    data = bytearray((run / "teacher.pt").read_bytes())
    data[100] ^= 0xFF
    (run / "teacher.pt").write_bytes(bytes(data))
    (problem,) = verify_run(run)
    assert "teacher.pt was modified after the run (sha256 mismatch); rerun the stage or restore the file" in problem
    with pytest.raises(IntegrityError, match=r"teacher\.pt was modified after the run \(sha256 mismatch\)"):
        verify_file(run / "teacher.pt")
    assert verify_file(run / "student_kd.pt") is True


def test_truncated_and_deleted_files_are_detected(run):
    write_manifest(run)
    (run / "teacher.pt").write_bytes((run / "teacher.pt").read_bytes()[:500])
    (run / "deploy" / "student.pt2").unlink()
    problems = verify_run(run)
    assert len(problems) == 2
    assert any("teacher.pt is truncated (500 of 1024 bytes)" in p for p in problems)
    assert any("student.pt2 is missing" in p for p in problems)
    with pytest.raises(IntegrityError, match="truncated"):
        verify_file(run / "teacher.pt")
    with pytest.raises(IntegrityError, match="missing"):
        verify_file(run / "deploy" / "student.pt2")


def test_no_manifest_means_no_check(tmp_path):
    (tmp_path / "mine.pt").write_bytes(b"a user's own checkpoint")
    assert verify_file(tmp_path / "mine.pt") is False
    assert "has no manifest.json" in verify_run(tmp_path)[0]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"name": "some other tool"}))
    assert verify_file(tmp_path / "mine.pt") is False


def test_updating_one_artifact_keeps_other_entries(run):
    first = write_manifest(run, config=CONFIG)
    (run / "student_kd.pt").write_bytes(b"retrained")
    (run / "teacher.pt").write_bytes(b"tampered meanwhile")
    second = write_manifest(run, artifacts=["student_kd.pt"])
    assert second["files"]["student_kd.pt"]["bytes"] == len(b"retrained")
    assert second["files"]["teacher.pt"] == first["files"]["teacher.pt"]  # not blessed
    assert second["config_sha256"] == first["config_sha256"]
    (problem,) = verify_run(run)
    assert "teacher.pt" in problem
    with pytest.raises(ValueError, match="outside the run folder"):
        write_manifest(run, artifacts=[str(run.parent / "elsewhere.pt")])
    with pytest.raises(ValueError, match="does not exist"):
        write_manifest(run, artifacts=["nope.pt"])


def test_hmac_signature_detects_an_edited_manifest(run, monkeypatch):
    monkeypatch.setenv("RAYDISTILL_SIGNING_KEY", "s3cret")
    manifest = write_manifest(run, config=CONFIG)
    assert len(manifest["hmac_sha256"]) == 64
    assert verify_run(run) == []
    # Tamper with a file and "fix" its manifest entry: only the signature can tell.
    (run / "teacher.pt").write_bytes(b"evil weights")
    manifest["files"]["teacher.pt"] = {"sha256": __import__("hashlib").sha256(b"evil weights").hexdigest(),
                                       "bytes": len(b"evil weights")}
    (run / MANIFEST_NAME).write_text(json.dumps(manifest))
    (problem,) = verify_run(run)
    assert "hmac_sha256 mismatch" in problem
    with pytest.raises(IntegrityError, match="hmac_sha256 mismatch"):
        verify_file(run / "teacher.pt")
    monkeypatch.setenv("RAYDISTILL_SIGNING_KEY", "another key")
    write_manifest(run)
    monkeypatch.setenv("RAYDISTILL_SIGNING_KEY", "s3cret")
    assert "hmac_sha256 mismatch" in verify_run(run)[0]


def test_unsigned_manifest_is_refused_when_a_key_is_set(run, monkeypatch):
    write_manifest(run)
    monkeypatch.setenv("RAYDISTILL_SIGNING_KEY", "s3cret")
    (problem,) = verify_run(run)
    assert "is not signed" in problem


def test_cli_verify(run, capsys):
    parser = argparse.ArgumentParser()
    add_verify_parser(parser.add_subparsers())
    args = parser.parse_args(["verify", str(run)])
    write_manifest(run)
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == "OK: 4 files verified"
    (run / "student_kd.pt").write_bytes(b"x")
    assert cmd_verify(args) == 2
    assert "student_kd.pt is truncated" in capsys.readouterr().out
