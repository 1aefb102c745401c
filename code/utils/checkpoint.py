"""Checkpoints: written atomically, verified before they are read, read with ``weights_only=True``, checked
against the method reading them.

A checkpoint is a dict::

    {"format": 1, "script": "train_supervised_3D", "iteration": 6000,
     "models": {name: state_dict}, "optimizers": {name: state_dict}, "rng": {...}}

``optimizers`` and ``rng`` are present in the resumable ``latest.pth`` and absent from the weight snapshots.

``torch.save`` writes a zip archive whose records carry CRC-32 checksums, but ``torch.load`` does not check
them: a file whose bytes were damaged without changing its size loads silently, with wrong weights. Every
read here first checks every record's checksum (``zipfile.testzip``; about 0.1 s for 200 MB).
"""
import zipfile
from pathlib import Path

import torch

from utils.atomic import write_atomically
from utils.errors import UserError

FORMAT = 1


def save_checkpoint(path, state):
    """Write ``state`` to ``path`` atomically (:func:`write_atomically`)."""
    write_atomically(path, lambda handle: torch.save({"format": FORMAT, **state}, handle))


def other_checkpoints(path):
    """The other ``.pth`` files beside ``path``, for the hint of an error message."""
    folder = Path(path).parent
    names = sorted((p.name for p in folder.glob("*.pth") if p.name != Path(path).name), key=_snapshot_order)
    return ", ".join(names) if names else "none"


def _snapshot_order(name):
    stem = Path(name).stem
    return (0, int(stem[5:])) if stem.startswith("iter_") and stem[5:].isdigit() else (1, 0)


def default_hint(path):
    return (f"use another checkpoint of the run (in {Path(path).parent}: {other_checkpoints(path)}), or start "
            "the run afresh with --overwrite")


def verify_checkpoint(path, hint=None):
    """Raise a one-line :class:`UserError` unless ``path`` is a readable, complete and undamaged zip archive
    (every record's CRC-32 checked). ``hint`` says what to do instead (default: the run's other checkpoints
    or ``--overwrite``)."""
    path = Path(path)
    hint = hint or default_hint(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except PermissionError:
        raise UserError(f"checkpoint {path} cannot be read: permission denied") from None
    if size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes; its writer was stopped or the disk was full): "
                        f"{hint}")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise UserError(f"checkpoint {path} is truncated or not a PyTorch checkpoint ({exc}): {hint}") from None
    if damaged is not None:
        raise UserError(f"checkpoint {path} is damaged (checksum mismatch in its record {damaged}): {hint}")


def load_checkpoint(path, map_location="cpu", hint=None):
    """Read a checkpoint written by :func:`save_checkpoint` after :func:`verify_checkpoint`; one-line errors for
    a missing, damaged or foreign file (never torch's advice to drop ``weights_only``)."""
    path = Path(path)
    verify_checkpoint(path, hint)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # torch raises several types for foreign files; its message suggests unsafe loading
        raise UserError(f"checkpoint {path} holds objects other than tensors and plain values: it was not "
                        f"written by this repository: {hint or default_hint(path)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "models" not in state:
        raise UserError(f"{path} is not a checkpoint of this repository (no 'models' entry)")
    return state


def load_models(state, models, path, script):
    """Load ``state['models']`` into ``models`` (a name -> module dict), strictly.

    Raises a one-line :class:`UserError` when the checkpoint was written by another script or its
    networks do not match (names, parameter keys or shapes).
    """
    if state.get("script") != script:
        raise UserError(f"checkpoint {path} was written by {state.get('script')}, not by {script}")
    if set(state["models"]) != set(models):
        raise UserError(f"checkpoint {path} holds networks {sorted(state['models'])}, "
                        f"{script} expects {sorted(models)}")
    for name, module in models.items():
        try:
            module.load_state_dict(state["models"][name], strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise UserError(f"checkpoint {path}: network {name!r} does not match {script}: {first}") from None
