"""Parquet data in an object store (issue 13: a split may be "a file, folder, glob or pyarrow URI"): digits prepared
into an S3 bucket with `raydistill data prepare`, then a run streamed from the bucket.

The bucket is served by moto's S3 server (`python -m moto.server`, a real HTTP server speaking the S3 API) in a
process of its own; pyarrow's own S3 client reads and writes it, from the driver, from Ray Data's read tasks and from
the training loop. Its endpoint and credentials travel in the URI (pyarrow's ``?endpoint_override=...&scheme=http``
options, ``key:secret@``), so the session's Ray workers, started before the server, need no environment of it."""

import socket
import subprocess
import sys
import time

import pytest
from shared_head import free_ports

from raydistill import config
from raydistill.errors import DataError
from raydistill.pipeline import run
from raydistill.prepare import prepare
from raydistill.stream import plan_stream

pytestmark = pytest.mark.ray

TINY = {"teacher.epochs": 1, "distill.epochs": 1, "prune.ratio": 0.0, "quantize.scheme": "none",
        "teacher.kwargs": {"widths": [16, 32], "hidden": 64}, "distill.teacher_mode": "cache"}


@pytest.fixture(scope="module")
def bucket():
    """A URI maker for a bucket on a local S3 server: ``bucket("digits")`` -> s3://key:secret@data/digits?..."""
    (port,) = free_ports(1)
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "the S3 server did not start"
                time.sleep(0.2)
        options = f"scheme=http&endpoint_override=127.0.0.1:{port}&region=us-east-1&allow_bucket_creation=true"
        yield lambda key: f"s3://key:secret@data/{key}?{options}"
    finally:
        server.kill()
        server.wait()


@pytest.fixture(scope="module")
def digits_in_bucket(bucket):
    uri = bucket("digits")
    prepare("digits", uri, rows_per_file=300)
    return uri


def test_a_run_streams_from_an_s3_bucket(ray_local, digits_in_bucket, bucket, tmp_path):
    """Every reader of a streamed run (the plan's column reads and checks, write_aside, Ray Data's read tasks for
    the logit cache and the training loop, the test split's reads) goes to the bucket, not to a local path of the
    same name (pyarrow lists a URI's files without their scheme). The logit cache is written to the bucket too."""
    cfg = config.load(None, {**TINY, "data.source": "parquet", "data.path": digits_in_bucket,
                             "cache.path": bucket("cache")})
    report = run(cfg, tmp_path / "run", quiet=True)
    data = report["data"]
    assert data["streamed"] is True
    assert (data["train"], data["val"], data["test"]) == (1258, 180, 359)  # the split prepare wrote, kept
    assert data["splits"]["test"]["from"].startswith("declared: rows with split == 'test' in s3://")
    assert report["logit_cache"]["rows"] == 1258  # the teacher pass streamed every training row from the bucket
    assert report["logit_cache"]["uri"] == bucket("cache").replace("key:secret@", "key:***@")
    # the URI's secret stays out of what the run records for people and tools; config.yaml, the rerun's input,
    # keeps the URI as given
    assert "key:secret@" not in (tmp_path / "run" / "report.json").read_text()
    assert data["splits"]["test"]["from"].startswith("declared: rows with split == 'test' in s3://key:***@data/")
    assert "key:secret@" in (tmp_path / "run" / "config.yaml").read_text()
    for name in ("teacher", "student_baseline", "student_kd"):
        assert report["models"][name]["accuracy"] > 0.3, name


def test_a_glob_in_a_uri_with_options_and_a_missing_prefix(digits_in_bucket, bucket):
    """In a URI, "?" starts pyarrow's options, so a glob there is * or [...]; a prefix with nothing under it is a
    one-line DataError."""
    glob = digits_in_bucket.replace("/digits?", "/digits/part-*.parquet?")
    whole, globbed = (plan_stream(config.load(None, {"data.source": "parquet", "data.path": p}).data)
                      for p in (digits_in_bucket, glob))
    assert globbed.train.files == whole.train.files and len(whole.train.files) == 5  # 1,258 train rows / 300
    assert (globbed.train.rows, globbed.test.rows) == (whole.train.rows, whole.test.rows) == (1258, 359)
    with pytest.raises(DataError) as missing:
        plan_stream(config.load(None, {"data.source": "parquet", "data.path": bucket("nothing/here")}).data)
    assert "\n" not in str(missing.value) and "s3://" in str(missing.value)
