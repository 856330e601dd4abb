"""The ``raydistill`` command line: thin; parse, validate, call the driver.

Bad input (a ``raydistill.errors.UserError``) exits with status 2 and one line naming the problem and the
fix (``--debug`` shows the traceback). Anything else is a bug: its traceback is shown and the exit status
is 1. Nothing is written before the config, data and models have been validated. A run that finished but whose final
student missed a deploy bound the user set exits with status 3 (``deploy_status``).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import traceback
from pathlib import Path

from raydistill.errors import UserError
from raydistill.redact import redact

BUG_HINT = "raydistill: this is a bug, not a problem with your input; please report it with the traceback above"


def _overrides(items: list[str] | None) -> dict:
    from raydistill.config import parse_override

    return dict(parse_override(i) for i in items or [])


def _default_out(config_path: str | None) -> Path:
    # Deterministic run names (no timestamps): rerunning the same command resumes.
    return Path("runs") / (Path(config_path).stem if config_path else "default")


def cmd_run(args: argparse.Namespace) -> int:
    from raydistill import config

    cfg = config.load(args.config, _overrides(args.set))  # first: a config error is one line in ~0.2 s, not after
    from raydistill.pipeline import run  # torch's import (~2 s on 2 cores)

    out = Path(args.out) if args.out else _default_out(args.config)
    report = run(cfg, out, address=args.address, quiet=args.quiet, verbose=args.verbose)
    from raydistill.report import markdown_table

    print(markdown_table(report["models"]))  # the result, also with --quiet
    if not args.quiet:
        print(f"report: {Path(out).resolve() / 'report.md'}")
    return deploy_status(report["deploy"])


GATE_FAILED = 3  # a finished run whose final student missed a deploy bound (2: bad input, 1: a bug)


def deploy_status(deploy: dict) -> int:
    """The exit status of a finished run: 0, or ``GATE_FAILED`` with one line on stderr when the final student
    missed a bound the user set (``deploy.min_accuracy``, ``deploy.min_ratio_to_teacher``), so a script, a CI step
    or ``ray job submit`` sees that nothing was exported, as coverage's ``--fail-under`` or a failing test would make
    them see. The run's results are complete and kept (report, checkpoints)."""
    if deploy["gate"]["passed"]:
        return 0
    print(f"raydistill: deploy gate failed: {deploy['model']}: {deploy['gate']['message']} "
          f"(exit status {GATE_FAILED})", file=sys.stderr)
    return GATE_FAILED


def cmd_cache_logits(args: argparse.Namespace) -> int:
    from raydistill import config

    cfg = config.load(args.config, _overrides(args.set))  # before torch's import, as in cmd_run
    from raydistill.pipeline import open_run, prepare_teacher

    out = Path(args.out) if args.out else _default_out(args.config)
    ctx = open_run(cfg, out, args.address, args.quiet, uses_cache=True, verbose=args.verbose, cache_only=True)
    c = prepare_teacher(ctx, with_cache=True).cache
    print(f"logit cache {redact(c['uri'])}: {c['rows']} rows ({c['views']} view(s) per sample, "
          f"transform {c['transform']}), format {c['format']}" + (f" (k={c['k']})" if c["k"] else "")
          + f", teacher forward samples {c['teacher_forward_samples']}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from raydistill import config

    overrides = _overrides(args.set)
    if args.trials is not None:
        overrides["tune.num_trials"] = args.trials
    if args.max_macs is not None:
        overrides["tune.max_macs"] = args.max_macs
    if args.max_latency_ms is not None:
        overrides["tune.max_latency_ms"] = args.max_latency_ms
    cfg = config.load(args.config, overrides)  # before torch's import, as in cmd_run
    from raydistill.sweep import run_sweep

    out = Path(args.out) if args.out else _default_out(args.config).with_name(_default_out(args.config).name + "-tune")
    report = run_sweep(cfg, out, resume=args.resume, address=args.address, quiet=args.quiet, verbose=args.verbose)
    best, failed = report["best"], report["failed_trials"]
    if best:
        print(f"best trial: accuracy {best['accuracy']:.4f}, {best['macs']:,} MACs -> {out / 'best_config.yaml'}")
    elif failed and len(failed) == report["trials"]:
        # nothing to pick from: a script must see it in the status (Ray Tune's own `tune.run` raises TuneError
        # when trials fail; the Tuner API only returns them). Every trial stopped by bad input (a NaN loss from the
        # learning rate, bad data) is bad input, exit 2 as `raydistill run` gives; anything else exits 1. Each
        # trial's error is on its console line and in results.csv
        message = (f"all {len(failed)} trials failed, the first with: " if len(failed) > 1
                   else "the sweep's only trial failed: ") + f"{failed[0]['error']}; see {out / 'results.csv'}"
        if all(f["bad_input"] for f in failed):
            raise UserError(message)
        print(f"raydistill: error: {redact(message)}", file=sys.stderr)
        return 1
    else:
        print("no completed trial met the constraints; see results.csv")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from raydistill import config

    if args.doc:
        print(config.doc_table())
    else:
        print(config.load(args.config, _overrides(args.set)).to_yaml(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydistill", description="Knowledge distillation orchestrated with Ray.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="teacher -> baseline -> KD student -> pruned student, with a report")
    run.add_argument("config", nargs="?", help="YAML config (default: the embedded digits config)")
    run.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key")
    run.add_argument("--out", help="run folder (default: runs/<config name>)")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    run.add_argument("--quiet", action="store_true", help="print only the final table (and errors)")
    run.add_argument("--verbose", action="store_true", help="also show Ray's and its workers' own log lines (and "
                     "start a private Ray with Ray's dashboard)")
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    cache = sub.add_parser("cache-logits", help="train/load the teacher and write its logits to a Parquet cache")
    cache.add_argument("config", nargs="?", help="YAML config (default: the embedded digits config)")
    cache.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key")
    cache.add_argument("--out", help="run folder (default: runs/<config name>); the cache goes to cache.path "
                                     "or RUN/logit_cache")
    cache.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    cache.add_argument("--quiet", action="store_true")
    cache.add_argument("--verbose", action="store_true", help="also show Ray's and its workers' own log lines (and "
                       "start a private Ray with Ray's dashboard)")
    cache.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    cache.set_defaults(func=cmd_cache_logits)

    tn = sub.add_parser("tune", help="Ray Tune search over run keys with one shared teacher; Pareto front")
    tn.add_argument("config", nargs="?", help="YAML config whose tune section gives the search")
    tn.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key")
    tn.add_argument("--trials", type=int, help="number of trials (tune.num_trials)")
    tn.add_argument("--resume", action="store_true", help="continue an interrupted sweep, keeping finished trials")
    tn.add_argument("--max-macs", type=int, help="best_config.yaml: best accuracy under this many MACs")
    tn.add_argument("--max-latency-ms", type=float, help="best_config.yaml: ... and under this batch-1 latency")
    tn.add_argument("--out", help="sweep folder (default: runs/<config name>-tune)")
    tn.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    tn.add_argument("--quiet", action="store_true")
    tn.add_argument("--verbose", action="store_true", help="also show Ray Tune's status tables and Ray's log lines")
    tn.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    tn.set_defaults(func=cmd_tune)

    cfg = sub.add_parser("config", help="print the resolved config, or the key reference with --doc")
    cfg.add_argument("config", nargs="?")
    cfg.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    cfg.add_argument("--doc", action="store_true", help="print every key with its default as a Markdown table")
    cfg.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    cfg.set_defaults(func=cmd_config)
    from raydistill.manifest import add_verify_parser
    from raydistill.prepare import add_data_parser

    add_verify_parser(sub)  # `verify DIR`: check a run folder's manifest
    add_data_parser(sub)  # `data prepare ...`
    return parser


def _disconnect_ray() -> None:
    """End this driver's Ray Train runs and actors (a stage running in a second thread included), if Ray is up."""
    if "ray" in sys.modules:
        import ray

        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `raydistill` command itself (tests call main(argv) in a process with Ray of its own)
        # No Ray call starts a Ray by itself in this process: the command starts or joins one explicitly
        # (cluster.init_ray). Why: Ray's auto-connect (``ray.init()`` on the first ``ray.get``/``ray.put`` of a
        # process with none) turned a stage still running on a helper thread, after another stage had failed and
        # the command was exiting, into a second, unwanted local Ray started at exit (seen here: a 2-worker run
        # whose teacher hit a NaN while the baseline trained beside it printed Ray's "SIGTERM handler is not set"
        # warning after its error line, and a new Ray session was started). Ray's switch; a value the user set wins.
        os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("raydistill: interrupted; rerun the same command to resume", file=sys.stderr)
        return _stop(argv, 130)
    except BrokenPipeError:
        # stdout's reader went away (`raydistill run ... | head`): stop as a command killed by SIGPIPE does, quietly
        # (Python's documented handling: point stdout at /dev/null so the exit's flush cannot raise again). Like
        # Ctrl-C, finished stages and checkpoints stay; the same command resumes.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _stop(argv, 128 + signal.SIGPIPE)
    except UserError as e:
        if args.debug:
            traceback.print_exc()
        from raydistill.errors import first_user_error, message_line

        e = first_user_error(e) or e  # raised in a Ray task: Ray's RayTaskError(DataError) reads as its cause
        msg = message_line(e)
        print(f"raydistill: error: {redact(msg)}", file=sys.stderr)  # a location's credentials stay out of it
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return _bug()
        if args.debug:
            traceback.print_exc()
        where = f" while writing {e.filename}" if e.filename else ""
        print(f"raydistill: error: no space left on the device{where} ({e.strerror}); free space and rerun the "
              "same command: finished stages are kept and files are written atomically", file=sys.stderr)
        return 2
    except Exception:
        return _bug()
    finally:
        from raydistill.locks import release_run_folders

        release_run_folders()  # the command is over: its run folder is free for the next one
        if argv is None:  # the `raydistill` command itself (tests call main(argv) in their own process)
            exit_without_a_final_gc()


def _stop(argv: list[str] | None, status: int) -> int:
    """After Ctrl-C or a closed stdout: the `raydistill` command itself ends at once (``exit_at_once``); ``main(argv)``
    called in a process of its own (a test's) disconnects from Ray, which ends this driver's Ray Train runs and
    actors (a stage running in a second thread included), and returns ``status``. Checkpoints and finished stages
    stay either way."""
    if argv is None:
        exit_at_once(status)
    _disconnect_ray()
    return status


def exit_at_once(status: int) -> None:
    """After Ctrl-C (or a closed stdout): release the run folder, flush the console, end the process with ``status``.

    Why not ``ray.shutdown()`` and a normal exit: a stage's helper thread (Train's ``ray.get`` on its controller,
    the progress printer's queue poll) may still be inside Ray while the main thread shuts Ray down, and Ray's core
    worker ends a process that touches it after its shutdown with exit status 1 ("core_worker_process.cc: The core
    worker has already been shutdown ... The process will exit"): seen once in a full run of the suite on a 2-core
    machine, in the 2-worker Ctrl-C test (tests/integration/test_faults.py, which passed in the runs before and
    after it): the command exited 1, not 130. Ending the process at once has no such race: a private local Ray's
    node processes share this process's fate (Ray starts them with the parent-death signal) and end with it, its
    workers are killed as it ends (``_end_private_ray_workers``); on a cluster, Ray ends a driver's Train runs and
    actors when the driver goes, as after ``ray.shutdown``. Nothing of ours is half-written: every file is written
    atomically (a temporary file renamed into place, removed as KeyboardInterrupt unwinds the main thread) and the
    epoch journal is appended and closed line by line; a stage's helper thread is a daemon thread, which a normal exit
    would not wait for either."""
    from raydistill.locks import release_run_folders

    release_run_folders()
    _end_private_ray_workers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken console: nothing more to say on it
            pass
    os._exit(status)


def _end_private_ray_workers() -> None:
    """Before ``exit_at_once``'s exit: have the worker processes of the Ray this command started (if it did) killed
    the moment this process has ended.

    Why: the private Ray's GCS, raylet and dashboard end with the command (the parent-death signal), but the
    raylet's children (Train workers, the teacher actor, idle workers, the dashboard and runtime-env agents) are
    not ours and only notice later that their raylet is gone: measured here after a 2-worker run's Ctrl-C, 17 of
    them 3 s after the exit, 2 after 13 s, none after about a minute. They belong to this command alone (its Ray is
    private), so they go with it. Why after the exit, from a small shell: killed before it, the raylet ends as soon
    as one of its agents does, and Ray's core worker in this process then ends the process with status 1 and prints
    that the node is dead (seen here), the very race ``exit_at_once`` is there to avoid. The shell reads a pipe whose
    only writer is this process, so it gets end-of-file exactly when this process ends. Best effort: Ray's node
    handle is internal (``_global_node``); whatever fails here leaves the workers to end by themselves."""
    from raydistill import cluster

    if "ray" not in sys.modules or not cluster.started_locally():
        return
    try:
        import subprocess

        from ray._private import ray_constants
        from ray._private import worker as ray_worker

        node = ray_worker._global_node
        raylets = node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, []) if node else []
        pids = [str(pid) for info in raylets for pid in _descendants(info.process.pid)]
        if not pids:
            return
        read_end, _ = os.pipe()  # the write end stays open in this process alone (pipes are not inherited)
        subprocess.Popen(["/bin/sh", "-c", 'read _; kill -9 "$@" 2>/dev/null', "raydistill-ray-cleanup", *pids],
                         stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
        os.close(read_end)
    except Exception:  # no /proc, a changed Ray internal: the workers end by themselves
        pass


def _descendants(pid: int) -> list[int]:
    """The pids of ``pid``'s children, theirs, and so on, from /proc (Linux, where Ray's fate sharing is; psutil is
    not a dependency of ours)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except OSError:  # the process ended meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def exit_without_a_final_gc() -> None:
    """Called as the command returns to exit: move every live object to the GC's permanent generation.

    Why: after the report is printed, CPython's finalization runs full garbage collections over everything torch,
    Ray and the models left in memory; measured on the default run (2 cores), 2.6 s between the last atexit
    handler and the process's exit, 0.3 s with the objects frozen. Nothing is lost: atexit handlers (Ray's
    shutdown, the run-folder lock) still run, and objects are still freed by reference counting; only cyclic
    garbage made before this point is left to the operating system, which reclaims the whole process anyway."""
    import gc

    gc.freeze()


def _bug() -> int:
    """Anything that is not a UserError: the traceback, a hint that it is ours, exit 1."""
    traceback.print_exc()
    print(BUG_HINT, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
