"""File locks (raydistill/locks.py) without Ray: one live command per run folder, refused in one line naming
the other; a lock whose process died is taken over; one builder at a time for a logit cache. The other
holder is a real second process (a helper that takes the lock and waits), killed for real (SIGKILL)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from smoke import SMOKE

from raydistill import cli
from raydistill.errors import RunFolderError
from raydistill.locks import RUN_LOCK, FileLock, lock_run_folder, release_run_folders

SMOKE_ARGS = [a for k, v in SMOKE.items() for a in ("--set", f"{k}={json.dumps(v)}")]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path/run``: (folder, its Popen)."""
    out = tmp_path / "run"
    out.mkdir()
    code = ("import sys, pathlib; from raydistill.locks import lock_run_folder; "
            "lock_run_folder(pathlib.Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    yield out, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    release_run_folders()


def test_a_held_run_folder_is_refused_naming_its_owner_then_taken_over_when_it_dies(holder):
    out, proc = holder
    with pytest.raises(RunFolderError) as e:
        lock_run_folder(out)
    msg = str(e.value)
    assert f"pid {proc.pid} on {socket.gethostname()}" in msg and "pass another --out" in msg and "\n" not in msg

    proc.send_signal(signal.SIGKILL)  # it dies holding the lock: its file stays, the kernel drops the lock
    proc.wait()
    assert json.loads((out / RUN_LOCK).read_text())["pid"] == proc.pid
    stale = lock_run_folder(out)
    assert stale["pid"] == proc.pid  # taken over, and the caller is told whose it was
    assert json.loads((out / RUN_LOCK).read_text())["pid"] == os.getpid()
    assert lock_run_folder(out) is None  # re-entrant within a process
    release_run_folders()
    assert not (out / RUN_LOCK).exists()  # released: the folder is as the run left it


def test_a_stale_lock_file_naming_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / RUN_LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                 "command": "raydistill run", "since": "earlier"}))
    try:
        assert lock_run_folder(tmp_path)["pid"] == dead.pid
    finally:
        release_run_folders()


@pytest.mark.parametrize("command", ["run", "tune"])
def test_cli_into_a_folder_another_command_uses_exits_2_with_one_line(holder, capsys, command):
    import raydistill.core.pruning  # noqa: F401  (the command's imports are not what is timed)
    import raydistill.pipeline  # noqa: F401
    import raydistill.sweep  # noqa: F401

    out, proc = holder
    t0 = time.perf_counter()
    code = cli.main([command, "--out", str(out), *SMOKE_ARGS])
    took = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"raydistill: error: run folder {out.resolve()} is in use by another raydistill command")
    assert f"pid {proc.pid}" in err
    if command == "run":  # (tune's time includes importing Ray Tune)
        assert took < 5, took  # refused at once: before the data, the models or Ray
    assert sorted(p.name for p in out.iterdir()) == [RUN_LOCK]  # nothing written; the owner's lock untouched
    assert json.loads((out / RUN_LOCK).read_text())["pid"] == proc.pid


def test_a_waiting_builder_gets_the_lock_when_the_holder_releases_it(tmp_path):
    from raydistill.cache import build_lock

    first = FileLock(tmp_path / "cache" / ".build.lock")
    (tmp_path / "cache").mkdir()
    assert first.try_acquire()
    waited, inside = [], threading.Event()

    def second():
        with build_lock(str(tmp_path / "cache"), on_wait=waited.append):
            inside.set()
            time.sleep(0.2)

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.5)
    assert not inside.is_set() and len(waited) == 1 and f"pid {os.getpid()}" in waited[0]
    first.release()  # removes the file; the waiter must lock the file now at the path, not the removed one
    assert inside.wait(5)
    third = FileLock(tmp_path / "cache" / ".build.lock")
    assert not third.try_acquire()  # the second one holds it
    thread.join(5)
    assert third.try_acquire()
    third.release()
