"""Paired per-case comparison of two runs scored on the same test cases (and seeds).

One seed on 20 test cases gives a mean Dice whose noise hides differences of a few points; most of that noise
is how hard each case is, which both runs share. Comparing case by case removes it: for every (seed, case)
that both runs scored, the difference of their Dice, and over those differences

- the mean difference;
- a bootstrap 95 % interval of that mean: the pairs resampled with replacement ``BOOTSTRAP_RESAMPLES`` times
  with a fixed seed (so that a table is the same every time it is written), percentile interval;
- the two-sided Wilcoxon signed-rank p-value (``scipy.stats.wilcoxon``; pairs with a zero difference are left
  out, as in Wilcoxon's test; exact below 50 pairs without ties);
- how many pairs are better, and how many worse.

``summarize.py`` compares every method with the labelled-only V-Net of the same labelled count, and the
all-labels V-Net with it too, which gives the band a semi-supervised method can fill.
"""
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 10000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedComparison:
    """The statistics of one comparison (differences in the units they were given in)."""

    n: int
    mean: float
    low: float
    high: float
    p_value: float
    better: int
    worse: int


def paired_differences(scores, baseline_scores):
    """``[(key, scores[key] - baseline_scores[key])]`` for every key (``(seed, case)``) that both dicts hold,
    in sorted key order."""
    return [(key, scores[key] - baseline_scores[key]) for key in sorted(set(scores) & set(baseline_scores))]


def bootstrap_interval(values, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED, confidence=CONFIDENCE):
    """Percentile bootstrap interval ``(low, high)`` of the mean of ``values``."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def wilcoxon_p(values):
    """Two-sided Wilcoxon signed-rank p-value of ``values`` (differences); NaN when every difference is zero
    (the test has nothing to rank)."""
    from scipy.stats import wilcoxon

    values = np.asarray(values, dtype=np.float64)
    if not np.any(values != 0):
        return float("nan")
    return float(wilcoxon(values).pvalue)


def compare(differences):
    """:class:`PairedComparison` of a list of differences (at least one)."""
    values = np.asarray(differences, dtype=np.float64)
    if values.size == 0:
        raise ValueError("a paired comparison needs at least one pair")
    low, high = bootstrap_interval(values)
    return PairedComparison(n=int(values.size), mean=float(values.mean()), low=low, high=high,
                            p_value=wilcoxon_p(values), better=int((values > 0).sum()), worse=int((values < 0).sum()))
