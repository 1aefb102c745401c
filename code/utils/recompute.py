"""Activation recomputation: a network's forward pass whose activations are recomputed in the backward pass
instead of kept, trading about one extra forward pass for memory (``torch.utils.checkpoint``).

The dual-network methods (UC-Seg, UGPL) otherwise keep both networks' whole graphs alive until the single
backward pass; recomputed, only one network's graph exists at a time. The gradients are the same: dropout
masks are replayed (the RNG state is restored for the recomputation), and batch-norm running statistics,
which the recomputed forward pass would update a second time, are put back to their values after the first
update. ``--recompute auto`` turns it on for CPU runs, where memory is the limit, and off on CUDA, where the
extra forward pass costs time a large GPU does not need to spend.
"""
import contextlib
import functools

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

CHOICES = ("auto", "on", "off")


def add_recompute_args(parser):
    """``--recompute auto|on|off`` (a runtime flag: it changes memory and speed, not results)."""
    parser.add_argument("--recompute", choices=CHOICES, default="auto",
                        help="recompute each network's activations in the backward pass instead of keeping "
                             "them: less memory, about one more forward pass; same gradients "
                             "(default: auto = on for CPU, off for CUDA)")


def recompute_enabled(choice, device):
    """Whether ``--recompute choice`` is on for ``device``."""
    return choice == "on" or (choice == "auto" and device.type == "cpu")


@contextlib.contextmanager
def running_stats_kept(net):
    """Restore every batch norm's running statistics (and batch count) of ``net`` on exit."""
    saved = [(buffer, buffer.clone()) for module in net.modules() if isinstance(module, _BatchNorm)
             for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _contexts(net):
    """The first forward pass runs as usual; the recomputation must not update running statistics again."""
    return contextlib.nullcontext(), running_stats_kept(net)


def forward(net, *inputs, enabled=True, **kwargs):
    """``net(*inputs, **kwargs)``; with ``enabled`` (and gradients on) its activations are not kept but
    recomputed when the backward pass reaches them."""
    if not (enabled and torch.is_grad_enabled()):
        return net(*inputs, **kwargs)
    return checkpoint(net, *inputs, use_reentrant=False, preserve_rng_state=True,
                      context_fn=functools.partial(_contexts, net), **kwargs)
