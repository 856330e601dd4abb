"""What a person reads while a command runs: one line per event, prefixed ``[raydistill]``."""

from __future__ import annotations


def log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[raydistill] {msg}", flush=True)
