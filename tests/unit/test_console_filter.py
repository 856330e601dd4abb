"""The raylet's worker start-up warning (printed by Ray's driver, not logged) is dropped from the console unless
--verbose; every other raylet message still gets through. No Ray is started: the printing function is called as
Ray's error-message thread calls it."""

from raydistill import console

WARNING = ("WARNING: 8 PYTHON worker processes have been started on node: abc with address: 127.0.0.1, which is 4x "
           "the maximum expected startup concurrency (2).")


def _print(lines):
    from ray._private import worker

    worker.print_to_stdstream({"lines": lines, "pid": "raylet", "is_err": False}, ignore_prefix=False)


def test_raylet_startup_warning_is_dropped_unless_verbose(capsys):
    try:
        console.quiet_libraries(False)
        _print([WARNING])
        _print(["WARNING: something the user can act on"])
        out = capsys.readouterr().out
        assert "PYTHON worker processes" not in out and "something the user can act on" in out
        console.quiet_libraries(True)  # --verbose shows everything
        _print([WARNING])
        assert "PYTHON worker processes" in capsys.readouterr().out
    finally:
        console.quiet_libraries(False)


def test_train_reports_forwarded_to_a_scripts_own_ray_init_are_dropped_unless_verbose():
    """A script that calls ray.init() itself before raydistill.run gets its workers' output forwarded (Ray's
    log_to_driver): every Train worker's "Reporting training result" line and the core worker's PreemptionWatcher
    notice reached its console (seen: 3 a stage on 2 workers). They are dropped unless verbose; the rest of the
    worker's output still gets through. No Ray: the batches go through Ray's dispatcher as its log thread sends them."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    seen = []
    dispatcher.add_handler("ray_print_logs", lambda data: seen.append(list(data["lines"])))  # as ray.init adds it
    report = "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'loss': 2.28}) from rank 1"
    watcher = ("[2026-12-04 11:44:06,741 E 24211 24276] core_worker.cc:2465: Actor with class name: "
               "'PreemptionWatcher' and ID: 'f6e5' has constructor arguments in the object store and max_restarts > 0")
    try:
        console.quiet_libraries(False)
        console.quiet_libraries(False)  # idempotent: wrapped once
        dispatcher.emit({"lines": [report, "the user's own print"], "pid": 7, "is_err": False})
        dispatcher.emit({"lines": [watcher], "pid": 8, "is_err": True})
        dispatcher.emit({"lines": ["Checkpoint successfully created at: Checkpoint(filesystem=local, path=/t/c_0)"],
                         "pid": 9, "is_err": False})  # a Tune trial's, every epoch
        assert seen == [["the user's own print"]]
        console.quiet_libraries(True)  # --verbose / verbose=True shows everything
        dispatcher.emit({"lines": [report, watcher], "pid": 7, "is_err": False})
        assert seen[-1] == [report, watcher]
    finally:
        console.quiet_libraries(False)
        dispatcher.remove_handler("ray_print_logs")


DEATH = ("A worker died or was killed while executing a task by an unexpected system error. To troubleshoot the "
         "problem, check the logs for the dead worker. Lease ID: 06 Worker ID: bf1e Node ID: a483 Worker IP address: "
         "192.0.2.2 Worker port: 44353 Worker PID: 6205 Worker exit type: SYSTEM_ERROR Worker exit detail: Worker "
         "unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) the "
         "process was killed by the OOM killer due to high memory usage, (2) ray stop --force was called, or (3) ...")


def test_a_worker_death_is_one_line_unless_verbose(capsys):
    """The raylet's ~900-character message for a dead worker process (as a Train worker killed by pid gives it)
    becomes one line naming the process and how it ended; --verbose shows Ray's own."""
    try:
        console.quiet_libraries(False)
        _print([DEATH])
        assert capsys.readouterr().out == ("[raydistill] Ray: worker process 6205 died (killed, out of memory or "
                                           "crashed; SYSTEM_ERROR); --verbose shows Ray's message\n")
        console.quiet_libraries(True)
        _print([DEATH])
        assert "Lease ID" in capsys.readouterr().out
    finally:
        console.quiet_libraries(False)


def test_credentials_in_a_uri_are_masked_on_the_console_and_in_what_a_run_records(capsys):
    """A pyarrow URI may carry a key and secret (``s3://KEY:SECRET@bucket``) or credential options
    (``?secret_key=``, ``session_token=``, Azure's ``account_key=``): the console, report.json and MLflow params
    show ``***`` in their place and keep the rest of the location (bucket, path, endpoint options)."""
    from raydistill.console import line, log
    from raydistill.redact import redact, redact_obj
    from raydistill.track import flat_params

    uri = "s3://AKID:s3cr3t@data/x?scheme=http&endpoint_override=127.0.0.1:9000&secret_key=s3cr3t&session_token=T0K3N"
    masked = "s3://AKID:***@data/x?scheme=http&endpoint_override=127.0.0.1:9000&secret_key=***&session_token=***"
    assert redact(uri) == masked
    assert redact("abfs://c@acct.dfs.core.windows.net/p?account_key=K1&sas_token=K2") == \
        "abfs://c@acct.dfs.core.windows.net/p?account_key=***&sas_token=***"
    for plain in ("/data/cifar10/train.parquet", "hdfs://user@nn:8020/p", "gs://bucket/prefix?scheme=https", "a ? b"):
        assert redact(plain) == plain
    log(f"data parquet: train from {uri}")
    line(f"[teacher] reading {uri}")
    out = capsys.readouterr().out
    assert "s3cr3t" not in out and "T0K3N" not in out and out.count(masked) == 2
    assert redact_obj({"data": {"path": uri, "splits": [uri, 3]}, "n": 1}) == \
        {"data": {"path": masked, "splits": [masked, 3]}, "n": 1}
    assert flat_params({"data": {"path": uri}})["data.path"] == masked


def test_ray_data_logs_about_bad_input_are_dropped_unless_verbose():
    """Ray Data logs an error a step raised (with its traceback) before it reaches the command; for a raydistill
    UserError, here a real RayTaskError(DataError) as a Ray task hands it back, the command's one line says it
    all. Other errors, and everything with --verbose, still get through."""
    import logging
    import sys

    import ray.data  # noqa: F401  (configures the "ray.data" logger and its console handler)
    from ray.exceptions import RayTaskError

    from raydistill.errors import DataError

    def record(error):
        return logging.LogRecord("ray.data._internal.execution.streaming_executor_state", logging.ERROR, __file__, 1,
                                 "An exception was raised from a task", None,
                                 (type(error), error, None) if error else None)

    def wrapped(cause):
        try:
            raise cause
        except Exception as e:
            import traceback

            return RayTaskError("MapBatches(_decode_rows)", traceback.format_exc(), e).as_instanceof_cause()

    handlers = [h for h in logging.getLogger("ray.data").handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    assert handlers
    try:
        console.quiet_libraries(False)
        bad_input, bug = wrapped(DataError("cannot decode image with id 3")), wrapped(ValueError("a bug"))
        for handler in handlers:
            assert not handler.filter(record(bad_input))
            assert handler.filter(record(bug)) and handler.filter(record(None))
            try:  # a record without exc_info, logged while the error is being handled
                raise bad_input
            except DataError:
                assert not handler.filter(record(None))
        console.quiet_libraries(True)
        assert all(handler.filter(record(bad_input)) for handler in handlers)
    finally:
        console.quiet_libraries(False)
    assert sys.exc_info()[1] is None


def test_tunes_slow_step_warning_is_off_in_a_sweep_unless_verbose_or_the_user_set_it(monkeypatch):
    """Tune warns "... may be a performance bottleneck" (four lines) whenever a step of its event loop took over
    0.5 s, which a busy 2-core laptop hit in a minute-long sweep; Tune reads its threshold when ray.tune is first
    imported, so run_sweep sets it before that (sweep.quiet_tune): a fresh interpreter shows Tune taking it."""
    import os
    import subprocess
    import sys

    from raydistill.sweep import quiet_tune

    for name in ("TUNE_WARN_THRESHOLD_S", "TUNE_PRINT_ALL_TRIAL_ERRORS", "RAY_AIR_NEW_OUTPUT",
                 "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"):
        monkeypatch.delenv(name, raising=False)
    quiet_tune(True)  # --verbose shows everything: Tune's own defaults
    assert "TUNE_WARN_THRESHOLD_S" not in os.environ
    monkeypatch.setenv("TUNE_WARN_THRESHOLD_S", "2")
    quiet_tune(False)
    assert os.environ["TUNE_WARN_THRESHOLD_S"] == "2"  # the user's value wins
    monkeypatch.delenv("TUNE_WARN_THRESHOLD_S")
    quiet_tune(False)
    assert os.environ["TUNE_WARN_THRESHOLD_S"] == "10"
    probe = ("from raydistill.sweep import quiet_tune; quiet_tune(False); "
             "from ray.tune.utils.util import warn_if_slow; print(warn_if_slow.DEFAULT_THRESHOLD)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "TUNE_WARN_THRESHOLD_S"})
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "10.0", done.stdout + done.stderr[-2000:]


def test_tunes_snapshot_copy_racing_its_own_temporary_file_is_not_shown(monkeypatch):
    """Tune copies its experiment snapshot folder to storage in the background while the next snapshot writes a
    searcher state file under a temporary name and renames it; the copy then fails on the vanished file and Tune
    logs an ERROR with a traceback (seen in a 2-trial sweep of the suite), though its next copy saves the state.
    console.quiet_libraries drops exactly that record; any other failure to save the state still shows."""
    import logging

    log = logging.getLogger("ray.tune.execution.experiment_state")
    monkeypatch.setattr(log, "filters", [])
    console.quiet_libraries(False)
    console.quiet_libraries(False)  # once only
    assert sum(isinstance(f, console._DropSnapshotRace) for f in log.filters) == 1
    shown = []

    class Keep(logging.Handler):
        def emit(self, record):
            shown.append(record)

    keep = Keep(logging.ERROR)
    log.addHandler(keep)
    try:
        for error in (FileNotFoundError(2, "Failed to open local file '/s/driver_artifacts/.8b2d9f65-a2ea-tmp-"
                                           "basic-variant-state-2026-12-04_15-10-02.json'"),
                      FileNotFoundError(2, "Failed to open local file '/s/driver_artifacts/experiment_state.json'"),
                      PermissionError(13, "Permission denied: '/storage/sweep'")):
            try:
                raise error
            except OSError:
                log.error("Saving experiment state to storage at '/storage/sweep' failed with exception: ",
                          exc_info=True)
    finally:
        log.removeHandler(keep)
    assert [type(r.exc_info[1]).__name__ for r in shown] == ["FileNotFoundError", "PermissionError"]
    assert "-tmp-" not in str(shown[0].exc_info[1])
