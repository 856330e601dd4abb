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
