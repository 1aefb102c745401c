"""Segmentation and consistency losses for semi-supervised 3D segmentation.

The formulas follow the anchor code bases: the Dice losses of V-Net as written in UA-MT
(Yu et al., MICCAI 2019) and SSL4MIS, UA-MT's unreduced softmax MSE / KL consistency maps, the
SSL4MIS entropy term, and DTC's normalised signed distance map (Luo et al., AAAI 2021). Everything
here is device-agnostic: tensors are created on the device of the inputs, never with ``.cuda()``.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from utils.errors import UserError

try:
    import edt
except ImportError:  # reported by require_edt(), before a run that needs it starts
    edt = None

MASK_EPS = 1e-8
KL_REDUCTIONS = ("none", "mean", "sum", "batchmean")


def _shape(tensor):
    """``[2,2,8,8,8]``-style text for error messages."""
    return "[" + ",".join(str(size) for size in tensor.shape) + "]"


def _check_same_shape(name, first, second):
    """Refuse silent broadcasting between a prediction and its target."""
    if first.shape != second.shape:
        raise ValueError(f"{name}: shapes {_shape(first)} and {_shape(second)} differ")


def _squeeze_channel(tensor, inputs, name, what):
    """Bring a per-voxel tensor given as [B,...] or [B,1,...] to [B,...] matching ``inputs`` [B,C,...].

    Raises ``ValueError`` naming both shapes when batch or spatial sizes differ.
    """
    if tensor.dim() == inputs.dim() and tensor.shape[1] == 1:
        tensor = tensor.squeeze(1)
    if tensor.shape[0] != inputs.shape[0] or tensor.shape[1:] != inputs.shape[2:]:
        raise ValueError(f"{name}: inputs {_shape(inputs)} and {what} {_shape(tensor)} differ in spatial shape")
    return tensor


def _squared_dice_loss(score, target, smooth, mask=None):
    """``1 - (2 sum(s t) + smooth) / (sum(s^2) + sum(t^2) + smooth)``, optionally voxel-weighted."""
    target = target.float()
    if mask is not None:
        score_mask, target_mask = score * mask, target * mask
    else:
        score_mask, target_mask = score, target
    intersect = torch.sum(score_mask * target)
    z_sum = torch.sum(score_mask * score)
    y_sum = torch.sum(target_mask * target)
    return 1.0 - (2.0 * intersect + smooth) / (z_sum + y_sum + smooth)


def dice_loss(score, target, smooth=1e-5):
    """V-Net Dice loss with squared sums in the denominator (UA-MT's ``dice_loss``).

    ``score`` holds foreground probabilities and ``target`` the binary label, of the same shape
    (checked, so a [B,X,Y,Z] / [B,1,X,Y,Z] mix cannot broadcast silently). The sums run over the
    whole batch. On non-binary scores this differs from :func:`dice_loss_plain` because
    ``sum(s^2) < sum(s)``.
    """
    _check_same_shape("dice_loss", score, target)
    return _squared_dice_loss(score, target, smooth)


def dice_loss_plain(score, target, smooth=1e-5):
    """Dice loss with the plain denominator ``sum(s) + sum(t)`` (UA-MT's ``dice_loss1``)."""
    _check_same_shape("dice_loss_plain", score, target)
    target = target.float()
    intersect = torch.sum(score * target)
    return 1.0 - (2.0 * intersect + smooth) / (torch.sum(score) + torch.sum(target) + smooth)


class DiceLoss(nn.Module):
    """Multi-class squared Dice loss, averaged over classes, as SSL4MIS's ``DiceLoss``.

    For each class ``c`` the loss is ``1 - (2 I_c + 1e-5) / (z_c + y_c + 1e-5)`` with
    ``I_c = sum(s_c t_c)``, ``z_c = sum(s_c^2)``, ``y_c = sum(t_c^2)`` over batch and voxels, and
    the result is ``sum_c w_c loss_c / n_classes``. With weights this keeps SSL4MIS's division by
    ``n_classes`` (not by the sum of weights), so weights of 1 give the plain average.
    """

    smooth = 1e-5

    def __init__(self, n_classes):
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"DiceLoss: n_classes must be >= 1, got {n_classes}")
        self.n_classes = n_classes

    def _one_hot(self, target):
        """[B,...] class indices -> [B,C,...] float one-hot on the target's device."""
        classes = torch.arange(self.n_classes, device=target.device)
        classes = classes.view(1, -1, *([1] * (target.dim() - 1)))
        return (target.unsqueeze(1) == classes).float()

    def _class_weights(self, weight):
        """Per-class weights as a list of length ``n_classes`` (all ones when ``weight`` is None)."""
        if weight is None:
            return [1.0] * self.n_classes
        weight = list(weight)
        if len(weight) != self.n_classes:
            raise ValueError(f"DiceLoss: {len(weight)} class weights for {self.n_classes} classes")
        return weight

    def forward(self, inputs, target, weight=None, softmax=False, mask=None):
        """Loss of ``inputs`` [B,C,...] against class indices ``target`` [B,...] or [B,1,...].

        ``inputs`` are probabilities, or logits with ``softmax=True``. ``mask`` ([B,...] or
        [B,1,...]) weights each voxel in the intersection and in both sums, so a zero region is
        ignored entirely.
        """
        if inputs.dim() < 2 or inputs.shape[1] != self.n_classes:
            raise ValueError(
                f"DiceLoss: inputs {_shape(inputs)} should have {self.n_classes} channels in dim 1")
        if softmax:
            inputs = torch.softmax(inputs, dim=1)
        target = _squeeze_channel(target, inputs, "DiceLoss", "target")
        if mask is not None:
            mask = _squeeze_channel(mask, inputs, "DiceLoss", "mask").to(inputs.dtype)
        one_hot = self._one_hot(target)
        loss = 0.0
        for index, class_weight in enumerate(self._class_weights(weight)):
            loss = loss + class_weight * _squared_dice_loss(inputs[:, index], one_hot[:, index], self.smooth, mask)
        return loss / self.n_classes


def cross_entropy(logits, target, mask=None, ignore_index=None):
    """Cross-entropy of ``logits`` [B,C,...] against class indices [B,...] or [B,1,...].

    The target may have any integer (or integral float) dtype; it is cast to ``long``. Without
    ``mask`` this is the usual mean over voxels whose target is not ``ignore_index``. With a voxel
    weight ``mask`` it is ``sum(ce * mask) / max(sum(mask), eps)``, where voxels equal to
    ``ignore_index`` also drop out of the denominator.
    """
    target = _squeeze_channel(target, logits, "cross_entropy", "target").long()
    torch_ignore = -100 if ignore_index is None else ignore_index
    if mask is None:
        return F.cross_entropy(logits, target, ignore_index=torch_ignore)
    mask = _squeeze_channel(mask, logits, "cross_entropy", "mask").to(logits.dtype)
    if ignore_index is not None:
        mask = mask * (target != ignore_index).to(logits.dtype)
    voxel_ce = F.cross_entropy(logits, target, ignore_index=torch_ignore, reduction="none")
    return torch.sum(voxel_ce * mask) / torch.clamp(torch.sum(mask), min=MASK_EPS)


def ce_and_dice(logits, label):
    """The two supervised terms of UA-MT and its descendants, ``(CE(logits, y), DiceLoss(softmax(logits)[:, 1],
    y == 1))``, for two-class ``logits`` [B,2,...] and a binary label [B,...]; the Dice is :func:`dice_loss`
    on the foreground probability."""
    return F.cross_entropy(logits, label.long()), dice_loss(torch.softmax(logits, dim=1)[:, 1], label == 1)


def softmax_mse_loss(input_logits, target_logits):
    """Unreduced ``(softmax(input) - softmax(target))^2`` map of shape [B,C,...] (UA-MT).

    UA-MT multiplies this map by its uncertainty mask before reducing, so no reduction happens
    here. Gradients flow into both arguments: detach the teacher's logits at the call site when
    they must not be trained through.
    """
    _check_same_shape("softmax_mse_loss", input_logits, target_logits)
    return (F.softmax(input_logits, dim=1) - F.softmax(target_logits, dim=1)) ** 2


def softmax_kl_loss(input_logits, target_logits, reduction="none"):
    """``KL(softmax(target) || softmax(input))`` via ``F.kl_div`` (UA-MT's ``softmax_kl_loss``).

    ``reduction`` is ``"none"`` (per-element map [B,C,...]), ``"mean"``, ``"sum"`` or
    ``"batchmean"``, with ``F.kl_div``'s meaning. As in :func:`softmax_mse_loss` the target is not
    detached here.
    """
    _check_same_shape("softmax_kl_loss", input_logits, target_logits)
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"softmax_kl_loss: reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    return F.kl_div(F.log_softmax(input_logits, dim=1), F.softmax(target_logits, dim=1), reduction=reduction)


def masked_mean(values, mask, eps=1e-16):
    """Mean of ``values`` [B,C,...] over the voxels where ``mask`` [B,1,...] (or [B,C,...]) is set.

    ``sum(mask * values) / (sum of the mask broadcast to values' shape + eps)``, i.e. UA-MT's
    ``sum(mask * mse) / (2 * sum(mask) + 1e-16)`` for a 2-channel map and a 1-channel mask: the average
    over channels and selected voxels. An empty mask gives 0 (and no gradient), not NaN.
    """
    mask = mask.to(values.dtype)
    weights = mask.expand_as(values)
    return torch.sum(weights * values) / (torch.sum(weights) + eps)


def voxel_entropy(prob, dim=1, eps=1e-6, normalize=False):
    """Per-voxel entropy ``-sum_c p_c log(p_c + eps)`` over the class dimension ``dim``.

    Returns the input shape without ``dim``. ``normalize=True`` divides by ln(C) so the maximum
    (uniform prediction) is 1; that needs at least two classes.
    """
    entropy = -torch.sum(prob * torch.log(prob + eps), dim=dim)
    if not normalize:
        return entropy
    num_classes = prob.shape[dim]
    if num_classes < 2:
        raise ValueError(f"voxel_entropy: normalize needs >= 2 classes, got {num_classes}")
    return entropy / math.log(num_classes)


def entropy_loss(prob, eps=1e-6):
    """Mean normalised voxel entropy of ``prob`` [B,C,...] (SSL4MIS entropy minimisation), a scalar."""
    return torch.mean(voxel_entropy(prob, dim=1, eps=eps, normalize=True))


def _inner_boundary(foreground):
    """Foreground voxels with a background face-neighbour (skimage ``find_boundaries(mode='inner')``).

    skimage compares grey dilation and erosion with a face-connected structure and reflected
    edges, so the volume border never creates a boundary; eroding with ``border_value=1`` is the
    binary equivalent.
    """
    structure = ndimage.generate_binary_structure(foreground.ndim, 1)
    return foreground & ~ndimage.binary_erosion(foreground, structure=structure, border_value=1)


def require_edt():
    """One-line error when the ``edt`` package, which :func:`compute_sdf` uses, is not installed."""
    if edt is None:
        raise UserError("the signed-distance targets need the edt package: pip install -r requirements.txt")


def distance_to_background(mask):
    """Euclidean distance of every True voxel of the boolean ``mask`` to the nearest False voxel (0 on False
    voxels), float32: ``scipy.ndimage.distance_transform_edt``'s values within 1e-5 (tests/test_losses.py) at
    about half its time (the ``edt`` package; docs/benchmarks.md), single-threaded, as it runs in the loader's
    workers."""
    require_edt()
    return edt.edt(mask, black_border=False, parallel=1)


def _normalised_sdf(foreground):
    """DTC's normalised signed distance of one item that has both foreground and background.

    ``posdis`` (distance of foreground voxels to the background) and ``negdis`` (of background
    voxels to the foreground) are zero on the other side and at least 1 on their own, so both
    min-max ranges are >= 1 and the divisions are safe. Inner-boundary voxels are set to 0.
    """
    posdis = distance_to_background(foreground)
    negdis = distance_to_background(~foreground)
    sdf = (negdis - negdis.min()) / (negdis.max() - negdis.min()) \
        - (posdis - posdis.min()) / (posdis.max() - posdis.min())
    sdf[_inner_boundary(foreground)] = 0.0
    return sdf


def compute_sdf(img_gt, out_shape):
    """DTC's normalised signed distance map of a batch of binary masks ``img_gt`` [B, ...].

    Per item: negative inside (down to -1 at the deepest voxel), positive outside (up to 1 at the
    farthest voxel), exactly 0 on the inner boundary (foreground voxels with a background
    face-neighbour). Nonzero values count as foreground. Items without foreground stay all zero,
    as in DTC. An item that is all foreground has no background to measure from (DTC divides by
    zero there); it is defined as -1 everywhere, i.e. entirely inside, with no boundary. No NaN is
    ever produced. ``out_shape`` must equal ``img_gt.shape`` (DTC passes the network output's
    shape); the result is a float32 numpy array.
    """
    img_gt = np.asarray(img_gt)
    if tuple(out_shape) != img_gt.shape:
        raise ValueError(f"compute_sdf: out_shape {tuple(out_shape)} differs from img_gt shape {img_gt.shape}")
    sdf = np.zeros(img_gt.shape, dtype=np.float32)
    for index, item in enumerate(img_gt):
        foreground = item != 0
        if foreground.all():
            sdf[index] = -1.0
        elif foreground.any():
            sdf[index] = _normalised_sdf(foreground)
    return sdf
