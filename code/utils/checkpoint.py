"""Checkpoints: written atomically, read with ``weights_only=True``, checked against the method reading them.

A checkpoint is a dict::

    {"format": 1, "script": "train_supervised_3D", "iteration": 6000,
     "models": {name: state_dict}, "optimizers": {name: state_dict}, "rng": {...}}

``optimizers`` and ``rng`` are present in the resumable ``latest.pth`` and absent from the weight snapshots.
"""
import os
from pathlib import Path

import torch

from utils.errors import UserError

FORMAT = 1


def save_checkpoint(path, state):
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, then rename,
    so a run killed mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        torch.save({"format": FORMAT, **state}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by :func:`save_checkpoint`; clear errors for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise UserError(f"checkpoint {path} cannot be read: {str(exc).splitlines()[0]}") from None
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
