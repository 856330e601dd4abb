"""Where the test suite's CPU goes: every process on the machine, by kind, while the suite runs.

    python benchmarks/suite_cpu.py                 # runs `.venv/bin/pytest` (pyproject's addopts: 2 workers)
    python benchmarks/suite_cpu.py -- -k streaming # extra pytest arguments after --

Issue 14 asks for the whole suite in 8 minutes on a 2-core machine, and the suite is CPU-bound there (the machine
95-100 % busy through pytest), so what matters is CPU-seconds and whose. A sampler thread reads /proc/<pid>/stat
(utime + stime) and /proc/<pid>/cmdline of every process every 0.5 s while pytest runs, and attributes each
process's CPU to a kind by its last command line (Ray sets its worker processes' titles: ``ray::IDLE``,
``ray::TrainController``, ``ray::RayTrainWorker``, ...). A process that exits between two samples loses at most its
last 0.5 s. Processes that were running before the suite count only their CPU since. Run it on an otherwise idle
machine: everything on the machine is counted. Prints the table and writes JSON (benchmarks/results/suite_cpu.json),
with the host's speed at that hour (``host_reference_s``: a fresh process importing torch and Ray Train) measured
before and after the suite.

Written here, not with psutil: psutil is not a dependency, and these two /proc fields are all it needs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")

# first match wins: Ray retitles its worker processes with the actor or task they run (the last title seen is used)
KINDS = [
    ("Ray Train workers", r"RayTrainWorker|_shutdown_torch|ray::execute"),
    ("Ray Train controllers and helper actors",
     r"TrainController|PlacementGroupCleaner|SynchronizationActor|DatasetManager|AutoscalingCoordinator|"
     r"PreemptionWatcher"),
    ("teacher actors", r"ray::TeacherServer"),
    ("Tune trials and controller", r"ray::_Inner|ImplicitFunc|Trainable|TuneController"),
    ("Ray services (GCS, raylet, dashboard, agents, monitors)",
     r"gcs_server|raylet|dashboard|DashboardAgent|RuntimeEnvAgent|log_monitor|monitor\.py|ray_client_server|"
     r"forkserver|ray::JobSupervisor|ActorLocationTracker"),
    ("pooled Ray workers (Ray Data tasks, idle workers, other tasks)", r"^ray::"),
    ("raydistill commands started by tests", r"raydistill\.cli|bin/raydistill"),
    ("`ray` CLI (ray start, ray job ...)", r"bin/ray |ray\.scripts"),
    ("pytest and its workers", r"pytest|xdist|exec\(eval\(sys\.stdin"),
    ("other python -c children of tests", r"python[0-9.]* .*-c "),
]


def _cpu(pid: str) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: str) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ").strip()[:300] or None
    except OSError:
        return None


class Sampler(threading.Thread):
    def __init__(self, interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.interval_s, self.stop = interval_s, threading.Event()
        self.base = {pid: c for pid in os.listdir("/proc") if pid.isdigit() and (c := _cpu(pid)) is not None}
        self.last: dict[str, float] = {}
        self.names: dict[str, str] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit() and (c := _cpu(pid)) is not None:
                    self.last[pid] = c
                    if (name := _cmdline(pid)) is not None:
                        self.names[pid] = name
            self.stop.wait(self.interval_s)

    def by_kind(self) -> tuple[dict[str, float], dict[str, float]]:
        kinds, other = collections.Counter(), collections.Counter()
        for pid, c in self.last.items():
            used = c - self.base.get(pid, 0.0)
            if used <= 0:
                continue
            name = self.names.get(pid, "?")
            kind = next((k for k, pattern in KINDS if re.search(pattern, name)), "other")
            kinds[kind] += used
            if kind == "other":
                other[name[:100]] += used
        return dict(kinds), dict(other.most_common(10))


# The host's speed at the hour of the run. The same suite on the same 2-core host took 7 min 43 s to 9 min 17 s on
# one day (2026-12-05), with the same CPU-s of work: the host itself runs faster or slower by the hour (a shared
# virtual machine). This reference is the unit the suite is made of: a fresh Python process importing torch and Ray
# Train's torch backend, as every Train worker, Train helper actor, teacher actor and command does. Its median
# wall time before and after the suite says how fast the host was, so suite times from different hours compare.
REFERENCE = "import torch, ray.train.torch"


def host_reference_s(repeats: int = 5) -> float:
    """Median wall seconds of a fresh ``python -c REFERENCE`` (imports only; the machine otherwise idle)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", REFERENCE], check=True)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def machine_busy_s() -> float:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICK


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "suite_cpu.json"))
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args()

    from throughput import machine

    reference_before = host_reference_s()
    sampler = Sampler()
    sampler.start()
    busy0, t0 = machine_busy_s(), time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "pytest"), *args.pytest_args], cwd=ROOT)
    wall, busy = time.perf_counter() - t0, machine_busy_s() - busy0
    sampler.stop.set()
    sampler.join()
    kinds, other = sampler.by_kind()
    total = sum(kinds.values())
    reference_after = host_reference_s()
    print(f"\nhost reference (median of 5 fresh `python -c \"{REFERENCE}\"`): {reference_before:.2f} s before the "
          f"suite, {reference_after:.2f} s after")
    print(f"\npytest exit status {done.returncode}; {wall:.0f} s wall, machine busy {busy:.0f} CPU-s "
          f"({100 * busy / wall / os.cpu_count():.0f} % of {os.cpu_count()} cores), {total:.0f} CPU-s attributed\n")
    print("| kind of process | CPU-s | share |")
    print("| --- | ---: | ---: |")
    for kind, used in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {used:.0f} | {100 * used / total:.0f} % |")
    print("\nother, largest:")
    for name, used in other.items():
        print(f"  {used:6.1f}  {name}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "pytest_args": args.pytest_args, "exit_status": done.returncode,
                               "wall_s": wall, "machine_busy_cpu_s": busy, "attributed_cpu_s": total,
                               "host_reference": {"command": f"python -c {REFERENCE!r}", "before_s": reference_before,
                                                  "after_s": reference_after},
                               "by_kind": kinds, "other_largest": other}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    main()
