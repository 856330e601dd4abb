"""File locks that keep concurrent commands apart on a shared machine or cluster: one live command per run
folder (``RUN/.raydistill.lock``), one builder at a time per logit cache (``CACHE/.build.lock``).

Why ``fcntl.flock`` and not a pid file alone: the kernel drops an flock the moment its process dies (a
SIGKILL, a `ray job stop`, an out-of-memory kill; on NFS the server drops it with the client's lease), so a
crashed command never blocks the next one, and two commands that find the same stale file cannot both take
it. The file's content (owner pid, host, command, start time) is only there to name the other command in the
message; a file naming a process whose lock nobody holds any more is stale and is taken over. Where the
filesystem refuses flock (some network filesystems mounted without locking), the content decides instead: a
live pid on this host, or any owner on another host, holds it; a dead pid on this host is stale.

Why not the ``filelock`` package: it adds a dependency for the same ~20 lines and does not record or report
the owner, which is what the one-line refusal needs.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

RUN_LOCK = ".raydistill.lock"  # in a run folder; not an artifact (manifest.py skips *.lock)
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _this_owner() -> dict:
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def describe(owner: dict | None) -> str:
    """``pid 123 on host h, `raydistill run ...`, since ...`` (or what is known of it)."""
    if not owner:
        return "owner unknown"
    return f"pid {owner.get('pid')} on {owner.get('host')}, `{owner.get('command', '?')}`, since {owner.get('since')}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FileLock:
    """An exclusive lock on ``path`` whose content names its owner; ``release`` removes the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fd: int | None = None
        self.previous: dict | None = None  # the owner a stale lock named when this one took it over

    def owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it (a stale one is taken over); False if another process holds it."""
        return self._acquire(blocking=False)

    def acquire(self) -> None:
        """Wait until the lock is free, then take it."""
        self._acquire(blocking=True)

    def _acquire(self, blocking: bool) -> bool:
        assert self.fd is None, "already held"
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    os.close(fd)
                    raise
                if not self._free_by_content():
                    os.close(fd)
                    if not blocking:
                        return False
                    time.sleep(1.0)
                    continue
            # The holder we waited for may have removed the file (release) and another process made a new one:
            # only a lock on the file that is at the path now counts.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.previous = self.owner()
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_this_owner()).encode(), 0)
            self.fd = fd
            return True

    def _free_by_content(self) -> bool:
        """Without flock: free if empty, ours, or naming a dead process on this host."""
        owner = self.owner()
        if not owner or owner.get("pid") == os.getpid():
            return True
        return owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", 0)))

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: a waiter re-checks the inode and retries
        finally:
            os.close(self.fd)
            self.fd = None


# ---- run folders ----------------------------------------------------------------------------------------------
_HELD: dict[Path, FileLock] = {}


def lock_run_folder(out: Path) -> dict | None:
    """Hold ``out/.raydistill.lock`` for the rest of this process (re-entrant; released at exit, and by the kernel
    when the process dies). Returns the owner of a stale lock it took over (else None); raises RunFolderError
    naming the other command when a live one holds the folder. ``out`` must exist."""
    from raydistill.errors import RunFolderError

    out = Path(out).resolve()
    if out in _HELD:
        return None
    lock = FileLock(out / RUN_LOCK)
    if not lock.try_acquire():
        raise RunFolderError(f"run folder {out} is in use by another raydistill command ({describe(lock.owner())}); "
                             "wait for it to finish or pass another --out")
    if not _HELD:
        atexit.register(release_run_folders)
    _HELD[out] = lock
    stale = lock.previous
    return stale if stale and stale.get("pid") != os.getpid() else None


def release_run_folders() -> None:
    """Release every run folder this process holds (at exit; tests call it to hand a folder over)."""
    while _HELD:
        _HELD.popitem()[1].release()


# ---- output folders a command creates ------------------------------------------------------------------------
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # the CLI's own one-line error for these (cli.main)


def folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a folder this process creates and writes in, or None. A command checks its output
    folder with this before it loads data or starts Ray, so that a mistyped ``--out`` is a one-line error at once,
    without creating anything (the folder is made once every input has been checked). ``os.access`` also sees a
    read-only mount (EROFS); what it cannot see (a pseudo-filesystem such as /proc) fails the ``make_folder``
    that follows."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            return f"{path} is a file, not a folder"
        probe = path
    else:
        probe = path.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            return f"{probe} is a file, so no folder can be made under it"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    return None


def make_folder(path: Path, error: type[Exception], fix: str) -> None:
    """``mkdir -p path``; an OS refusal (other than a full disk, which the CLI reports as such) raised as the
    user's ``error`` naming the folder, the reason and ``fix``."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise
        raise error(f"cannot create the folder {path} ({e.strerror or e}); {fix}") from None
