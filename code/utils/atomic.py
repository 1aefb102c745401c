"""Files written so that a process killed at any moment leaves the old file or the new one, never a mix.

Every writer of the project that replaces a file others read (checkpoints, ``config.json``, converted cases)
writes a hidden temporary file beside it under a name no other process uses, syncs it to disk and renames it
over the target; a writer killed before the rename leaves only its temporary file, which the next holder of
the folder removes (``utils.run.TrainingRun``).
"""
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from utils.errors import UserError

# What torch.save says when a write fails (a full disk): a RuntimeError, not an OSError, with one of these
TORCH_WRITE_FAILURE = re.compile(r"PytorchStreamWriter failed writing[^\n]*|unexpected pos \d+ vs \d+")


def temporary_name(path):
    """A hidden name beside ``path`` that no other process or earlier write uses (pid and a random part),
    so that two writers never share a temporary file."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def write_json(path, value):
    """Write ``value`` as indented JSON, atomically (:func:`write_atomically`)."""
    write_atomically(path, lambda handle: handle.write((json.dumps(value, indent=2) + "\n").encode("utf-8")))


def write_atomically(path, write):
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync it, rename it over ``path`` and fsync
    the folder: a process killed at any moment leaves either the old file or the new one, never a mix.
    A failed write (a full disk: an ``OSError``, or torch's ``RuntimeError``, :func:`write_failure`) becomes a
    one-line :class:`UserError` that says how much space the folder has left; the old file is kept."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        reason = write_failure(exc)
        if reason is None:
            raise
        raise UserError(f"cannot write {path}: {reason}; the previous {path.name}, if any, is intact "
                        f"({free_space(path.parent)})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def write_failure(exc):
    """Why a write failed, in a few words, for an ``OSError`` or for the ``RuntimeError`` by which ``torch.save``
    reports one (:data:`TORCH_WRITE_FAILURE`); None for any other ``RuntimeError``, which is not a write's."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    found = TORCH_WRITE_FAILURE.search(str(exc))
    return found[0] if found else None


def free_space(folder):
    """``'1.5 GiB free in <folder>'`` (``shutil.disk_usage``): what a message about a failed write adds, since
    a full disk is its usual cause."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        return f"the free space in {folder} cannot be read: {exc.strerror or exc}"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if free >= size:
            return f"{free / size:.1f} {unit} free in {folder}"
    return f"{free} bytes free in {folder}"


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
