"""Per-case metrics, largest connected component and the test-set summary."""
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from utils import metrics


def _cube(start, side, size=32, shift=(0, 0, 0)):
    mask = np.zeros((size,) * 3, dtype=np.uint8)
    corner = [start + offset for offset in shift]
    mask[tuple(slice(c, c + side) for c in corner)] = 1
    return mask


def _surface_points(mask, spacing=(1.0, 1.0, 1.0)):
    """Physical coordinates of the voxels that a face-connected erosion removes (medpy's surface)."""
    mask = mask.astype(bool)
    surface = mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1))
    return np.argwhere(surface) * np.asarray(spacing)


def _directed_surface_distances(source, target):
    """For each surface voxel of ``source``, the distance to the nearest surface voxel of ``target``."""
    return cdist(_surface_points(source), _surface_points(target)).min(axis=1)


def test_dice_and_jaccard_of_overlapping_cubes():
    """Two 6^3 cubes overlapping in 4^3: dice = 2*64/432 = 8/27, jaccard = 64/368 = 4/23."""
    result = metrics.calculate_metric_percase(_cube(2, 6), _cube(4, 6))
    assert result["dice"] == pytest.approx(8.0 / 27.0, rel=1e-12)
    assert result["jaccard"] == pytest.approx(4.0 / 23.0, rel=1e-12)
    assert result["empty_pred"] is False and result["empty_gt"] is False


def test_single_voxels_three_apart():
    pred = np.zeros((8, 8, 8), dtype=bool)
    gt = np.zeros_like(pred)
    pred[1, 1, 1] = True
    gt[1, 1, 4] = True
    result = metrics.calculate_metric_percase(pred, gt)
    assert result["hd95"] == pytest.approx(3.0)
    assert result["asd"] == pytest.approx(3.0)
    assert result["dice"] == 0.0


@pytest.mark.parametrize("shift", [1, 3])
def test_shifted_cube_hd95_equals_shift(shift):
    """The two faces orthogonal to the shift are k away from everything of the other cube and make
    up about a third of each surface, so the 95th percentile is exactly k."""
    gt = _cube(4, 20)
    pred = _cube(4, 20, shift=(shift, 0, 0))
    result = metrics.calculate_metric_percase(pred, gt)
    assert result["hd95"] == pytest.approx(float(shift))
    both_ways = np.hstack([_directed_surface_distances(pred, gt), _directed_surface_distances(gt, pred)])
    assert result["hd95"] == pytest.approx(np.percentile(both_ways, 95))


def test_shifted_cube_asd_matches_brute_force():
    gt = _cube(3, 10, size=16)
    pred = _cube(3, 10, size=16, shift=(2, 0, 0))
    result = metrics.calculate_metric_percase(pred, gt)
    assert result["asd"] == pytest.approx(_directed_surface_distances(pred, gt).mean(), rel=1e-12)
    assert 0.0 < result["asd"] < 2.0


def test_asd_is_directed_from_prediction_to_label():
    """A small cube inside a big one: its surface is far from the big surface, not vice versa."""
    gt = _cube(2, 12, size=16)
    pred = _cube(6, 4, size=16)
    result = metrics.calculate_metric_percase(pred, gt)
    pred_to_gt = _directed_surface_distances(pred, gt).mean()
    gt_to_pred = _directed_surface_distances(gt, pred).mean()
    assert result["asd"] == pytest.approx(pred_to_gt, rel=1e-12)
    assert pred_to_gt != pytest.approx(gt_to_pred, rel=1e-3)


def test_isotropic_spacing_scales_distances():
    gt = _cube(4, 20)
    pred = _cube(4, 20, shift=(3, 1, 0))
    in_voxels = metrics.calculate_metric_percase(pred, gt)
    in_mm = metrics.calculate_metric_percase(pred, gt, spacing=(2.5, 2.5, 2.5))
    assert in_mm["hd95"] == pytest.approx(2.5 * in_voxels["hd95"], rel=1e-12)
    assert in_mm["asd"] == pytest.approx(2.5 * in_voxels["asd"], rel=1e-12)
    assert in_mm["dice"] == in_voxels["dice"]


def test_anisotropic_spacing_along_the_shift_axis():
    gt = _cube(4, 20)
    pred = _cube(4, 20, shift=(3, 0, 0))
    assert metrics.calculate_metric_percase(pred, gt, spacing=(2.0, 1.0, 1.0))["hd95"] == pytest.approx(6.0)


def test_empty_prediction():
    result = metrics.calculate_metric_percase(np.zeros((8, 8, 8)), _cube(2, 3, size=8))
    assert result["dice"] == 0.0 and result["jaccard"] == 0.0
    assert math.isnan(result["hd95"]) and math.isnan(result["asd"])
    assert result["empty_pred"] is True and result["empty_gt"] is False


def test_empty_label():
    result = metrics.calculate_metric_percase(_cube(2, 3, size=8), np.zeros((8, 8, 8)))
    assert result["dice"] == 0.0 and result["jaccard"] == 0.0
    assert math.isnan(result["hd95"]) and math.isnan(result["asd"])
    assert result["empty_pred"] is False and result["empty_gt"] is True


def test_both_empty_is_perfect():
    result = metrics.calculate_metric_percase(np.zeros((8, 8, 8)), np.zeros((8, 8, 8), dtype=bool))
    assert result == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0,
                      "empty_pred": True, "empty_gt": True}


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(8, 8, 8\).*\(8, 8, 9\)"):
        metrics.calculate_metric_percase(np.zeros((8, 8, 8)), np.zeros((8, 8, 9)))


@pytest.mark.parametrize("dtype", [np.uint8, bool])
def test_lcc_keeps_bigger_blob(dtype):
    mask = np.zeros((12, 12, 12), dtype=dtype)
    mask[1:4, 1:4, 1:4] = 1
    mask[8:10, 8:10, 8:10] = 1
    kept = metrics.largest_connected_component(mask)
    assert kept.dtype == np.dtype(dtype)
    expected = np.zeros_like(mask)
    expected[1:4, 1:4, 1:4] = 1
    np.testing.assert_array_equal(kept, expected)


def test_lcc_corner_touching_voxels_are_connected():
    """A diagonal chain of three voxels is one 26-connected component and beats a face pair."""
    mask = np.zeros((10, 10, 10), dtype=np.uint8)
    chain = [(0, 0, 0), (1, 1, 1), (2, 2, 2)]
    for voxel in chain:
        mask[voxel] = 1
    mask[7, 7, 7] = mask[7, 7, 8] = 1
    kept = metrics.largest_connected_component(mask)
    assert sorted(map(tuple, np.argwhere(kept))) == chain


def test_lcc_tie_keeps_first_component():
    mask = np.zeros((10, 10, 10), dtype=np.uint8)
    mask[1, 1, 1:3] = 1
    mask[6, 6, 6:8] = 1
    kept = metrics.largest_connected_component(mask)
    assert sorted(map(tuple, np.argwhere(kept))) == [(1, 1, 1), (1, 1, 2)]


def test_lcc_empty_mask():
    kept = metrics.largest_connected_component(np.zeros((4, 4, 4), dtype=bool))
    assert kept.dtype == bool and not kept.any()


def _row(dice, hd95, empty_pred=False, empty_gt=False):
    return {"dice": dice, "jaccard": dice, "hd95": hd95, "asd": hd95,
            "empty_pred": empty_pred, "empty_gt": empty_gt}


def test_summarize_ignores_nan_and_counts_empties():
    rows = [_row(1.0, 2.0), _row(0.5, 4.0), _row(0.0, math.nan, empty_pred=True)]
    summary = metrics.summarize_metrics(rows)
    assert summary["dice"] == {"mean": pytest.approx(0.5), "std": pytest.approx(math.sqrt(1.0 / 6.0)), "n": 3}
    assert summary["hd95"] == {"mean": pytest.approx(3.0), "std": pytest.approx(1.0), "n": 2}
    assert summary["num_cases"] == 3
    assert summary["num_empty_pred"] == 1
    assert summary["num_empty_gt"] == 0


def test_summarize_without_finite_values():
    summary = metrics.summarize_metrics([_row(0.0, math.nan, empty_gt=True)], keys=("hd95",))
    assert math.isnan(summary["hd95"]["mean"]) and summary["hd95"]["n"] == 0
    assert set(summary) == {"hd95", "num_cases", "num_empty_pred", "num_empty_gt"}
    assert summary["num_empty_gt"] == 1


def test_summarize_missing_key():
    with pytest.raises(ValueError, match="row 0 lacks asd"):
        metrics.summarize_metrics([{"dice": 1.0, "jaccard": 1.0, "hd95": 0.0,
                                    "empty_pred": False, "empty_gt": False}])
