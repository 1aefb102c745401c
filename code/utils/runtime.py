"""Device selection, seeding and determinism, mixed precision, and capturing RNG state for resumption."""
import contextlib
import os
import random

import numpy as np
import torch

from utils.errors import UserError


def select_device(name="auto"):
    """``auto`` picks CUDA when available, else the CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device must be auto, cpu or cuda[:N], got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return device


def seed_everything(seed, deterministic=True):
    """Seed ``random``, numpy and torch (CPU and CUDA); with ``deterministic`` also ask for
    deterministic algorithms (``warn_only``: an op without one warns instead of stopping a run) and
    turn off cuDNN benchmarking, as ``cudnn.deterministic`` alone is not enough.

    Deterministic mode would also fill every new tensor with NaN (``fill_uninitialized_memory``), a debugging
    aid that made our CPU training step 5-10% slower (docs/benchmarks.md) and changes no result of an op that
    is correct; it is turned off."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = bool(deterministic)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(bool(deterministic), warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


def autocast(device, enabled):
    """bf16 autocast on CUDA when ``enabled``; a no-op context otherwise."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def capture_rng_state():
    """All RNG states as tensors and plain Python values, loadable with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state):
    """Inverse of :func:`capture_rng_state` (CUDA states are restored when CUDA is present)."""
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    """Tuples may come back from a checkpoint as lists; ``random.setstate`` needs tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value
