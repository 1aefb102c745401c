"""Sliding-window inference with the exact algorithm of the anchors (UA-MT ``test_single_case``), batched.

The algorithm: zero-pad every axis smaller than the patch (split evenly, extra voxel on the right); place
``ceil((size - patch) / stride) + 1`` windows per axis starting at ``min(stride * i, size - patch)``, so the
last window is flush with the border; add each window's class probabilities to a score map and count the
windows covering each voxel; divide, take the argmax, and remove the padding.

:func:`sliding_window_inference` runs the windows in batches of ``sw_batch_size`` on the model's device,
accumulating on that device in the anchors' window order (x, then y, then z), so its score map equals the
one-window-at-a-time :func:`reference_sliding_window` up to the network's own batch-size rounding.
On the CPU nearly all of its time is the network's forward pass, which two settings of the caller make
about 2x faster together (docs/benchmarks.md): :func:`channels_last` on the networks (same numbers up to
float rounding) and :func:`keep_freed_memory` once per process (same numbers).
"""
import ctypes
import ctypes.util
import math

import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import UserError, raise_swallowed_stop

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3


def check_window(patch_size, stride_xy, stride_z):
    """Strides must be positive and not larger than the patch, else voxels are left uncovered."""
    px, py, pz = patch_size
    if stride_xy < 1 or stride_z < 1:
        raise UserError(f"strides must be positive, got stride_xy {stride_xy}, stride_z {stride_z}")
    if stride_xy > min(px, py) or stride_z > pz:
        raise UserError(f"stride_xy {stride_xy} / stride_z {stride_z} larger than the patch "
                        f"{px}x{py}x{pz} would leave voxels without a prediction")


def padding_for(shape, patch_size):
    """``[(left, right)]`` zero padding per axis that makes every axis at least the patch."""
    pads = []
    for size, patch in zip(shape, patch_size):
        total = max(patch - size, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def window_starts(size, patch, stride):
    """Start offsets of the windows along one (padded) axis."""
    count = math.ceil((size - patch) / stride) + 1
    return [min(stride * i, size - patch) for i in range(count)]


def window_corners(shape, patch_size, stride_xy, stride_z):
    """All window corners of a padded volume, in the anchors' order (x outermost, z innermost)."""
    xs = window_starts(shape[0], patch_size[0], stride_xy)
    ys = window_starts(shape[1], patch_size[1], stride_xy)
    zs = window_starts(shape[2], patch_size[2], stride_z)
    return [(x, y, z) for x in xs for y in ys for z in zs]


def channels_last(module):
    """Convert ``module``'s 5D weights to the channels-last-3d memory format in place and return it.

    oneDNN's 3D convolutions run faster on the CPU in this layout and hand their outputs on in it, so the
    whole forward pass stays channels-last; the numbers change only by float rounding. The caller applies
    it to the networks it evaluates (the windows have one channel, so their layout needs no change).
    """
    return module.to(memory_format=torch.channels_last_3d)


def keep_freed_memory(limit_bytes=1 << 30):
    """Make glibc's malloc serve blocks up to ``limit_bytes`` from its heap and keep freed memory there.

    By default every block above at most 32 MiB (every activation of a 3D network) gets a fresh ``mmap``
    that the kernel page-faults and zeroes, and is unmapped again when freed: on our CPU that was up to 40%
    of the sliding window's time. Process-wide, so the caller decides (once, before inference); the process
    then keeps its peak memory. Returns whether malloc accepted the settings (False without glibc).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, limit_bytes)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * limit_bytes))


def _unpad(array, pads, shape):
    slices = tuple(slice(left, left + size) for (left, _), size in zip(pads, shape))
    return array[(Ellipsis,) + slices]


@torch.inference_mode()
def sliding_window_inference(predict, image, patch_size, stride_xy, stride_z, num_classes,
                             device, sw_batch_size=4):
    """Predict a whole volume window by window.

    ``predict`` maps a batch ``[B, 1, px, py, pz]`` on ``device`` to class probabilities
    ``[B, num_classes, px, py, pz]`` (each method's ``predict``). ``image`` is a numpy ``[X, Y, Z]``
    volume. Returns ``(label_map uint8 [X, Y, Z], score_map float32 [C, X, Y, Z])`` as numpy arrays. A stop
    signal that Python could not raise where it arrived is raised before the next batch of windows
    (:func:`~utils.errors.raise_swallowed_stop`).
    """
    check_window(patch_size, stride_xy, stride_z)
    shape = image.shape
    pads = padding_for(shape, patch_size)
    volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).to(device)
    volume = F.pad(volume, [p for pair in reversed(pads) for p in pair])
    padded = tuple(volume.shape)
    corners = window_corners(padded, patch_size, stride_xy, stride_z)
    score = torch.zeros((num_classes,) + padded, dtype=torch.float32, device=device)
    count = torch.zeros(padded, dtype=torch.float32, device=device)
    px, py, pz = patch_size
    for first in range(0, len(corners), sw_batch_size):
        raise_swallowed_stop()
        batch_corners = corners[first:first + sw_batch_size]
        batch = torch.stack([volume[x:x + px, y:y + py, z:z + pz] for x, y, z in batch_corners]).unsqueeze(1)
        probs = predict(batch).float()
        for (x, y, z), prob in zip(batch_corners, probs):
            score[:, x:x + px, y:y + py, z:z + pz] += prob
            count[x:x + px, y:y + py, z:z + pz] += 1
    score /= count.unsqueeze(0)
    score = _unpad(score, pads, shape).cpu().numpy()
    return _argmax_labels(score), score


def _argmax_labels(score):
    """The anchors' ``np.argmax`` over classes (first class wins ties), as uint8.

    numpy on the host score map, which is returned anyway: on the CPU, ``torch.argmax`` over the leading
    class axis takes about 1 s per LA case, ten times numpy's time.
    """
    return np.argmax(score, axis=0).astype(np.uint8)


@torch.no_grad()
def reference_sliding_window(net, image, patch_size, stride_xy, stride_z, num_classes, device):
    """The anchors' one-window-at-a-time algorithm (numpy accumulation, softmax of ``net``'s logits).

    Kept as the reference that tests and the benchmark compare :func:`sliding_window_inference` with.
    It runs under ``torch.no_grad()`` as DTC and MC-Net do; UA-MT's ``test_single_case`` omits it, which
    builds an autograd graph per window (more time and memory) but gives the same numbers.
    """
    shape = image.shape
    pads = padding_for(shape, patch_size)
    padded_image = np.pad(image, pads, mode="constant", constant_values=0)
    padded = padded_image.shape
    score = np.zeros((num_classes,) + padded, dtype=np.float32)
    count = np.zeros(padded, dtype=np.float32)
    px, py, pz = patch_size
    for x, y, z in window_corners(padded, patch_size, stride_xy, stride_z):
        patch = padded_image[x:x + px, y:y + py, z:z + pz][None, None].astype(np.float32)
        logits = net(torch.from_numpy(patch).to(device))
        prob = F.softmax(logits, dim=1).cpu().numpy()[0]
        score[:, x:x + px, y:y + py, z:z + pz] += prob
        count[x:x + px, y:y + py, z:z + pz] += 1
    score = score / count[None]
    labels = np.argmax(score, axis=0)
    return _unpad(labels, pads, shape).astype(np.uint8), _unpad(score, pads, shape)
