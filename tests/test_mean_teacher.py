"""Shared mean-teacher pieces: teacher input noise, MC-dropout uncertainty, the certainty mask, masked means."""
import math

import pytest
import torch

from utils.ema import teacher_input
from utils.losses import masked_mean, voxel_entropy
from utils.ramps import LN2, uncertainty_threshold
from utils.uncertainty import certain_mask, mc_dropout_uncertainty


def test_teacher_input_noise_is_clamped_and_seeded():
    x = torch.zeros(2, 1, 8, 8, 8)
    torch.manual_seed(0)
    first = teacher_input(x)
    torch.manual_seed(0)
    assert torch.equal(first, teacher_input(x))
    assert first.abs().max() <= 0.2 and first.std() > 0.05
    assert (first.abs() == 0.2).any()  # the clamp is reached at 2 sigma


class CountingNet:
    """Probabilities that depend only on the input sign (noise-robust), counting forward calls and sizes."""

    def __init__(self, fg):
        self.fg, self.calls = fg, []

    def __call__(self, x):
        self.calls.append(x.shape[0])
        fg = self.fg.expand(x.shape[0], *self.fg.shape[1:])
        return torch.cat([1 - fg, fg], dim=1)


def test_mc_uncertainty_groups_passes_and_returns_the_entropy_of_the_mean():
    fg = torch.rand(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    net = CountingNet(fg)
    x = torch.zeros(3, 1, 4, 4, 4)
    mean, uncertainty = mc_dropout_uncertainty(net, x, passes=5, passes_per_forward=2)
    assert net.calls == [6, 6, 3]  # 2 + 2 + 1 copies of the batch of 3
    assert mean.shape == (3, 2, 4, 4, 4) and uncertainty.shape == (3, 1, 4, 4, 4)
    expected = voxel_entropy(torch.cat([1 - fg, fg], dim=1), eps=1e-6).expand(3, 4, 4, 4)
    torch.testing.assert_close(uncertainty[:, 0], expected)


def test_mc_uncertainty_of_stochastic_passes_exceeds_each_pass():
    """Disagreeing passes (a dropout network) give higher entropy than any single pass: entropy is concave."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 1), torch.nn.Dropout3d(0.5), torch.nn.Conv3d(8, 2, 1))
    x = torch.randn(2, 1, 4, 4, 4)
    probs = lambda inp: torch.softmax(net(inp), dim=1)  # noqa: E731
    mean, uncertainty = mc_dropout_uncertainty(probs, x, passes=8)
    assert torch.allclose(mean.sum(dim=1), torch.ones(2, 4, 4, 4))
    assert (uncertainty >= 0).all() and (uncertainty < LN2).all()
    assert uncertainty.requires_grad is False


def test_certain_mask_extremes():
    uncertainty = torch.tensor([0.0, 0.1, 0.5, LN2 - 1e-6]).view(1, 1, 4, 1, 1)
    assert certain_mask(uncertainty, 0.0).sum() == 0  # nothing is strictly below 0
    assert certain_mask(uncertainty, LN2 + 1e-3).sum() == 4  # every entropy lies below ln 2
    assert certain_mask(uncertainty, 0.3).flatten().tolist() == [1.0, 1.0, 0.0, 0.0]
    # the largest entropy the uncertainty can take (a 50/50 mean prediction) is still below ln 2
    assert voxel_entropy(torch.full((1, 2, 1), 0.5), eps=1e-6).item() < LN2


def test_threshold_ramp_from_start_to_end():
    assert uncertainty_threshold(6000, 6000, 0.5, 0.9) == pytest.approx(0.9 * LN2)
    assert uncertainty_threshold(0, 6000, 0.5, 0.9) == pytest.approx((0.5 + 0.4 * math.exp(-5)) * LN2)
    assert uncertainty_threshold(3000, 6000) == pytest.approx((0.75 + 0.25 * math.exp(-1.25)) * LN2)


def test_masked_mean_is_the_ua_mt_normalisation():
    values = torch.arange(16.0).view(1, 2, 8, 1, 1)
    mask = torch.zeros(1, 1, 8, 1, 1)
    mask[0, 0, :2] = 1
    # UA-MT: sum(mask * mse) / (2 * sum(mask)): the mean over channels and selected voxels
    assert masked_mean(values, mask).item() == pytest.approx((0 + 1 + 8 + 9) / 4)
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0
    values.requires_grad_(True)
    masked_mean(values, mask).backward()
    assert values.grad[0, :, 2:].abs().sum() == 0 and (values.grad[0, :, :2] == 0.25).all()
