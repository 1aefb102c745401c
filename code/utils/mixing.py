"""Copy-paste mixing of 3D crops with one random box (BCP, Bai et al. CVPR 2023; UC-Seg's trainer).

A mask of ones with a zero box is shared by the whole batch; mixing two batches keeps the first outside
the box and takes the second inside it. Device-agnostic; the box position comes from torch's global RNG
(saved in every checkpoint, so a resumed run draws the same boxes).
"""
import torch


def box_size(shape, fraction):
    """Edge lengths of the box: ``int(size * fraction)`` per axis (64 of 96 for 2/3, as BCP and UC-Seg)."""
    return [int(size * fraction) for size in shape]


def copy_paste_mask(shape, fraction=2.0 / 3.0, device=None):
    """A float mask of ``shape`` (X, Y, Z) that is 1 everywhere except a zero box of :func:`box_size`.

    Each corner coordinate is drawn uniformly from ``0 .. size - box - 1`` (numpy's ``randint(0, size -
    box)``, as BCP and UC-Seg), so the box never touches the far border. Needs ``size - box >= 1``.
    """
    mask = torch.ones(tuple(shape), device=device)
    sizes = box_size(shape, fraction)
    corner = [int(torch.randint(0, size - box, (1,))) for size, box in zip(shape, sizes)]
    box = tuple(slice(start, start + length) for start, length in zip(corner, sizes))
    mask[box] = 0.0
    return mask


def copy_paste(outside, inside, mask):
    """``outside * mask + inside * (1 - mask)``: ``inside`` fills the zero box of ``mask`` (broadcast over
    the leading batch and channel dimensions)."""
    return outside * mask + inside * (1.0 - mask)
