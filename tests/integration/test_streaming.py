"""Parquet data streamed through Ray Data into the training loop (issue 13): every teacher mode on streamed
batches, the prepared split kept, evaluation read batch by batch, and a process whose memory does not grow with
the data set."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill import config
from raydistill.pipeline import run
from raydistill.prepare import prepare

pytestmark = pytest.mark.ray

TINY = {"teacher.epochs": 1, "distill.epochs": 1, "prune.epochs": 1, "prune.finetune_epochs": 1,
        "teacher.kwargs": {"widths": [16, 32], "hidden": 64}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "digits"
    prepare("digits", str(out), rows_per_file=300)
    return str(out)


@pytest.fixture(scope="module")
def cached_run(ray_local, shards, tmp_path_factory):
    """A streamed run with the logit cache (built by a teacher pass over the streamed rows)."""
    out = tmp_path_factory.mktemp("cached")
    cfg = config.load(None, {**TINY, "data.source": "parquet", "data.path": shards,
                             "distill.teacher_mode": "cache"})
    return cfg, out, run(cfg, out, quiet=True)


def test_streamed_run_with_the_cache_keeps_the_prepared_split(cached_run):
    cfg, out, report = cached_run
    data = report["data"]
    assert data["streamed"] is True
    assert (data["train"], data["val"], data["test"]) == (1258, 180, 359)  # digits' own split, kept by prepare
    assert data["splits"]["test"]["from"].startswith("declared: rows with split == 'test'")
    assert report["logit_cache"]["rows"] == 1258
    for name in ("teacher", "student_baseline", "student_kd", "student_pruned"):
        assert report["models"][name]["accuracy"] > 0.3, name  # 10 classes: every model learned from the stream


@pytest.mark.parametrize("mode", ["live", "inprocess"])
def test_streamed_kd_with_a_teacher_that_labels_each_batch(mode, cached_run, shards, tmp_path):
    _, first, _ = cached_run
    cfg = config.load(None, {**TINY, "data.source": "parquet", "data.path": shards, "distill.teacher_mode": mode,
                             "teacher.checkpoint": str(first / "teacher.pt"), "prune.ratio": 0.0})
    report = run(cfg, tmp_path / "run", quiet=True)
    assert report["models"]["student_kd"]["accuracy"] > 0.3
    if mode == "live":
        assert report["teacher_server"]["samples"] >= 1258  # the actor labelled every streamed training row


PEAK = textwrap.dedent("""
    import json, sys, threading, time
    peak = {}
    def sample():  # private (anonymous) and shared (object store) resident memory of this process, in MiB
        while True:
            with open("/proc/self/status") as f:
                for line in f:
                    key = line.split(":")[0]
                    if key in ("VmRSS", "RssAnon", "RssShmem"):
                        peak[key] = max(peak.get(key, 0), int(line.split()[1]) / 1024)
            time.sleep(0.05)
    threading.Thread(target=sample, daemon=True).start()
    from raydistill import config
    from raydistill.pipeline import run
    report = run(config.load(None, json.loads(sys.argv[1])), sys.argv[2], address=sys.argv[3], quiet=True)
    time.sleep(0.2)
    print(json.dumps({**peak, "streamed": report["data"]["streamed"]}))
""")


def _table(path, rows, seed, rows_per_file=500):
    """``rows`` samples of 3x32x32 float32 features (12 KiB each) in 4 classes, as list<float> Parquet files."""
    rng = np.random.default_rng(seed)
    y = np.arange(rows) % 4
    x = rng.standard_normal((rows, 3 * 32 * 32), dtype=np.float32)
    x += y[:, None]  # in place: float32 (``x + y`` would be float64, twice the bytes to write and stream)
    for part, start in enumerate(range(0, rows, rows_per_file)):  # files of one size: a read is one file at most
        block = x[start:start + rows_per_file]
        offsets = np.arange(len(block) + 1, dtype=np.int32) * block.shape[1]
        features = pa.ListArray.from_arrays(pa.array(offsets), pa.array(block.ravel()))  # no per-row Python list
        pq.write_table(pa.table({"id": np.arange(start, start + len(block)), "label": y[start:start + len(block)],
                                 "features": features}), path / f"part-{part:03d}.parquet")


# 24x the rows: the larger run's extra data (270 MiB) is above the private growth seen from the reading pipeline's
# fill and the allocator alone, while the in-memory path would grow by twice the data. That growth stops with the
# data but not with the machine's load: from 1,000 to 16,000 rows it was +90 to +167 MB alone (2026-12-04/05) and
# +186 MB in one full suite (2026-12-05, over the 176 MB that 16,000 rows gave as the bound then); at 32,000 rows only
# +17 MB more than at 16,000, alone; at 24,000 rows +102 MB with two busy loops on the 2 cores beside it. (Those
# rows were float64 by mistake, twice the bytes; as float32, +65 MB alone where float64 gave +131, 2026-12-05.)
SMALL, LARGE = 1_000, 24_000


def test_streamed_run_memory_does_not_grow_with_the_data(ray_local, tmp_path):
    """The local-mode training loop runs in the command's own process. With 24x the rows (12 KiB each: 270 MiB more
    data, which the in-memory path holds at least twice, as numpy splits and as torch shards) its private memory
    must grow by less than the extra data. Its total RSS also counts object-store pages it mapped while reading
    (RssShmem), which grow with the bytes streamed through and are Ray's shared memory, not held data. Both runs
    join the session's Ray (``address``): what is measured is the command's process, and a private Ray each would
    only add two Ray start-ups (~10 CPU-s each on 2 cores) to the suite."""
    from raydistill.checkpoints import build_from_spec, model_spec, save_model

    # the teacher is given (an untrained MLP: what is measured is the data's path, not what KD learns) and labels
    # each batch in process: the runs are the baseline and KD stages, each one epoch over the streamed rows
    spec = model_spec("mlp", {"hidden": [32]}, 4, (3, 32, 32))
    teacher = tmp_path / "teacher.pt"
    save_model(teacher, build_from_spec(spec).eval(), spec)
    address = ray_local.get_runtime_context().gcs_address
    procs = {}
    for rows in (SMALL, LARGE):  # the two runs at once: each measures its own process (half the test's wall time)
        folder = tmp_path / f"d{rows}"
        folder.mkdir()
        _table(folder, rows, seed=rows)
        overrides = {"data.source": "parquet", "data.path": str(folder), "data.shape": [3, 32, 32],
                     "teacher.checkpoint": str(teacher), "student.model": "mlp", "student.kwargs": {"hidden": [16]},
                     "distill.epochs": 1, "prune.ratio": 0.0, "quantize.scheme": "none",
                     "distill.teacher_mode": "inprocess", "data.stream_buffer_mb": 16, "data.shuffle_buffer": 512,
                     "scale.num_workers": 0}  # local mode, as on a laptop (a run that joins a cluster would use 2)
        cmd = [sys.executable, "-c", PEAK, json.dumps(overrides), str(tmp_path / f"run{rows}"), address]
        procs[rows] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {}
    for rows, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err[-3000:]
        peaks[rows] = json.loads(out.strip().splitlines()[-1])
        assert peaks[rows]["streamed"] is True
    extra_data_mb = (LARGE - SMALL) * 3 * 32 * 32 * 4 / 2**20
    print(f"private growth {peaks[LARGE]['RssAnon'] - peaks[SMALL]['RssAnon']:+.0f} MB (bound {extra_data_mb:.0f})")
    assert peaks[LARGE]["RssAnon"] - peaks[SMALL]["RssAnon"] < extra_data_mb, (peaks, extra_data_mb)


def test_streamed_run_killed_mid_kd_resumes_with_the_stream_at_that_epoch(cached_run, shards, tmp_path):
    """SIGKILL the command (Ray Train local mode, the default on a laptop: the training loop is the command's own
    process) during KD on streamed data; the same command resumes KD from its last epoch checkpoint, the stream
    restarted at that epoch, at most one epoch redone, finished stages not redone."""
    _, first, _ = cached_run
    # the teacher labels each batch in this process (what is tested is the stream's restart, not the teacher's
    # actor: each of the two commands would start one). 20 KD epochs: after the first, an epoch reads the local
    # copy in ~0.09 s, and with 6 the run once finished all of them between the test's poll that saw the second
    # and its kill (a loaded machine, 2026-12-05); 18 left take ~1.6 s and cost the suite ~2 CPU-s more.
    epochs = 20
    sets = {**TINY, "data.source": "parquet", "data.path": shards, "teacher.checkpoint": str(first / "teacher.pt"),
            "distill.epochs": epochs, "prune.ratio": 0.0, "quantize.scheme": "none",
            "distill.teacher_mode": "inprocess"}
    cmd = [sys.executable, "-m", "raydistill.cli", "run", "--out", str(tmp_path / "run")]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    journal = tmp_path / "run" / "journal.jsonl"

    def kd():
        lines = journal.read_text().splitlines() if journal.exists() else []
        return [e for e in map(json.loads, filter(None, lines)) if e["stage"] == "student_kd"]

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while len(kd()) < 2:
            assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before two KD epochs"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and the Ray it started, mid-stage
        proc.wait(timeout=60)
    done_before = {e["epoch"] for e in kd()}
    assert kd()[-1]["pid"] == proc.pid  # local mode: the loop ran in the command's own process
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "stage student_baseline: up to date, skipped" in res.stdout
    assert "streaming_executor" not in res.stdout + res.stderr  # Ray Data's per-epoch INFO lines stay hidden
    done = [e["epoch"] for e in kd()]
    assert sorted(set(done)) == list(range(epochs))
    resumed = [e for e in kd() if e["pid"] != proc.pid]
    assert resumed, f"the run finished KD (epochs {sorted(done_before)}) before the kill landed"
    assert min(e["epoch"] for e in resumed) >= max(done_before) - 1 and len(done) - len(set(done)) <= 1
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["data"]["streamed"] is True and report["config"]["scale"]["num_workers"] == 0
    # each stage's first epoch in a process streams (the baseline's; KD's first after the kill), the later ones
    # read the worker's local copy of it (data.local_copy_mb: digits' 1,258 rows fit)
    assert report["data"]["epochs_read_from"]["stream"] == 2, report["data"]
    assert report["data"]["epochs_read_from"]["local copy"] >= 5, report["data"]


def _epoch_ids(train, epochs):
    return [np.concatenate([ids.numpy() for _, _, ids in train.batches(e, 32, 0)]) for e in epochs]


def test_the_stream_reader_runs_ahead_through_the_epochs_without_changing_them(ray_local, tmp_path):
    """StreamedTrain's reader thread reads the next announced epoch while the loop is still on this one: the
    batches are the same as when every epoch is read on its own, a failing row is the loop's DataError, and
    close() stops a reader that is waiting on a full queue."""
    from raydistill.errors import DataError
    from raydistill.stream import _bucket, plan_stream, train_dataset
    from raydistill.worker import StreamedTrain

    folder = tmp_path / "rows"
    folder.mkdir()
    _table(folder, 600, seed=0, rows_per_file=200)
    data = plan_stream(config.load(None, {"data.source": "parquet", "data.path": str(folder),
                                          "data.shape": [3, 32, 32]}).data)

    def open_train():
        return StreamedTrain(train_dataset(data, seed=0), data, world=1, shuffle_buffer=64)

    alone = open_train()
    each_on_its_own = _epoch_ids(alone, [0, 1, 2])  # nothing announced: each epoch is read when asked for
    ahead = open_train()
    ahead.expect([(e, 32, 0) for e in range(3)])
    read_ahead = _epoch_ids(ahead, [0, 1, 2])
    assert all(np.array_equal(a, b) for a, b in zip(each_on_its_own, read_ahead))
    assert len(read_ahead[0]) == data.train.rows and not np.array_equal(read_ahead[0], read_ahead[1])
    assert ahead._thread is None or not ahead._thread.is_alive()  # done after the last announced epoch
    # whole blocks from Ray Data through the shuffle buffer (64 rows) in batches of 32: every batch full but the
    # epoch's last, as many as the rows need
    sizes = [len(y) for _, y, _ in open_train().batches(0, 32, 0)]
    assert sizes[:-1] == [32] * (len(sizes) - 1) and 0 < sizes[-1] <= 32 and sum(sizes) == data.train.rows

    stopped = open_train()
    stopped.expect([(e, 32, 0) for e in range(50)])
    next(stopped.batches(0, 32, 0))  # the reader now fills its queue and waits
    stopped.close()
    assert stopped._thread is None

    # a file whose last row has the wrong length (the plan checks only a file's first rows), with an id that
    # the carving leaves in the training split
    lo = data.train.carve[0]
    stray = next(i for i in range(10_000, 20_000) if _bucket(np.array([i]), data.train.seed)[0] >= lo)
    rows = [np.zeros(3 * 32 * 32, np.float32)] * 100 + [np.zeros(7, np.float32)]
    pq.write_table(pa.table({"id": list(range(20_000, 20_100)) + [stray], "label": [0] * 101, "features": rows}),
                   folder / "part-009.parquet")
    data = plan_stream(config.load(None, {"data.source": "parquet", "data.path": str(folder),
                                          "data.shape": [3, 32, 32]}).data)
    broken = StreamedTrain(train_dataset(data, seed=0, shuffle_files=False), data, world=1, shuffle_buffer=64)
    with pytest.raises(DataError, match=r"of the streamed training rows has length 7, 3072 per row but data.shape "
                                        r"\[3, 32, 32\] needs 3072"):
        _epoch_ids(broken, [0])


def test_later_epochs_read_the_workers_local_copy_not_the_stream(ray_local, tmp_path, monkeypatch):
    """With data.local_copy_mb, the first epoch streams through Ray Data as before and is copied to local disk;
    every later epoch is read from that copy: Ray Data is not asked again, each epoch holds every training row
    once with its own sample, in a seeded full permutation; close() gives back the copy's descriptor. With 0
    every epoch streams, and so they do when the copy's write fails."""
    from raydistill.stream import iter_split, plan_stream, train_dataset
    from raydistill.worker import StreamedTrain

    folder = tmp_path / "rows"
    folder.mkdir()
    _table(folder, 600, seed=0, rows_per_file=200)
    data = plan_stream(config.load(None, {"data.source": "parquet", "data.path": str(folder),
                                          "data.shape": [3, 32, 32]}).data)
    samples = {}
    for x, _, ids in iter_split(data, "train"):
        samples.update(zip(ids.tolist(), x))

    class Counted:  # the worker's Ray Data shard, counting the epochs read from it
        def __init__(self, shard):
            self.shard, self.reads = shard, 0

        def iter_batches(self, **kwargs):
            self.reads += 1
            return self.shard.iter_batches(**kwargs)

    def epochs(local_copy_mb, n=4):
        shard = Counted(train_dataset(data, seed=0))
        train = StreamedTrain(shard, data, world=1, shuffle_buffer=64, local_copy_mb=local_copy_mb)
        train.expect([(e, 32, 0) for e in range(n)])
        got = []
        for e in range(n):
            batches = list(train.batches(e, 32, 0))
            for x, _, ids in batches:
                assert all(np.array_equal(row, samples[i]) for row, i in zip(x.numpy(), ids.tolist()))
            got.append(np.concatenate([ids.numpy() for _, _, ids in batches]))
        fds = len(os.listdir("/proc/self/fd"))
        copied = train.copy is not None
        train.close()
        return got, shard.reads, copied, fds - len(os.listdir("/proc/self/fd"))

    streamed, reads, copied, _ = epochs(0)
    assert reads == 4 and not copied
    local, reads, copied, freed = epochs(64)
    assert reads == 1 and copied and freed == 1  # epochs 1-3 from the copy; close() closed its file
    assert np.array_equal(local[0], streamed[0])  # the first epoch is the stream's, as without a copy
    for ids in local:
        assert sorted(ids) == sorted(samples)
    assert len({tuple(ids) for ids in local}) == 4  # a new order every epoch
    assert all(np.array_equal(a, b) for a, b in zip(epochs(64)[0], local))  # seeded: the same run, the same epochs
    # a shard larger than local_copy_mb streams every epoch (600 rows of 12 KiB: ~5 MiB)
    assert epochs(4, n=2)[1:3] == (2, False)
    # no later epoch announced (a one-epoch stage, one resumed at its last epoch): nothing is copied to disk
    assert epochs(64, n=1)[1:3] == (1, False)

    # the disk is full: the copy's first write fails (ENOSPC at raydistill.stream's os.write, the call LocalCopy
    # writes with), the copy is dropped and every epoch streams, the same batches as without a copy; no later
    # epoch tries to write one again
    import errno
    import types

    from raydistill import stream

    writes = []

    def full_disk(fd, data):
        writes.append(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(stream, "os", types.SimpleNamespace(**{**vars(os), "write": full_disk}))
    full, reads, copied, _ = epochs(64)
    assert reads == 4 and not copied and len(writes) == 1, (reads, copied, writes)
    assert all(np.array_equal(a, b) for a, b in zip(full, streamed))


def _png_rows(ids) -> list[dict]:
    """Rows of random 7 x 11 RGB PNGs: id, label (id % 3), png (bytes)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in ids:
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (7, 11, 3), dtype=np.uint8)).save(out, format="PNG")
        rows.append({"id": i, "label": i % 3, "png": out.getvalue()})
    return rows


def test_streamed_images_are_decoded_by_ray_data_into_the_same_samples(ray_local, tmp_path):
    """Encoded images on the training stream are decoded in Ray Data's read tasks (uint8 pixels) and turned into
    floats by the reader: every training sample equals the one the in-process pyarrow read decodes (the path of
    validation, test and the statistics), carved rows filtered out the same way."""
    from raydistill.stream import PIXELS_COLUMN, iter_split, plan_stream, train_dataset
    from raydistill.worker import StreamedTrain

    rows = _png_rows(range(150))
    (tmp_path / "imgs").mkdir()
    for part in range(2):
        pq.write_table(pa.Table.from_pylist(rows[part * 75:(part + 1) * 75]), tmp_path / "imgs" / f"{part}.parquet")
    data = plan_stream(config.load(None, {"data.source": "parquet", "data.path": str(tmp_path / "imgs"),
                                          "data.image_column": "png", "data.image_size": [6, 10]}).data)
    ds = train_dataset(data, seed=0)
    assert PIXELS_COLUMN in ds.schema().names  # decoded before the workers
    streamed = {}
    for x, _, ids in StreamedTrain(ds, data, world=1, shuffle_buffer=16).batches(0, 16, 0):
        streamed.update(zip(ids.tolist(), x.numpy()))
    in_process = {i: x for xs, _, ids in iter_split(data, "train") for i, x in zip(ids.tolist(), xs)}
    assert sorted(streamed) == sorted(in_process) and len(streamed) == data.train.rows < 150  # val/test carved out
    for i, x in in_process.items():
        np.testing.assert_array_equal(streamed[i], x)


def test_prepared_8bit_pixels_reach_the_worker_as_the_samples_of_the_image_folder(ray_local, tmp_path):
    """An image folder prepared as 8-bit pixels (bytes in Parquet): the worker's stream shuffles them as uint8 and
    standardizes each batch as it leaves, giving every training sample exactly as the in-memory loader and the
    image folder itself give it."""
    from PIL import Image

    from raydistill.data import load_splits
    from raydistill.prepare import prepare
    from raydistill.stream import plan_stream, train_dataset
    from raydistill.worker import StreamedTrain

    rng = np.random.default_rng(2)
    for label in range(3):
        (tmp_path / "imgs" / f"c{label}").mkdir(parents=True)
        for i in range(40):
            Image.fromarray(rng.integers(0, 256, (7, 11, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / f"c{label}" / f"{i}.png")
    assert prepare("imagefolder", str(tmp_path / "px"), root=str(tmp_path / "imgs"), image_size=[6, 10],
                   rows_per_file=32)["features"] == "8-bit pixels"
    data = plan_stream(config.load(None, {"data.source": "parquet", "data.path": str(tmp_path / "px")}).data)
    streamed = {}
    for x, _, ids in StreamedTrain(train_dataset(data, seed=0), data, world=1, shuffle_buffer=16).batches(0, 16, 0):
        assert str(x.dtype) == "torch.float32"
        streamed.update(zip(ids.tolist(), x.numpy()))
    source = load_splits("imagefolder", root=str(tmp_path / "imgs"), image_size=[6, 10]).train
    assert sorted(streamed) == sorted(source.ids.tolist())
    for i, x in zip(source.ids.tolist(), source.x):
        np.testing.assert_array_equal(streamed[i], x)


def test_an_image_that_does_not_decode_on_the_stream_is_one_line(ray_local, tmp_path, monkeypatch, capfd):
    """An image deep in the training stream (beyond the rows the plan decodes) that does not decode: raised in a
    Ray Data read task, it ends the run with one line naming its sample id, exit 2, and no traceback from Ray
    Data's logs (before: Ray Data's UserCodeException, a bug's traceback, exit 1)."""
    from raydistill import cli, stream

    monkeypatch.setattr(stream, "STATS_ROWS", 16)  # the plan decodes only the first 16 training rows
    rows = _png_rows(range(200))
    rows[150]["png"] = b"not a png"
    for name, part in (("train", rows[:180]), ("val", rows[180:190]), ("test", rows[190:])):
        pq.write_table(pa.Table.from_pylist(part), tmp_path / f"{name}.parquet")
    sets = {"data.source": "parquet", "data.train": str(tmp_path / "train.parquet"),
            "data.val": str(tmp_path / "val.parquet"), "data.test": str(tmp_path / "test.parquet"),
            "data.image_column": "png", "data.image_size": [7, 11], "teacher.epochs": 1, "distill.epochs": 1,
            "prune.ratio": 0.0, "scale.max_failures": 0}
    code = cli.main(["run", "--out", str(tmp_path / "run"),
                     *[a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]])
    err = capfd.readouterr().err
    assert code == 2, err[-3000:]
    assert err.strip().splitlines()[-1] == ("raydistill: error: cannot decode image with id 150 in the streamed "
                                            "training rows (UnidentifiedImageError: cannot identify image file); "
                                            "remove or replace that file")
    assert "Traceback" not in err and "Exception occurred" not in err, err[-3000:]
