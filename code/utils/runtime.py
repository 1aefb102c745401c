"""Device selection, seeding and determinism, mixed precision, the data loader's worker count, the step's
layout and compilation flags, and capturing RNG state for resumption."""
import contextlib
import os
import random
import warnings

import numpy as np
import torch

from utils.errors import UserError
from utils.sliding_window import channels_last as to_channels_last


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
    use_deterministic_algorithms(deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = False


def use_deterministic_algorithms(deterministic, warn_only=True):
    """``torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)`` without loading the compiler: that
    call imports ``torch._inductor`` (1.4-1.9 s at the start of a script on our CPU, docs/benchmarks.md section 6)
    only to copy the flag into inductor's config, which matters to compiled networks alone;
    :func:`prepare_for_training` makes the public call when ``--compile`` loads inductor anyway."""
    torch._C._set_deterministic_algorithms(bool(deterministic), warn_only=warn_only)


# --num_workers auto: at most this many workers on a GPU machine (docs/benchmarks.md: what each method needs)
MAX_AUTO_WORKERS = 8
# what PyTorch says, once per call site, for each op without a deterministic kernel when warn_only is set
NONDETERMINISTIC_OP_WARNING = r".*does not have a deterministic implementation.*"


def usable_cpus():
    """The CPUs this process may run on (its affinity mask: what a scheduler gave the job)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def auto_num_workers(device, cpus=None):
    """The data loader's workers for ``--num_workers auto``: 2 on the CPU, where the step itself needs the
    cores and 2 keep a step fed (docs/benchmarks.md); on a GPU every usable CPU but one for the main process,
    at most :data:`MAX_AUTO_WORKERS` and at least 2. The batches do not depend on the count (every crop has its
    own augmentation seed), so neither do the results."""
    if device.type != "cuda":
        return 2
    cpus = usable_cpus() if cpus is None else cpus
    return max(2, min(MAX_AUTO_WORKERS, cpus - 1))


def quiet_determinism_warnings(device, deterministic):
    """On CUDA with ``--deterministic 1``, silence PyTorch's warning about each op that has no deterministic
    CUDA kernel (one per op and call site, hundreds of lines in a run) and return the one line that says it
    instead; None where nothing is silenced (the CPU's ops used here are all deterministic)."""
    if device.type != "cuda" or not deterministic:
        return None
    warnings.filterwarnings("ignore", message=NONDETERMINISTIC_OP_WARNING)
    return ("note: --deterministic 1 on CUDA: some ops used here have no deterministic CUDA kernel (5-D cross "
            "entropy, trilinear upsampling backward, max-pool backward, gather backward) and run as they are; "
            "a rerun matches to float rounding, not bit for bit (their warnings are not repeated)")


def prepare_for_training(models, device, channels_last=False, compile_models=False):
    """Apply the step flags to the networks (``{name: module}``, in place, already on ``device``):
    ``--channels_last`` converts their 5-D weights to the channels-last-3d layout (batches follow in
    :func:`to_step_layout`), ``--compile`` compiles their forward passes (``nn.Module.compile``: the state
    dicts keep their keys, so checkpoints are unchanged). Both change the numbers only by float rounding."""
    if compile_models:  # the compiler follows the deterministic setting through its own copy of the flag
        torch.use_deterministic_algorithms(torch.are_deterministic_algorithms_enabled(),
                                           warn_only=torch.is_deterministic_algorithms_warn_only_enabled())
    for model in models.values():
        if channels_last:
            to_channels_last(model)
        if compile_models:
            model.compile()


def to_step_layout(tensor, channels_last=False):
    """A batch tensor in the step's layout: 5-D floating-point tensors channels-last-3d with ``--channels_last``
    (labels and masks keep theirs)."""
    if channels_last and tensor.dim() == 5 and tensor.is_floating_point():
        return tensor.contiguous(memory_format=torch.channels_last_3d)
    return tensor


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
