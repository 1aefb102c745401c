"""Monte-Carlo dropout uncertainty of a teacher network (UA-MT, Yu et al. MICCAI 2019; reused by UG-MCL).

The teacher runs ``passes`` times on the same batch, each time with fresh input noise and, because it
stays in training mode, fresh dropout masks. The uncertainty of a voxel is the entropy of the mean class
probabilities; voxels below a threshold (``utils.ramps.uncertainty_threshold``) are the "certain" ones
that take part in the consistency loss.
"""
import torch

from utils.ema import teacher_input
from utils.losses import voxel_entropy

ENTROPY_EPS = 1e-6


@torch.no_grad()
def mc_dropout_uncertainty(predict_probs, x, passes=8, passes_per_forward=2):
    """``(mean_probs [B,C,...], uncertainty [B,1,...])`` from ``passes`` noisy stochastic passes.

    ``predict_probs`` maps a batch to class probabilities. As in UA-MT, several passes share one forward
    call by repeating the batch ``passes_per_forward`` times (2 in the anchors: 8 passes in 4 calls); a
    last call takes the remainder when ``passes`` is not a multiple. The entropy uses natural logs and
    ``eps = 1e-6`` inside the log (UA-MT), so its maximum for two classes is just under ln 2.
    """
    if passes < 1 or passes_per_forward < 1:
        raise ValueError(f"passes ({passes}) and passes_per_forward ({passes_per_forward}) must be >= 1")
    batch = x.shape[0]
    total, done = None, 0
    while done < passes:
        copies = min(passes_per_forward, passes - done)
        probs = predict_probs(teacher_input(x.repeat(copies, *([1] * (x.dim() - 1)))))
        summed = probs.reshape(copies, batch, *probs.shape[1:]).sum(dim=0)
        total = summed if total is None else total + summed
        done += copies
    mean_probs = total / passes
    return mean_probs, voxel_entropy(mean_probs, dim=1, eps=ENTROPY_EPS).unsqueeze(1)


def certain_mask(uncertainty, threshold):
    """Float mask of the voxels whose uncertainty is strictly below ``threshold`` (UA-MT's ``u < thr``):
    all zero for a threshold of 0, all one for a threshold above the largest possible entropy."""
    return (uncertainty < threshold).to(uncertainty.dtype)
