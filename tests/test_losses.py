"""Losses against hand-computed values, and DTC's signed distance map."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from conftest import REAL_LA, REAL_LA_ABSENT
from utils import losses

SMOOTH = 1e-5


def _scores_and_target():
    """Four voxels: scores [.5, .5, 1, 0] against labels [1, 0, 1, 0].

    sum(s t) = 1.5, sum(s^2) = 1.5, sum(s) = 2, sum(t^2) = sum(t) = 2.
    """
    return torch.tensor([0.5, 0.5, 1.0, 0.0]), torch.tensor([1, 0, 1, 0])


def _random_logits(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator)


def _random_labels(n_classes, *shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_classes, shape, generator=generator)


def test_dice_loss_squared_form_by_hand():
    score, target = _scores_and_target()
    expected = 1.0 - (3.0 + SMOOTH) / (1.5 + 2.0 + SMOOTH)
    assert losses.dice_loss(score, target).item() == pytest.approx(expected, rel=1e-6)


def test_dice_loss_plain_form_by_hand():
    score, target = _scores_and_target()
    expected = 1.0 - (3.0 + SMOOTH) / (2.0 + 2.0 + SMOOTH)
    assert losses.dice_loss_plain(score, target).item() == pytest.approx(expected, rel=1e-6)


def test_dice_forms_agree_on_binary_scores():
    target = torch.tensor([1, 0, 1, 1, 0])
    score = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0])
    assert losses.dice_loss(score, target).item() == pytest.approx(losses.dice_loss_plain(score, target).item())


def test_dice_loss_refuses_broadcasting():
    with pytest.raises(ValueError, match=r"\[2,8\] and \[2,1,8\]"):
        losses.dice_loss(torch.rand(2, 8), torch.ones(2, 1, 8))


def test_multiclass_dice_by_hand():
    """Class 1 is the four-voxel example; class 0 is its complement, which gives the same numbers."""
    score, target = _scores_and_target()
    inputs = torch.stack([1.0 - score, score]).unsqueeze(0)
    per_class = 1.0 - (3.0 + SMOOTH) / (3.5 + SMOOTH)
    loss = losses.DiceLoss(2)(inputs, target.unsqueeze(0))
    assert loss.item() == pytest.approx(per_class, rel=1e-6)
    weighted = losses.DiceLoss(2)(inputs, target.unsqueeze(0), weight=[1.0, 0.0])
    assert weighted.item() == pytest.approx(per_class / 2.0, rel=1e-6)


def test_multiclass_dice_perfect_prediction_is_zero():
    target = _random_labels(3, 2, 6, 6, 6)
    inputs = F.one_hot(target, 3).permute(0, 4, 1, 2, 3).float()
    assert losses.DiceLoss(3)(inputs, target).item() == pytest.approx(0.0, abs=1e-6)


def test_multiclass_dice_target_with_or_without_channel():
    inputs = torch.softmax(_random_logits(2, 3, 5, 5, 5), dim=1)
    target = _random_labels(3, 2, 5, 5, 5)
    loss = losses.DiceLoss(3)
    assert loss(inputs, target).item() == pytest.approx(loss(inputs, target.unsqueeze(1)).item(), rel=1e-7)


def test_multiclass_dice_softmax_flag():
    logits = _random_logits(2, 2, 4, 4, 4)
    target = _random_labels(2, 2, 4, 4, 4)
    loss = losses.DiceLoss(2)
    assert loss(logits, target, softmax=True).item() == pytest.approx(
        loss(torch.softmax(logits, dim=1), target).item(), rel=1e-7)


def test_multiclass_dice_mask_ignores_zero_region():
    """A mask zero on the last half of the volume gives the loss of the first half alone."""
    inputs = torch.softmax(_random_logits(2, 2, 8, 8, 8), dim=1)
    target = _random_labels(2, 2, 8, 8, 8)
    mask = torch.zeros(2, 1, 8, 8, 8)
    mask[..., :4] = 1.0
    loss = losses.DiceLoss(2)
    masked = loss(inputs, target, mask=mask)
    cropped = loss(inputs[..., :4], target[..., :4])
    assert masked.item() == pytest.approx(cropped.item(), rel=1e-6)
    assert masked.item() != pytest.approx(loss(inputs, target).item(), rel=1e-3)


def test_multiclass_dice_shape_errors():
    loss = losses.DiceLoss(2)
    with pytest.raises(ValueError, match=r"inputs \[2,2,8,8,8\] and target \[2,8,8\] differ in spatial shape"):
        loss(torch.rand(2, 2, 8, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="3 channels"):
        losses.DiceLoss(3)(torch.rand(2, 2, 8, 8, 8), torch.zeros(2, 8, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="class weights"):
        loss(torch.rand(1, 2, 4), torch.zeros(1, 4, dtype=torch.long), weight=[1.0])


def test_cross_entropy_mask_equals_ce_over_masked_voxels():
    logits = _random_logits(2, 3, 4, 4, 4)
    target = _random_labels(3, 2, 4, 4, 4)
    mask = _random_labels(2, 2, 4, 4, 4, seed=1).bool()
    flat_logits = logits.permute(0, 2, 3, 4, 1)[mask]
    expected = F.cross_entropy(flat_logits, target[mask])
    got = losses.cross_entropy(logits, target.unsqueeze(1).to(torch.uint8), mask=mask.unsqueeze(1).float())
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_cross_entropy_fractional_mask_and_plain_mean():
    logits = _random_logits(1, 2, 6)
    target = _random_labels(2, 1, 6)
    mask = torch.tensor([[0.0, 0.5, 1.0, 0.25, 0.0, 1.0]])
    voxel_ce = F.cross_entropy(logits, target, reduction="none")
    expected = (voxel_ce * mask).sum() / mask.sum()
    assert losses.cross_entropy(logits, target, mask=mask).item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses.cross_entropy(logits, target).item() == pytest.approx(voxel_ce.mean().item(), rel=1e-6)


def test_cross_entropy_empty_mask_is_zero_not_nan():
    logits = _random_logits(1, 2, 6)
    target = _random_labels(2, 1, 6)
    assert losses.cross_entropy(logits, target, mask=torch.zeros(1, 6)).item() == 0.0


def test_cross_entropy_ignore_index():
    logits = _random_logits(1, 2, 6)
    target = torch.tensor([[0, 1, 255, 1, 0, 255]])
    kept = target != 255
    expected = F.cross_entropy(logits.permute(0, 2, 1)[kept], target[kept])
    assert losses.cross_entropy(logits, target, ignore_index=255).item() == pytest.approx(expected.item(), rel=1e-6)
    masked = losses.cross_entropy(logits, target, mask=torch.ones(1, 6), ignore_index=255)
    assert masked.item() == pytest.approx(expected.item(), rel=1e-6)


def test_cross_entropy_shape_error():
    with pytest.raises(ValueError, match="differ in spatial shape"):
        losses.cross_entropy(torch.rand(2, 2, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long))


def test_softmax_mse_loss_unreduced_by_hand():
    logits = _random_logits(2, 3, 4, 4, 4)
    assert losses.softmax_mse_loss(logits, logits).shape == (2, 3, 4, 4, 4)
    assert torch.count_nonzero(losses.softmax_mse_loss(logits, logits)) == 0
    first = torch.tensor([[0.0, 0.0]])
    second = torch.tensor([[math.log(3.0), 0.0]])
    assert torch.allclose(losses.softmax_mse_loss(first, second), torch.tensor([[0.0625, 0.0625]]))


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
def test_softmax_kl_loss_reductions_and_sign():
    student = _random_logits(2, 3, 4, 4, seed=1)
    teacher = _random_logits(2, 3, 4, 4, seed=2)
    per_element = losses.softmax_kl_loss(student, teacher)
    assert per_element.shape == (2, 3, 4, 4)
    assert torch.all(per_element.sum(dim=1) >= -1e-7)
    assert losses.softmax_kl_loss(student, teacher, "sum").item() > 0.0
    assert losses.softmax_kl_loss(student, teacher, "mean").item() == pytest.approx(per_element.mean().item())
    assert losses.softmax_kl_loss(student, teacher, "batchmean").item() == pytest.approx(per_element.sum().item() / 2)
    assert losses.softmax_kl_loss(student, student, "sum").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        losses.softmax_kl_loss(student, teacher, "avg")


def test_softmax_kl_loss_by_hand():
    """KL([.75, .25] || [.5, .5]) = .75 ln 1.5 + .25 ln .5."""
    kl = losses.softmax_kl_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), "sum")
    assert kl.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-5)


def test_voxel_entropy_uniform_and_one_hot():
    uniform = torch.full((2, 4, 3, 3, 3), 0.25)
    entropy = losses.voxel_entropy(uniform)
    assert entropy.shape == (2, 3, 3, 3)
    assert torch.allclose(entropy, torch.full_like(entropy, math.log(4.0)), atol=1e-5)
    normalized = losses.voxel_entropy(uniform, normalize=True)
    assert torch.allclose(normalized, torch.ones_like(normalized), atol=1e-5)
    one_hot = F.one_hot(_random_labels(4, 2, 3, 3, 3), 4).permute(0, 4, 1, 2, 3).float()
    assert losses.voxel_entropy(one_hot).abs().max().item() < 1e-4
    assert losses.entropy_loss(uniform).item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="2 classes"):
        losses.voxel_entropy(torch.ones(1, 1, 3), normalize=True)


def _assert_gradient_flows(tensor):
    assert tensor.grad is not None
    assert torch.isfinite(tensor.grad).all()
    assert tensor.grad.abs().sum().item() > 0.0


@pytest.mark.parametrize("loss_fn", [
    lambda logits, target: losses.dice_loss(torch.softmax(logits, 1)[:, 1], target),
    lambda logits, target: losses.DiceLoss(2)(logits, target, softmax=True),
    lambda logits, target: losses.cross_entropy(logits, target),
    lambda logits, target: losses.softmax_mse_loss(logits, torch.zeros_like(logits)).mean(),
], ids=["dice_loss", "DiceLoss", "cross_entropy", "softmax_mse_loss"])
def test_gradients_flow(loss_fn):
    logits = _random_logits(2, 2, 4, 4, 4).requires_grad_()
    loss_fn(logits, _random_labels(2, 2, 4, 4, 4)).backward()
    _assert_gradient_flows(logits)


def _ball(size=32, radius=8.0):
    grid = np.indices((size,) * 3) - size // 2
    return (np.sqrt((grid ** 2).sum(axis=0)) <= radius).astype(np.uint8)


def _inner_boundary_by_neighbours(mask):
    """Foreground voxels with a background voxel among their in-volume face neighbours."""
    mask = mask.astype(bool)
    has_background_neighbour = np.zeros_like(mask)
    for axis in range(mask.ndim):
        for step in (1, -1):
            neighbour = np.roll(mask, step, axis=axis)
            edge = [slice(None)] * mask.ndim
            edge[axis] = 0 if step == 1 else -1
            neighbour[tuple(edge)] = True
            has_background_neighbour |= ~neighbour
    return mask & has_background_neighbour


def _scipy_sdf(foreground):
    """:func:`losses.compute_sdf` of one item written with scipy's distance transform, the one it replaced."""
    posdis = ndimage.distance_transform_edt(foreground)
    negdis = ndimage.distance_transform_edt(~foreground)
    sdf = (negdis - negdis.min()) / (negdis.max() - negdis.min()) \
        - (posdis - posdis.min()) / (posdis.max() - posdis.min())
    sdf[losses._inner_boundary(foreground)] = 0.0
    return sdf


def _random_blobs(shape, seed):
    """A smoothed random field thresholded into irregular blobs touching the borders, both classes present."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma=3)
    return field > np.quantile(field, 0.7)


@pytest.mark.parametrize("shape", [(48, 40, 24), (33, 17, 9), (112, 112, 80)])
def test_distance_transform_equals_scipys(shape):
    for seed in range(3):
        mask = _random_blobs(shape, seed)
        for side in (mask, ~mask):
            fast = losses.distance_to_background(side)
            assert fast.shape == side.shape
            np.testing.assert_allclose(fast, ndimage.distance_transform_edt(side), rtol=0, atol=1e-5)
        np.testing.assert_allclose(losses.compute_sdf(mask[None], (1,) + shape)[0], _scipy_sdf(mask), rtol=0,
                                   atol=1e-5)


@pytest.mark.skipif(REAL_LA is None, reason=REAL_LA_ABSENT)
def test_sdf_of_real_la_crops_equals_scipys():
    """Crops of the real labels, where the training takes them: 112x112x80 around the atrium."""
    from dataloaders.h5io import read_case
    from dataloaders.la_heart import case_path, read_list

    for case in read_list(REAL_LA / "train.list")[:3]:
        label = read_case(case_path(REAL_LA, case))[1] != 0
        centre = np.argwhere(label).mean(axis=0).astype(int)
        start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, (112, 112, 80), label.shape)]
        crop = label[start[0]:start[0] + 112, start[1]:start[1] + 112, start[2]:start[2] + 80]
        np.testing.assert_allclose(losses.compute_sdf(crop[None], (1,) + crop.shape)[0], _scipy_sdf(crop), rtol=0,
                                   atol=1e-5)


def test_compute_sdf_1d_by_hand():
    """posdis = [0,0,1,2,1,0], negdis = [2,1,0,0,0,1], both maxima 2; indices 2 and 4 are boundary."""
    sdf = losses.compute_sdf(np.array([[0, 0, 1, 1, 1, 0]]), (1, 6))
    np.testing.assert_allclose(sdf, [[1.0, 0.5, 0.0, -1.0, 0.0, 0.5]])


def test_compute_sdf_volume_border_is_not_boundary():
    """posdis = [3,2,1,0,0,0], negdis = [0,0,0,1,2,3]; only index 2 touches the background."""
    sdf = losses.compute_sdf(np.array([[1, 1, 1, 0, 0, 0]]), (1, 6))
    np.testing.assert_allclose(sdf, [[-1.0, -2.0 / 3.0, 0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0]], rtol=1e-6)


def test_compute_sdf_ball():
    ball = _ball()
    sdf = losses.compute_sdf(ball[None], (1,) + ball.shape)[0]
    assert sdf.dtype == np.float32
    boundary = _inner_boundary_by_neighbours(ball)
    foreground = ball.astype(bool)
    assert boundary.sum() > 0
    np.testing.assert_array_equal(sdf == 0.0, boundary)
    assert np.all(sdf[foreground & ~boundary] < 0.0)
    assert np.all(sdf[~foreground] > 0.0)
    assert sdf.min() == -1.0 and sdf.max() == 1.0
    assert sdf[16, 16, 16] == -1.0
    assert sdf[0, 0, 0] == 1.0


def test_compute_sdf_batch_items_are_independent():
    ball = _ball(size=16, radius=4.0)
    shifted = np.roll(ball, 3, axis=0)
    empty = np.zeros_like(ball)
    batch = np.stack([ball, empty, shifted])
    sdf = losses.compute_sdf(batch, batch.shape)
    np.testing.assert_array_equal(sdf[0], losses.compute_sdf(ball[None], (1,) + ball.shape)[0])
    np.testing.assert_array_equal(sdf[1], 0.0)
    np.testing.assert_array_equal(sdf[2], losses.compute_sdf(shifted[None], (1,) + ball.shape)[0])


def test_compute_sdf_degenerate_items_have_no_nan():
    single = np.zeros((1, 8, 8, 8), dtype=np.uint8)
    single[0, 4, 4, 4] = 1
    sdf_single = losses.compute_sdf(single, single.shape)
    assert np.isfinite(sdf_single).all()
    assert sdf_single[0, 4, 4, 4] == 0.0
    assert sdf_single.max() == 1.0
    full = np.ones((1, 8, 8, 8), dtype=bool)
    sdf_full = losses.compute_sdf(full, full.shape)
    np.testing.assert_array_equal(sdf_full, -1.0)


def test_compute_sdf_out_shape_must_match():
    with pytest.raises(ValueError, match="out_shape"):
        losses.compute_sdf(np.zeros((2, 4, 4, 4)), (2, 1, 4, 4, 4))
