"""A real Ray head of the tests' own (`ray start --head --block`, token auth, dashboard for `ray job submit`),
isolated from any other Ray on the machine: free ports, its own short --temp-dir and its own HOME (so the auth
token it generates is not the user's). Stopped by signalling its own process group and killing whatever still
names its temp dir -- never `ray stop`, which would stop every Ray on the machine. test_jobs.py and
test_shared_cluster.py start theirs with ``ray_head``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


@dataclass
class Head:
    gcs: str  # host:port for --address
    dashboard: str  # http://host:port for `ray job submit`
    env: dict  # client environment: the venv first on PATH, RAY_AUTH_MODE=token, the head's HOME (its token)
    log: Path
    token: str  # the head's auth token, for its dashboard's HTTP API
    tmp: Path  # TMPDIR of the head's processes (Ray workers, job drivers): what they leave in temporary files
    proc: subprocess.Popen  # `ray start --head --block`: it exits when any of the head's processes dies

    def died(self) -> str:
        """'' while the head runs; once it has stopped, a line saying so and the end of its log (for a test's
        failure message, so that a dead head is not mistaken for the command under test failing)."""
        if self.proc.poll() is None:
            return ""
        return f"\n-- the Ray head itself has stopped (ray start exited {self.proc.returncode}); the end of " \
               f"{self.log}:\n{self.log.read_text()[-2500:]}"


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports nothing listens on now (bound together, then released), drawn at random from 20000 up to
    the kernel's ephemeral range. Not from the ephemeral range itself (what ``bind(port 0)`` hands out), since a
    port released there can be taken before the head binds it: by any process's outgoing connection, and by another
    Ray's own port choices, which are random ports above an ephemeral one. It happened: a CI run's head lost its
    client-server port that way (``Address already in use``) and ``ray start --block`` stopped the whole head. Below
    20000 are Ray's worker ports (10002-19999 by default)."""
    low, high = 20000, _ephemeral_low() - 1
    sockets: list[socket.socket] = []
    try:
        # SystemRandom: no test's random.seed() makes two pytest workers' heads draw the same ports
        draws = random.SystemRandom().sample(range(low, high + 1), 64 * n) if high - low >= 1000 else []
        for candidate in draws:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                s.close()
                continue
            sockets.append(s)
            if len(sockets) == n:
                break
        while len(sockets) < n:  # no room below the ephemeral range on this machine: let the kernel choose
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def pids_naming(text: str) -> list[int]:
    """Processes whose command line contains ``text``, except this one."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _wait_until_up(url: str, token: str, client_port: int, proc: subprocess.Popen, log: Path,
                   timeout: float = 180) -> bool:
    """True once the head says it started, its dashboard answers and its client server listens (the last process
    to come up); False if `ray start` gave up (its raylet and client server have 30 s to register, which a machine
    under heavy load can miss)."""
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if "Ray runtime started" in log.read_text():
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        socket.create_connection(("127.0.0.1", client_port), timeout=2).close()
                        return True
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the Ray head at {url} did not come up in {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen, temp_dir: str, keep: bool = False) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for _ in range(20):
        leftovers = pids_naming(temp_dir)
        if not leftovers:
            break
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    if not keep:
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextmanager
def ray_head(log_dir: Path, num_cpus: int = 4):
    """Start the head, yield its ``Head``, stop it. Its log stays in ``log_dir/head.log``."""
    temp_dir = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    home, tmp = Path(temp_dir) / "home", Path(temp_dir) / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(home),
           "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=120)
    token = (home / ".ray" / "auth_token").read_text().strip()
    # RAY_ADDRESS for the head's processes (job drivers included): Ray's own helpers look the cluster up by
    # address=None, which is ambiguous while other Ray clusters run on this machine. No SIGTERM drain wait.
    head_env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "TMPDIR": str(tmp)}
    log = Path(log_dir) / "head.log"
    for attempt in range(3):
        gcs_port, dashboard_port, agent_port, client_port = free_ports(4)  # new ports each attempt
        gcs, dashboard = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
                 "--dashboard-port", str(dashboard_port), "--include-dashboard", "true",
                 "--dashboard-agent-listen-port", str(agent_port), "--ray-client-server-port", str(client_port),
                 "--num-cpus", str(num_cpus), "--temp-dir", temp_dir, "--disable-usage-stats"],
                env={**head_env, "RAY_ADDRESS": gcs}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            up = _wait_until_up(dashboard, token, client_port, proc, log)
        except BaseException:
            _stop(proc, temp_dir)
            raise
        if up:
            # `ray start --block` checks its processes once a second and, if one has died (a port lost between
            # the choice and the bind, say), stops the head: give it two checks before handing the head out
            time.sleep(2.5)
            up = proc.poll() is None
        if up:
            break
        shutil.copy(log, Path(log_dir) / f"head-attempt{attempt + 1}.log")  # why the attempt failed, kept
        _stop(proc, temp_dir, keep=True)
    else:
        _stop(proc, temp_dir)
        raise RuntimeError(f"`ray start --head` failed 3 times; the last time:\n{log.read_text()[-3000:]}")
    try:
        yield Head(gcs=gcs, dashboard=dashboard, env=env, log=log, token=token, tmp=tmp, proc=proc)
    finally:
        _stop(proc, temp_dir)
