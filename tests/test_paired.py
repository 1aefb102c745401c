"""Paired statistics (code/report/paired.py) on differences with known answers."""
import math

import numpy as np
import pytest

from report.paired import bootstrap_interval, compare, paired_differences, wilcoxon_p


def test_differences_pair_only_the_keys_both_runs_scored():
    method = {(1, "a"): 80.0, (1, "b"): 70.0, (2, "a"): 75.0}
    baseline = {(1, "a"): 78.0, (1, "b"): 72.5, (3, "a"): 10.0}
    assert paired_differences(method, baseline) == [((1, "a"), 2.0), ((1, "b"), -2.5)]


def test_wilcoxon_p_of_exact_small_samples():
    # all 20 differences positive and distinct: the exact two-sided p is 2 / 2^20
    assert wilcoxon_p(np.arange(1, 21)) == pytest.approx(2 / 2 ** 20, rel=1e-9)
    # ranks 1..5 positive, rank 6 negative: W- = 6; 14 of the 64 sign patterns have W- <= 6, two-sided 28 / 64
    assert wilcoxon_p([1, 2, 3, 4, 5, -6]) == pytest.approx(28 / 64, rel=1e-9)
    assert math.isnan(wilcoxon_p([0.0, 0.0, 0.0]))


def test_bootstrap_interval_of_known_distributions():
    assert bootstrap_interval([3.0] * 20) == (3.0, 3.0)
    # two values: the resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    assert bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)
    low, high = bootstrap_interval(np.arange(1, 21, dtype=float))
    assert low < 10.5 < high and high - low == pytest.approx(2 * 1.96 * np.std(np.arange(1, 21)) / np.sqrt(20),
                                                              rel=0.1)
    assert bootstrap_interval(np.arange(1, 21, dtype=float)) == (low, high)  # seeded: the same every time


def test_compare_counts_and_summarises():
    stats = compare([1, 2, 3, 4, 5, -6])
    assert (stats.n, stats.better, stats.worse) == (6, 5, 1)
    assert stats.mean == pytest.approx(1.5) and stats.p_value == pytest.approx(28 / 64)
    assert stats.low < stats.mean < stats.high
    with pytest.raises(ValueError):
        compare([])
