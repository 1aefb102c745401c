"""Per-case segmentation metrics, post-processing and their summary over a test set.

The metrics are the four reported by UA-MT, DTC and MC-Net on the LA dataset (Dice, Jaccard,
95% Hausdorff distance, average surface distance), computed with ``medpy.metric.binary`` as those
code bases do. Unlike them, empty predictions or labels are reported explicitly (flags and NaN
distances) instead of silently scoring 0 or crashing.
"""
import math

import numpy as np
from scipy import ndimage

METRIC_KEYS = ("dice", "jaccard", "hd95", "asd")


def medpy_binary():
    """``medpy.metric.binary``, imported when first needed, so that a missing medpy is the one line of
    ``utils.evaluation.check_evaluation_dependencies`` rather than a traceback when a script starts."""
    from medpy.metric import binary

    return binary


def _empty_case_metrics(empty_pred, empty_gt):
    """Metrics when the prediction and/or the label has no foreground.

    Both empty is a perfect answer (overlap 1, distances 0). With one side empty the overlap is 0
    and surface distances are undefined, hence NaN, which :func:`summarize_metrics` leaves out.
    """
    if empty_pred and empty_gt:
        dice, distance = 1.0, 0.0
    else:
        dice, distance = 0.0, math.nan
    return {"dice": dice, "jaccard": dice, "hd95": distance, "asd": distance,
            "empty_pred": empty_pred, "empty_gt": empty_gt}


def calculate_metric_percase(pred, gt, spacing=None):
    """Dice, Jaccard, HD95 and ASD of a binary prediction against a binary label of the same shape.

    Nonzero voxels are foreground. Distances are in voxels, or in the units of ``spacing`` (one
    voxel size per axis, or a scalar, passed to medpy as ``voxelspacing``) when given. ``asd`` is
    medpy's ``asd(pred, gt)``: the mean distance from the prediction's surface to the label's
    surface, not the symmetric ASSD, exactly as UA-MT, DTC and MC-Net compute it.

    Returns ``{"dice", "jaccard", "hd95", "asd"}`` as floats plus the booleans ``empty_pred`` and
    ``empty_gt``; see :func:`_empty_case_metrics` for the values when either mask is empty.
    """
    binary = medpy_binary()
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"calculate_metric_percase: pred shape {pred.shape} differs from gt shape {gt.shape}")
    pred, gt = pred != 0, gt != 0
    empty_pred, empty_gt = not pred.any(), not gt.any()
    if empty_pred or empty_gt:
        return _empty_case_metrics(empty_pred, empty_gt)
    return {
        "dice": float(binary.dc(pred, gt)),
        "jaccard": float(binary.jc(pred, gt)),
        "hd95": float(binary.hd95(pred, gt, voxelspacing=spacing)),
        "asd": float(binary.asd(pred, gt, voxelspacing=spacing)),
        "empty_pred": False,
        "empty_gt": False,
    }


def dice_score(pred, gt):
    """Dice of two masks of the same shape (nonzero = foreground), as :func:`calculate_metric_percase` scores
    it (1 when both are empty, 0 when one is) but without the surface distances: the periodic validation's."""
    pred, gt = np.asarray(pred) != 0, np.asarray(gt) != 0
    if not pred.any() and not gt.any():
        return 1.0
    return float(medpy_binary().dc(pred, gt))


def largest_connected_component(mask):
    """Keep only the largest 26-connected foreground component of ``mask``.

    The full 3x3x3 structure (all neighbours, generalised to the mask's dimension) matches
    ``skimage.measure.label``'s default connectivity used by DTC's ``getLargestCC``. Among
    components of equal size the one with the lowest label (first in C order) is kept, so the
    result is deterministic. An empty mask gives an empty mask. The result has the input's dtype.
    """
    mask = np.asarray(mask)
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labels, num_components = ndimage.label(mask != 0, structure=structure)
    if num_components == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    return (labels == largest).astype(mask.dtype)


def _finite_summary(values):
    """Mean, population std (ddof=0) and count of the finite entries; NaN mean and std if none."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(np.mean(finite)), "std": float(np.std(finite, ddof=0)), "n": int(finite.size)}


def summarize_metrics(rows, keys=METRIC_KEYS):
    """Summarise per-case metric dicts (from :func:`calculate_metric_percase`) over a test set.

    Each key gets ``{"mean", "std", "n"}`` over its finite values only, so NaN distances of empty
    cases do not poison the averages; ``std`` is the population standard deviation (ddof=0,
    numpy's default), not the sample one. ``num_cases``, ``num_empty_pred`` and ``num_empty_gt`` say
    how many cases there were and how many had an empty prediction or label.
    """
    rows = list(rows)
    for index, row in enumerate(rows):
        missing = [key for key in (*keys, "empty_pred", "empty_gt") if key not in row]
        if missing:
            raise ValueError(f"summarize_metrics: row {index} lacks {', '.join(missing)}")
    summary = {key: _finite_summary([row[key] for row in rows]) for key in keys}
    summary["num_cases"] = len(rows)
    summary["num_empty_pred"] = sum(bool(row["empty_pred"]) for row in rows)
    summary["num_empty_gt"] = sum(bool(row["empty_gt"]) for row in rows)
    return summary
