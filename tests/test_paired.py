"""Paired statistics (code/report/paired.py) on differences with known answers."""
import math

import numpy as np
import pytest

from conftest import assert_one_line_error, call_main
from report.paired import better_in_every_seed, bootstrap_interval, compare, main, paired_differences, wilcoxon_p


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


def write_metrics(folder, dice):
    """An evaluation folder whose metrics.csv holds ``dice`` (case -> fraction) and the mean/std rows."""
    folder.mkdir(parents=True)
    rows = [f"{case},{value},0.5,1.0,1.0,False,False" for case, value in dice.items()]
    text = "case,dice,jaccard,hd95,asd,empty_pred,empty_gt\n" + "\n".join(rows) + "\nmean,0.1,,,,,\nstd,0.1,,,,,\n"
    (folder / "metrics.csv").write_text(text)
    return folder


def test_command_line_compares_evaluations_on_their_shared_cases(tmp_path):
    baseline = write_metrics(tmp_path / "base", {"a": 0.70, "b": 0.80, "c": 0.60})
    other = write_metrics(tmp_path / "other", {"a": 0.72, "b": 0.79, "d": 0.10})
    same = write_metrics(tmp_path / "same", {"a": 0.70, "b": 0.80, "c": 0.60})
    proc = call_main(main, baseline, other / "metrics.csv", same, check=True)
    first, second = proc.stdout.splitlines()
    assert first == (f"{other / 'metrics.csv'}: Dice 75.50 vs 75.00, difference +0.50 points (median +0.50), "
                     "bootstrap 95 % "
                     "interval [-1.00, +2.00], Wilcoxon p 1, better on 1 and worse on 1 of 2 cases (only the 2 cases "
                     "both evaluated: 3 and 3 in all)")
    assert second.startswith(f"{same}: Dice 70.00 vs 70.00, difference +0.00 points") and "p nan" in second


def test_median_and_cases_better_in_every_seed_are_not_carried_by_one_case():
    """One case that gains 80 points moves the mean by 20 over four cases, but not the median; a case counts as
    better in every seed only when each of its seeds is better, and only cases paired in every seed count."""
    differences = [((1, "a"), 80.0), ((1, "b"), -1.0), ((1, "c"), 1.0), ((1, "d"), -2.0),
                   ((2, "a"), 5.0), ((2, "b"), 2.0), ((2, "c"), -1.0)]
    stats = compare([d for _, d in differences[:4]])
    assert stats.mean == pytest.approx(19.5) and stats.median == pytest.approx(0.0)
    assert better_in_every_seed(differences) == (1, 3)
    assert better_in_every_seed(differences[:4]) == (2, 4)


def test_command_line_refuses_a_folder_without_metrics_in_one_line(tmp_path):
    baseline = write_metrics(tmp_path / "base", {"a": 0.70})
    proc = call_main(main, baseline, tmp_path)
    assert_one_line_error(proc, f"{tmp_path}: no per-case metrics")
    disjoint = write_metrics(tmp_path / "disjoint", {"z": 0.5})
    assert_one_line_error(call_main(main, baseline, disjoint), "share no evaluated case")
