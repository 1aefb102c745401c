"""Ramp schedules against hand-computed values."""
import math

import pytest

from utils import ramps


@pytest.mark.parametrize("current, expected", [
    (0, math.exp(-5.0)),
    (5, math.exp(-1.25)),
    (10, 1.0),
    (25, 1.0),
    (-3, math.exp(-5.0)),
])
def test_sigmoid_rampup_values(current, expected):
    assert ramps.sigmoid_rampup(current, 10) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("current, expected", [(0, 0.0), (5, 0.5), (10, 1.0), (25, 1.0), (-3, 0.0)])
def test_linear_rampup_values(current, expected):
    assert ramps.linear_rampup(current, 10) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("current, expected", [(0, 1.0), (5, 0.5), (10, 0.0), (25, 0.0), (-3, 1.0)])
def test_cosine_rampdown_values(current, expected):
    assert ramps.cosine_rampdown(current, 10) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("current, expected", [(0, 0.0), (5, 0.5), (10, 1.0), (25, 1.0)])
def test_cosine_rampup_values(current, expected):
    assert ramps.cosine_rampup(current, 10) == pytest.approx(expected, abs=1e-12)


def test_cosine_rampup_quarter_point():
    assert ramps.cosine_rampup(2.5, 10) == pytest.approx(1.0 - 0.5 * (math.cos(math.pi / 4) + 1.0))


def test_zero_length_means_no_ramp():
    assert ramps.sigmoid_rampup(0, 0) == 1.0
    assert ramps.linear_rampup(0, 0) == 1.0
    assert ramps.cosine_rampup(0, 0) == 1.0
    assert ramps.cosine_rampdown(0, 0) == 0.0


@pytest.mark.parametrize("ramp", [ramps.sigmoid_rampup, ramps.linear_rampup,
                                  ramps.cosine_rampup, ramps.cosine_rampdown])
def test_negative_length_raises(ramp):
    with pytest.raises(ValueError, match="must be >= 0"):
        ramp(1, -1)


@pytest.mark.parametrize("ramp", [ramps.sigmoid_rampup, ramps.linear_rampup,
                                  ramps.cosine_rampup, ramps.cosine_rampdown])
def test_ramps_return_python_float(ramp):
    assert type(ramp(3, 10)) is float


def test_consistency_weight_uamt_schedule():
    assert ramps.consistency_weight(0, 0.1, 40) == pytest.approx(0.1 * math.exp(-5.0), rel=1e-12)
    assert ramps.consistency_weight(6000, 0.1, 40) == pytest.approx(0.1, rel=1e-12)
    assert ramps.consistency_weight(3000, 0.1, 40) == pytest.approx(0.1 * math.exp(-1.25), rel=1e-12)


def test_consistency_weight_advances_per_epoch_not_per_iteration():
    """Iteration 5999 is still epoch 39, one step short of the full weight."""
    expected = 0.1 * math.exp(-5.0 * (1.0 / 40.0) ** 2)
    assert ramps.consistency_weight(5999, 0.1, 40) == pytest.approx(expected, rel=1e-12)
    assert ramps.consistency_weight(149, 0.1, 40) == ramps.consistency_weight(0, 0.1, 40)


def test_consistency_weight_custom_ramp_and_epoch_length():
    assert ramps.consistency_weight(50, 2.0, 10, iterations_per_epoch=10, ramp=ramps.linear_rampup) \
        == pytest.approx(1.0)
    with pytest.raises(ValueError, match="iterations_per_epoch"):
        ramps.consistency_weight(0, 0.1, 40, iterations_per_epoch=0)


def test_uncertainty_threshold_end_points():
    ln2 = math.log(2.0)
    assert ramps.uncertainty_threshold(0, 6000) == pytest.approx((0.75 + 0.25 * math.exp(-5.0)) * ln2, rel=1e-12)
    assert ramps.uncertainty_threshold(6000, 6000) == pytest.approx(ln2, rel=1e-12)
    with pytest.raises(ValueError):
        ramps.uncertainty_threshold(0, -1)
