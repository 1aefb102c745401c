"""Paired per-case comparison of two runs scored on the same test cases (and seeds).

One seed on 20 test cases gives a mean Dice whose noise hides differences of a few points; most of that noise
is how hard each case is, which both runs share. Comparing case by case removes it: for every (seed, case)
that both runs scored, the difference of their Dice, and over those differences

- the mean difference, and the median (what a typical case gains: a mean can be one case's);
- a bootstrap 95 % interval of that mean: the pairs resampled with replacement ``BOOTSTRAP_RESAMPLES`` times
  with a fixed seed (so that a table is the same every time it is written), percentile interval;
- the two-sided Wilcoxon signed-rank p-value (``scipy.stats.wilcoxon``; pairs with a zero difference are left
  out, as in Wilcoxon's test; exact below 50 pairs without ties);
- how many pairs are better, and how many worse.

``summarize.py`` compares every method with the labelled-only V-Net of the same labelled count, and the
all-labels V-Net with it too, which gives the band a semi-supervised method can fill. From the command line the
same statistics compare any evaluations (``test_3D.py``'s folders) with a baseline evaluation, one seed each:

    python code/report/paired.py <labelled-only run>/eval_iter_6000 <run>/eval_iter_6000 <run>/eval_iter_6000_model2
"""
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CODE_DIR = str(Path(__file__).resolve().parents[1])
if CODE_DIR not in sys.path:
    sys.path.insert(0, CODE_DIR)

from utils.cli import ArgumentParser, resolve_path, run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402

BOOTSTRAP_RESAMPLES = 10000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedComparison:
    """The statistics of one comparison (differences in the units they were given in)."""

    n: int
    mean: float
    median: float
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
    return PairedComparison(n=int(values.size), mean=float(values.mean()), median=float(np.median(values)),
                            low=low, high=high,
                            p_value=wilcoxon_p(values), better=int((values > 0).sum()), worse=int((values < 0).sum()))


def better_in_every_seed(differences):
    """``(cases better in every seed, cases)`` of ``[((seed, case), difference)]``: a case counts when each of its
    seeds gives a positive difference; only cases paired in every seed that occurs are counted."""
    seeds = {seed for (seed, _), _ in differences}
    by_case = {}
    for (seed, case), difference in differences:
        by_case.setdefault(case, {})[seed] = difference
    complete = [values for values in by_case.values() if set(values) == seeds]
    return sum(all(value > 0 for value in values.values()) for values in complete), len(complete)


def metrics_rows(eval_dir):
    """Per-case rows of an evaluation's ``metrics.csv`` (without the mean/std rows), in evaluation order; none
    when the folder has no ``metrics.csv``."""
    path = Path(eval_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if row["case"] not in ("mean", "std")]


def evaluation_dice(given):
    """``{case: Dice in %}`` of an evaluation folder, or of its ``metrics.csv`` named directly; one line for a
    path that holds no per-case metrics."""
    path = resolve_path(given)
    folder = path.parent if path.name == "metrics.csv" else path
    rows = metrics_rows(folder)
    if not rows:
        raise UserError(f"{given}: no per-case metrics (expected an evaluation folder with metrics.csv, "
                        "e.g. <run>/eval_iter_6000)")
    return {row["case"]: 100 * float(row["dice"]) for row in rows}


def describe(name, scores, baseline, differences):
    """One line: the mean Dice of both on the cases they share (the keys of ``differences``) and the paired
    statistics of those differences."""
    shared = [case for case, _ in differences]
    comparison = compare([value for _, value in differences])
    mean = sum(scores[case] for case in shared) / len(shared)
    base = sum(baseline[case] for case in shared) / len(shared)
    extra = "" if len(shared) == len(scores) == len(baseline) else \
        f" (only the {len(shared)} cases both evaluated: {len(scores)} and {len(baseline)} in all)"
    return (f"{name}: Dice {mean:.2f} vs {base:.2f}, difference {comparison.mean:+.2f} points (median "
            f"{comparison.median:+.2f}), "
            f"bootstrap 95 % interval [{comparison.low:+.2f}, {comparison.high:+.2f}], Wilcoxon p "
            f"{comparison.p_value:.2g}, better on {comparison.better} and worse on {comparison.worse} of "
            f"{comparison.n} cases{extra}")


def get_parser():
    parser = ArgumentParser(description="Compare evaluations case by case with a baseline evaluation: mean Dice "
                                        "difference, bootstrap 95 % interval, Wilcoxon signed-rank p.")
    parser.add_argument("baseline", help="evaluation folder of the baseline (<run>/eval_<checkpoint>...) or its "
                                         "metrics.csv")
    parser.add_argument("others", nargs="+", help="evaluation folders (or metrics.csv files) to compare with it")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    baseline = evaluation_dice(args.baseline)
    lines = []
    for other in args.others:
        scores = evaluation_dice(other)
        differences = paired_differences(scores, baseline)
        if not differences:
            raise UserError(f"{other} and {args.baseline} share no evaluated case")
        lines.append(describe(other, scores, baseline, differences))
    print("\n".join(lines))


if __name__ == "__main__":
    run_cli(main)
