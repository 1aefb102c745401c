"""An exclusive lock on a folder that lives exactly as long as the process holding it.

A run folder belongs to one live process: a second training (``--resume`` twice, ``--overwrite`` of a run
that is still training) must stop with a line naming the holder instead of interleaving logs or moving the
folder from under a process that keeps writing into it. The lock is a POSIX record lock (``fcntl.lockf``)
on ``<folder>/.lock``: the kernel drops it when the process exits, however it exits (SIGKILL included), so
a lock can never be left behind by a killed run. Record locks, unlike ``flock``, are not inherited by the
processes a data loader forks, so a worker that outlives its killed parent for a moment holds nothing.
The file also says who holds the lock (pid, host, start time, command), for the error message.
"""
import datetime as dt
import errno
import fcntl
import os
import socket
import sys
from pathlib import Path

from utils.errors import UserError

LOCK_FILE = ".lock"


class FolderLock:
    """``FolderLock(folder).acquire()`` or raise a one-line :class:`UserError`; ``release()`` (or the
    process's exit) frees it. The folder must exist."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd = None

    def acquire(self, what="run folder"):
        """Take the lock without waiting; the error names ``what`` and the process holding it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if not try_lock(fd):
            holder = _holder(fd)
            os.close(fd)
            raise UserError(f"{what} {self.folder} is in use by {holder}; wait for it to end or stop it first")
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder_description().encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def try_lock(fd):
    """Take the exclusive record lock of ``fd`` without waiting; False when another process holds it."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


def is_abandoned(folder):
    """True when ``folder`` has a lock file that no live process holds (its writer was killed).

    Only for folders of *other* processes: POSIX record locks belong to a process, so checking a folder this
    process has locked would release that lock when the file is closed here."""
    return _lock_state(folder) == ""


def live_holder(folder):
    """Who holds ``folder``'s lock (:func:`holder_description`), or None when no live process does (or there is no
    lock file). Only for folders of other processes, as :func:`is_abandoned`."""
    return _lock_state(folder) or None


def _lock_state(folder):
    """None without a lock file (or with one this process may not open for writing, which a lock test needs:
    a read-only copy of runs), "" when nobody holds it, else the holder's description."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if try_lock(fd):
            return ""
        return _holder(fd)
    finally:
        os.close(fd)


def _holder(fd):
    """The holder's description that the lock file ``fd`` holds."""
    return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"


def holder_description():
    """``pid 123 on host since 2026-12-01 15:00:03 (python code/train_...)``."""
    started = dt.datetime.now().isoformat(sep=" ", timespec="seconds")
    command = " ".join(sys.argv)
    return f"pid {os.getpid()} on {socket.gethostname()} since {started} ({command[:300]})\n"
