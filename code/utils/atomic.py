"""Files written so that a process killed at any moment leaves the old file or the new one, never a mix.

Every writer of the project that replaces a file others read (checkpoints, ``config.json``, converted cases)
writes a hidden temporary file beside it under a name no other process uses, syncs it to disk and renames it
over the target; a writer killed before the rename leaves only its temporary file, which the next holder of
the folder removes (``utils.run.TrainingRun``).
"""
import os
import uuid
from pathlib import Path

from utils.errors import UserError


def temporary_name(path):
    """A hidden name beside ``path`` that no other process or earlier write uses (pid and a random part),
    so that two writers never share a temporary file."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def write_atomically(path, write):
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync it, rename it over ``path`` and fsync
    the folder: a process killed at any moment leaves either the old file or the new one, never a mix.
    An ``OSError`` (a full disk) becomes a one-line :class:`UserError`; the old file is kept."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {exc.strerror or exc}; the previous {path.name}, if any, "
                        "is intact") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def sync_folder(folder):
    """fsync a folder, so that a rename in it survives a power cut (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
