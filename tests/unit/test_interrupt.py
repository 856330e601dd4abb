"""Ctrl-C while a stage's Train run is blocked in a helper thread (raydistill/trainer.py: ``off_main_thread``,
``in_background``), without Ray: a real SIGINT to a real process whose stage threads never return (as Train's
``ray.get`` on its controller sometimes never does once the CLI has disconnected from Ray). The process must
exit 130 at once instead of waiting for those threads at exit."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from smoke import ctrl_c_default

REPO = Path(__file__).resolve().parents[2]

CODE = """
import sys, threading
from raydistill.trainer import in_background, off_main_thread

never = threading.Event()
baseline = in_background(never.wait)  # the label-only student's Train run beside the teacher's

def teacher_run():  # says "waiting" from its own thread: the main thread is then inside off_main_thread's try
    print("waiting", flush=True)
    never.wait()

try:
    off_main_thread(teacher_run)  # the teacher's Train run, waited for on the main thread
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


def test_ctrl_c_does_not_wait_for_stage_threads_that_never_return():
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", CODE], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, preexec_fn=ctrl_c_default)
    try:
        assert proc.stdout.readline().strip() == "waiting"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and out.strip() == "interrupted", (proc.returncode, out)


def test_in_background_hands_over_the_result_or_the_exception():
    import pytest

    from raydistill.trainer import in_background

    assert in_background(lambda a, b: a + b, 2, 3).result(timeout=30) == 5
    with pytest.raises(ZeroDivisionError):
        in_background(lambda: 1 / 0).result(timeout=30)
