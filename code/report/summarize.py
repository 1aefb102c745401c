"""Collect every run under a model folder into one markdown results table, next to the published numbers.

    python code/report/summarize.py --model_dir model [--out model/results.md] [--title "..."] [--note "..."]
    python code/report/summarize.py --model_dir model/reproduce/LA_half_quick --run_files results/LA_half_quick \
        --out docs/results_quick.md     # keep the files that define the table, and make it from them
    python code/report/summarize.py --model_dir results/LA_half_quick   # the committed table again, no training

A run is a directory holding ``config.json`` (written by ``utils.run.TrainingRun``); ``reproduce.sh`` puts
them at ``model/<tag>_seed<seed>/<EXP>_<labelnum>/<model>/``. Runs that differ only in their seed form one
row per (data tag, method, labelled count, protocol): each metric cell is the mean and the sample standard
deviation (n - 1) over seeds of the per-run test-set means, read from the ``summary.json`` of the run's own result:
the evaluation of its own final weights, with the method's inference, on the whole test list, as recorded
(``utils.own_result``). A run without one (training failed or unfinished, or never evaluated) is reported as
"failed / not evaluated" with its reason, as "training" while a live process holds its folder, or as
"unfinished" when it stopped before its last iteration with a resumable ``latest.pth`` (a signal at the end of a
session: ``--resume`` continues it), and never contributes a number; every other evaluation in a run folder is
listed under the table with why it is not the run's result. Folders moved aside by ``--overwrite``
(``<run>.old-<time>``) are not runs of the summary.

Below the table, each method is compared case by case with the labelled-only V-Net (and the all-labels V-Net
with it: the band), and each semi-supervised method with its matched control (its own script with
``--labelled_only 1``, a row of its own): mean, bootstrap interval, Wilcoxon p, median, and the cases better in
every seed (``report.paired``).

Published numbers are the ones quoted, with their sources, in ``docs/methods/*.md`` (:data:`PUBLISHED`); they
are shown only for rows whose data tag is the dataset's name (``LA``, as ``reproduce.sh`` tags runs on the real
data), never next to the synthetic quick start or a resampled copy: a run that recorded its data
(``dataloaders.data_tag``) is tagged by what it read, whatever its ``--exp`` says.
Relative paths are taken as the project's scripts do: ``--model_dir`` from the working directory when it exists
there, else from the repository root; ``--out`` always from the repository root.
"""
import json
import math
import re
import shutil
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

CODE_DIR = str(Path(__file__).resolve().parents[1])
if CODE_DIR not in sys.path:
    sys.path.insert(0, CODE_DIR)

from utils.atomic import write_atomically  # noqa: E402
from utils.cli import REPO_ROOT, ArgumentParser, output_path, resolve_path, run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.folder_lock import live_holder  # noqa: E402
from utils.own_result import own_evaluation  # noqa: E402
from utils.run_files import BEST_VAL, LATEST, is_set_aside  # noqa: E402
from report.paired import (BOOTSTRAP_RESAMPLES, better_in_every_seed, compare, metrics_rows,  # noqa: E402
                           paired_differences, wilcoxon_p)
from report.wall_times import COST, LOG, run_cost, write_cost  # noqa: E402

FAILED = "failed / not evaluated"
TRAINING = "training"  # a run without a result whose folder a live process holds
UNFINISHED = "unfinished"  # a run stopped before its final checkpoint, with a latest.pth to resume from
CONTROL_SUFFIX = "_control"  # reproduce.sh's experiment name of a method's control: MT_control
EVALUATION_FILES = ("summary.json", "metrics.csv", "git.diff")  # what run files keep of an evaluation (a diff:
# the code's uncommitted edits, when there were any)
TABLE_FILE = "table.json"  # title, note and output file of the table a folder of run files defines
UPPER_BOUND = "V-Net (all labels)"
MIN_BAND = 1.0  # points of Dice: a narrower band gets no "share of the band" (band_share)
METRIC_COLUMNS = (("dice", "Dice (%)", 100), ("jaccard", "Jaccard (%)", 100), ("hd95", "95HD", 1),
                  ("asd", "ASD", 1))


@dataclass(frozen=True)
class Method:
    """A training script as the table names it: ``key`` indexes :data:`PUBLISHED` and ``docs/methods/``;
    ``exp`` and ``model`` are the experiment name and network ``reproduce.sh`` gives it, so that a run made
    with other ones (an ablation) gets them added to its label instead of being averaged with the default."""

    key: str
    name: str
    exp: str
    model: str


METHODS = {
    "train_supervised_3D": Method("supervised", "Supervised V-Net", "Supervised", "vnet"),
    "train_mt_3D": Method("mt", "Mean teacher", "MT", "vnet"),
    "train_uamt_3D": Method("uamt", "UA-MT", "UAMT", "vnet"),
    "train_dtc_3D": Method("dtc", "DTC", "DTC", "vnet_sdf"),
    "train_cps_3D": Method("cps", "CPS", "CPS", "vnet"),
    "train_ugmcl_3D": Method("ugmcl", "UG-MCL", "UGMCL", "vnet_sdf"),
    "train_ucseg_3D": Method("ucseg", "UC-Seg", "UCSeg", "unet_3D_vnet"),
    "train_ugpl_3D": Method("ugpl", "UGPL", "UGPL", "resnet_vnet"),
}


@dataclass(frozen=True)
class Published:
    """One published result; values are the strings the method doc prints (None where it prints "-"), so
    nothing is rounded, re-formatted or filled in on the way."""

    dice: str
    jaccard: str
    hd95: str
    asd: str
    source: str


# (method key, dataset, labelled cases) -> results, copied from the "Published numbers" section of
# docs/methods/<key>.md. Kept here rather than in a JSON file so that each entry can say, in a comment,
# where it was copied from, and so that the table is checked by the same tools as the code that reads it.
# Every number the docs quote is here; methods whose doc quotes none (CPS, UC-Seg) have no entry.
PUBLISHED = {
    # docs/methods/supervised.md: ssl4mis-family.md table B (SS-Net authors' re-run, its protocol not stated)
    ("supervised", "LA", 4): (Published("52.55", "39.60", "47.05", "9.87",
                                        "SS-Net authors' V-Net re-run (docs/methods/supervised.md)"),),
    ("supervised", "LA", 8): (Published("82.74", "71.70", "13.33", "3.26",
                                        "SS-Net authors' V-Net re-run (docs/methods/supervised.md)"),),
    # docs/methods/ugmcl.md, paper Table 3 (supervised row)
    ("supervised", "LA", 16): (Published("86.03", "76.06", "14.26", "3.51",
                                         "UG-MCL paper Table 3 (docs/methods/ugmcl.md)"),),
    # upper bound: docs/methods/supervised.md table B row 80 (ranges as printed) and docs/methods/ugmcl.md
    ("supervised", "LA", 80): (
        Published("about 91.4-91.5", "84.4-84.6", "5.48", "about 1.5 (two sources disagree)",
                  "SS-Net authors' V-Net re-run (docs/methods/supervised.md)"),
        Published("91.14", "83.82", "5.75", "1.52", "UG-MCL paper Table 3 (docs/methods/ugmcl.md)"),
    ),
    # docs/methods/mt.md
    ("mt", "LA", 16): (Published("88.23", "79.29", "10.64", "2.73",
                                 "UG-MCL Table 3, its re-run (docs/methods/mt.md)"),),
    # docs/methods/uamt.md
    ("uamt", "LA", 16): (Published("88.88", "80.21", "7.32", "2.26",
                                   "UA-MT paper via DTC's README (docs/methods/uamt.md)"),),
    ("uamt", "LA", 8): (
        Published("84.25", "73.48", "13.84", "3.36", "DTC's README (docs/methods/uamt.md)"),
        Published("87.79", "78.39", "8.68", "2.12",
                  "SS-Net's re-run, its protocol not stated (docs/methods/uamt.md)"),
        Published("85.81", "75.41", "18.25", "5.04", "BCP/CAML tables (docs/methods/uamt.md)"),
    ),
    ("uamt", "LA", 4): (Published("82.26", "70.98", "13.71", "3.82", "SS-Net's re-run (docs/methods/uamt.md)"),),
    # docs/methods/dtc.md
    ("dtc", "LA", 16): (Published("89.42", "80.98", "7.32", "2.10", "DTC's README (docs/methods/dtc.md)"),),
    ("dtc", "LA", 8): (
        Published("87.51", "78.17", "8.23", "2.36", "MC-Net's re-run, DTC* in DTC's README (docs/methods/dtc.md)"),
        Published("84.55", "73.91", "13.80", "3.69", "BCP/CAML tables (docs/methods/dtc.md)"),
    ),
    ("dtc", "LA", 4): (Published("81.25", "69.33", "14.90", "3.99", "SS-Net's re-run (docs/methods/dtc.md)"),),
    # docs/methods/ugmcl.md, paper Table 3 (the 8-label result is only a plot, Fig. 4)
    ("ugmcl", "LA", 16): (Published("90.16", "82.18", "6.50", "1.98",
                                    "UG-MCL paper Table 3 (docs/methods/ugmcl.md)"),),
    ("ugmcl", "BraTS2019", 25): (Published("82.82", "72.77", "11.29", "2.30",
                                           "UG-MCL paper Table 4 (docs/methods/ugmcl.md)"),),
    ("ugmcl", "BraTS2019", 50): (Published("83.61", "73.98", "11.44", "2.26",
                                           "UG-MCL paper Table 4 (docs/methods/ugmcl.md)"),),
    # docs/methods/ugpl.md: the abstract gives the Dice only
    ("ugpl", "LA", 8): (Published("89.95", None, None, None, "UGPL abstract (docs/methods/ugpl.md)"),),
}


@dataclass
class Run:
    """One run directory: its configuration, the evaluation chosen for it, or why there is none."""

    path: Path
    name: str
    script: str
    args: dict
    tag: str
    variant: str
    eval_dir: Path = None
    summary: dict = None
    problem: str = None
    best_summary: dict = None  # the test evaluation of best_val.pth (weights selected on validation), if any
    best_dir: Path = None  # its folder
    listed_cases: int = None  # cases of the training list the run read (config.json), where it recorded them
    set_apart: list = field(default_factory=list)  # evaluations that are not the run's own result (own_result)
    training: str = None  # who holds the folder, for a run without a result that a live process trains
    unfinished: bool = False  # stopped (no live process) before its final checkpoint, resumable from latest.pth

    @property
    def seed(self):
        return self.args["seed"]

    @property
    def label_seed(self):
        """The draw of the labelled cases (``--label_seed``), None for the papers' first ``--labelnum``."""
        return self.args.get("label_seed")

    @property
    def labelnum(self):
        return self.args["labelnum"]

    @property
    def control(self):
        """Whether the run is a method's matched control (``--labelled_only 1``: no unlabelled loss terms)."""
        return bool(self.args.get("labelled_only", 0))

    @property
    def final_checkpoint(self):
        return f"iter_{self.args['max_iterations']}.pth"

    @property
    def in_progress(self):
        """A run without a result that has not ended: training now, or stopped to be resumed."""
        return bool(self.training) or self.unfinished


@dataclass
class Row:
    """One line of the table: the runs of one configuration and evaluation protocol, one per seed."""

    tag: str
    method: Method
    label: str
    labelnum: int
    dataset: str
    runs: list
    failed: list
    tag_seeds: list
    upper_bound: bool = False

    @property
    def control(self):
        """A row of a method's matched control (``--labelled_only 1``)."""
        return (self.runs or self.failed)[0].control


@dataclass
class Comparison:
    """A row compared case by case with the labelled-only V-Net, or with the method's own control
    (``baseline``): the differences of Dice in percentage points, ``[((seed, case), difference)]``, and their
    ``report.paired.PairedComparison``."""

    row: Row
    baseline: Row
    differences: list
    stats: object

    @property
    def every_seed(self):
        """``(cases better in every seed, cases paired in every seed)``."""
        return better_in_every_seed(self.differences)


@dataclass
class Results:
    """Everything the tables (and ``plots.py``) need: the rows, the paired comparisons and the notes."""

    model_dir: Path
    rows: list
    num_runs: int
    notes: list = field(default_factory=list)
    comparisons: list = field(default_factory=list)
    control_comparisons: list = field(default_factory=list)  # each method against its own control


# -- reading runs ------------------------------------------------------------------------------------------
def find_run_dirs(model_dir):
    """Every directory under ``model_dir`` with a ``config.json``, except ``--overwrite`` leftovers."""
    configs = sorted(Path(model_dir).rglob("config.json"))
    return [c.parent for c in configs if not any(is_set_aside(part) for part in c.relative_to(model_dir).parts)]


def experiment_names(args):
    """``(data tag, variant)`` from ``--exp``: ``LA_seed1337/UGMCL`` gives ``("LA", "UGMCL")`` (the run's own
    seed suffix is dropped, so that seeds group), and ``LA_draw3_seed1337/UGMCL`` of a run with ``--label_seed 3``
    gives it too (``reproduce.sh``'s names with ``LABEL_SEEDS``; the draw is a column of its own); an ``--exp``
    without a folder is tagged with ``--dataset``."""
    head, _, tail = args["exp"].rpartition("/")
    if not head:
        return args["dataset"], tail
    tag = re.sub(rf"_seed{args['seed']}$", "", head)
    if args.get("label_seed") is not None:
        tag = re.sub(rf"_draw{args['label_seed']}$", "", tag)
    return tag, tail


def data_tag_of(config, tag):
    """``tag``, or the tag that the data the run read gives (``config.json``'s ``data``, recorded since
    runs record it) where ``--exp`` named the dataset itself: a run on synthetic or resampled data given
    ``--exp LA/...`` is not filed as LA (``dataloaders.data_tag``)."""
    data = config.get("data")
    if isinstance(data, dict) and data.get("kind") != "as given" and tag == config["args"]["dataset"]:
        tag = data.get("tag") or f"{tag}_{data.get('kind')}"
    return tag


def read_run(run_dir, model_dir):
    """The :class:`Run` of ``run_dir`` with its evaluation chosen; raises ``ValueError`` on a configuration
    that cannot be read."""
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    args = config["args"]
    for key in ("exp", "seed", "labelnum", "max_iterations", "dataset", "model", "nms"):
        if key not in args:
            raise ValueError(f"no args.{key}")
    tag, variant = experiment_names(args)
    tag = data_tag_of(config, tag)
    run = Run(run_dir, str(run_dir.relative_to(model_dir)), config["script"], args, tag, variant,
              listed_cases=config.get("listed_training_cases"))
    final = own_evaluation(run_dir, args)
    if final.chosen:
        run.eval_dir, run.summary = final.chosen.folder, final.chosen.summary
    run.problem, run.set_apart = final.reason, final.others
    if not final.chosen:
        run.training = live_holder(run_dir)
        run.unfinished = not run.training and is_resumable(run_dir, run.final_checkpoint)
    best = own_evaluation(run_dir, args, BEST_VAL)
    if best.chosen:
        run.best_dir, run.best_summary = best.chosen.folder, best.chosen.summary
    run.set_apart = run.set_apart + best.others
    return run


def is_resumable(run_dir, final_checkpoint):
    """Whether a run stopped before its final checkpoint and can continue: ``latest.pth`` is there, the final
    weights are not (what a run stopped by a signal, or killed after its first save, leaves)."""
    return (run_dir / LATEST).is_file() and not (run_dir / final_checkpoint).is_file()


def count_training_cases(run):
    """Training cases of the run's data: as the run recorded them in ``config.json``, else the lines of
    ``<root_path>/train.list``, else the log's ``L labelled + U unlabelled cases`` line; None when none is
    there."""
    if run.listed_cases is not None:
        return run.listed_cases
    root = run.args.get("root_path")
    train_list = Path(root) / "train.list" if root else None
    if train_list and train_list.is_file():
        return sum(1 for line in train_list.read_text(encoding="utf-8").splitlines() if line.strip())
    log = run.path / "log.txt"
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    match = re.search(r"(\d+) labelled \+ (\d+) unlabelled cases", text)
    return int(match[1]) + int(match[2]) if match else None


def collect(model_dir):
    """Read every run under ``model_dir`` and group them into table rows (:class:`Results`)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model folder {model_dir} not found")
    runs, notes = [], []
    for run_dir in find_run_dirs(model_dir):
        try:
            runs.append(read_run(run_dir, model_dir))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            notes.append(f"`{run_dir.relative_to(model_dir)}`: config.json cannot be read ({exc}); left out")
    if not runs:
        raise UserError(f"no runs under {model_dir} (no config.json in any folder)")
    runs, duplicates = drop_duplicate_seeds(runs)
    notes += duplicates
    rows = group_rows(runs)
    return Results(model_dir, rows, len(runs), notes + run_notes(runs), paired_comparisons(rows),
                   control_comparisons(rows))


def drop_duplicate_seeds(runs):
    """Keep one run per (configuration, seed) (the first by path), so that no seed counts twice; return the
    runs kept and a note for each one left out."""
    kept, notes, seen = [], [], {}
    for run in runs:
        key = config_key(run) + (run.seed,)
        if key in seen:
            notes.append(f"`{run.name}`: same configuration and seed as `{seen[key].name}`; left out")
        else:
            seen[key] = run
            kept.append(run)
    return kept, notes


# -- grouping ----------------------------------------------------------------------------------------------
def config_key(run):
    """What must be equal for runs to be seeds of one experiment (runs of older code have width 16): the
    labelled subset included, so that each draw of ``--label_seed`` is a row of its own."""
    return (run.tag, run.variant, run.script, run.args["model"], run.labelnum, run.args["max_iterations"],
            run.args.get("n_filters", 16), run.control, run.label_seed)


def protocol_key(run):
    """What must be equal for evaluations to be averaged: patch, strides, LCC, units, number of test cases."""
    protocol = run.summary["protocol"]
    return (tuple(protocol["patch_size"]), protocol["stride_xy"], protocol["stride_z"], protocol["nms"],
            protocol.get("units"), run.summary["num_cases"])


def method_of(run):
    """The :class:`Method` of the run's script; a script of no paper (a copy trying an idea) is named after
    itself, with the experiment name its runs have (its control's without ``_control``)."""
    exp = run.variant.removesuffix(CONTROL_SUFFIX) if run.control else run.variant
    return METHODS.get(run.script, Method(run.script, run.script, exp, run.args["model"]))


def method_label(run, method, upper_bound):
    """The method column: its name (a control: "<name>: own control"), plus the experiment or network when they
    are not ``reproduce.sh``'s."""
    exp = method.exp + (CONTROL_SUFFIX if run.control else "")
    extras = [f"exp {run.variant}"] if run.variant != exp else []
    extras += [f"model {run.args['model']}"] if run.args["model"] != method.model else []
    extras += [f"labelled draw {run.label_seed}"] if run.label_seed is not None else []
    name = UPPER_BOUND if upper_bound else f"{method.name}: own control" if run.control else method.name
    return f"{name} ({', '.join(extras)})" if extras else name


def group_rows(runs):
    """Rows of the table, sorted by data tag, labelled count and method: one per configuration and evaluation
    protocol; a configuration whose runs all failed gets one row of its own. The labelled-only V-Net on every
    training case not held out for validation (``--val_num``) is the all-labels upper bound."""
    tag_seeds = defaultdict(set)
    for run in runs:
        tag_seeds[run.tag].add(run.seed)
    case_counts = {}
    configs = defaultdict(list)
    for run in runs:
        configs[config_key(run)].append(run)
    rows = []
    for group in configs.values():
        first = group[0]
        root = first.args.get("root_path")
        if root not in case_counts:
            case_counts[root] = count_training_cases(first)
        method = method_of(first)
        upper = method.key == "supervised" and first.labelnum + first.args.get("val_num", 0) == case_counts[root]
        failed = sorted((r for r in group if r.summary is None), key=lambda r: r.seed)
        protocols = defaultdict(list)
        for run in (r for r in group if r.summary is not None):
            protocols[protocol_key(run)].append(run)
        for evaluated in (list(protocols.values()) or [[]]):
            rows.append(Row(first.tag, method, method_label(first, method, upper), first.labelnum,
                            first.args["dataset"], sorted(evaluated, key=lambda r: r.seed), failed,
                            sorted(tag_seeds[first.tag]), upper))
    return sorted(rows, key=row_order)


def row_order(row):
    """Sort key of a row: data tag, labelled count, then the methods in ``reproduce.sh``'s order."""
    keys = [method.key for method in METHODS.values()]
    position = keys.index(row.method.key) if row.method.key in keys else len(keys)
    return row.tag, row.labelnum, position, row.label


def run_notes(runs):
    """Notes under the table: each failed run and its reason; each run with empty predictions; the evaluations
    kept apart, each with why it is not its run's result; how many numbers were chosen without a provenance
    record, and how many with code other than the run's training code."""
    notes = []
    for run in runs:
        if run.training:
            notes.append(f"`{run.name}` (seed {run.seed}): {TRAINING} ({run.training.split(' (')[0]}), no number yet")
        elif run.unfinished:
            notes.append(f"`{run.name}` (seed {run.seed}): {UNFINISHED}: stopped before {run.final_checkpoint}, "
                         f"no number yet; `--resume` (or the same reproduce.sh command) continues it from {LATEST}")
        elif run.summary is None:
            notes.append(f"`{run.name}` (seed {run.seed}): {FAILED}: {run.problem}")
        elif run.summary.get("num_empty_pred"):
            notes.append(f"`{run.name}` (seed {run.seed}): {run.summary['num_empty_pred']} of "
                         f"{run.summary['num_cases']} test cases predicted empty; their 95HD/ASD are undefined "
                         "and left out of that run's means")
        for other in run.set_apart:
            chosen = run.best_dir if other.summary["protocol"]["checkpoint"] == BEST_VAL else run.eval_dir
            why = ", ".join(other.problems) or \
                f"another evaluation of the run's own weights; the table uses {chosen.name}"
            notes.append(f"`{run.name}/{other.folder.name}`: not in the table ({why})")
    tabled = [run.summary for run in runs if run.summary is not None]
    unrecorded = sum("provenance" not in summary for summary in tabled)
    if unrecorded:
        notes.append(f"{unrecorded} of the {len(tabled)} evaluations in the table were made before evaluations "
                     "recorded their weights' hash and code: each was chosen by the checkpoint, network, split and "
                     "case list it did record")
    other_code = [run.name for run in runs if run.summary is not None
                  and run.summary.get("provenance", {}).get("code_as_trained") is False]
    if other_code:
        notes.append(f"evaluated with code other than their training code (commit and diff in the evaluation's "
                     f"summary.json and git.diff): {', '.join(f'`{name}`' for name in other_code)}")
    return notes


# -- paired comparison with the labelled-only V-Net ------------------------------------------------------------
def case_scores(row):
    """``{(seed, case): Dice in %}`` of every evaluated run of ``row``."""
    return {(run.seed, case["case"]): 100 * float(case["dice"])
            for run in row.runs for case in metrics_rows(run.eval_dir)}


def is_labelled_only(row):
    """The plain labelled-only V-Net (not the all-labels run, not an ablation of it), evaluated."""
    if row.method.key != "supervised" or row.upper_bound or not row.runs:
        return False
    first = row.runs[0]
    return first.variant == row.method.exp and first.args["model"] == row.method.model


def subset_of(row):
    """``(data tag, labelled count, labelled draw)``: rows with the same labelled cases."""
    return row.tag, row.labelnum, row.runs[0].label_seed


def subset_order(subset):
    """Sort key of a :func:`subset_of` triple: the papers' first cases (no draw) before the draws."""
    tag, labelnum, label_seed = subset
    return tag, labelnum, -1 if label_seed is None else label_seed


def paired_comparisons(rows):
    """Each evaluated method row against the labelled-only V-Net of its data tag, labelled count and labelled
    draw, and the all-labels V-Net against each labelled-only one of its tag (the band); only rows that share
    pairs."""
    baselines = {}
    for row in rows:
        if is_labelled_only(row):
            baselines.setdefault(subset_of(row), row)
    comparisons = []
    for row in rows:
        if not row.runs or is_labelled_only(row):
            continue
        if row.upper_bound:
            against = [b for key, b in sorted(baselines.items(), key=lambda item: subset_order(item[0]))
                       if key[0] == row.tag]
        else:
            against = [baselines[subset_of(row)]] if subset_of(row) in baselines else []
        for baseline in against:
            differences = paired_differences(case_scores(row), case_scores(baseline))
            if differences:
                comparisons.append(Comparison(row, baseline, differences, compare([d for _, d in differences])))
    return comparisons


def matched_key(row):
    """What a method's row and its control's row share: the configuration but the experiment name and the
    control flag, and the evaluation protocol."""
    tag, _, *configuration, _, label_seed = config_key(row.runs[0])
    return (tag, *configuration, label_seed) + protocol_key(row.runs[0])


def control_comparisons(rows):
    """Each evaluated semi-supervised row against the row of its own control (``--labelled_only 1``, the same
    script, configuration and evaluation), where both share pairs."""
    controls = {matched_key(row): row for row in rows if row.runs and row.control}
    comparisons = []
    for row in rows:
        if not row.runs or row.control or row.method.key == "supervised":
            continue
        control = controls.get(matched_key(row))
        differences = paired_differences(case_scores(row), case_scores(control)) if control else []
        if differences:
            comparisons.append(Comparison(row, control, differences, compare([d for _, d in differences])))
    return comparisons


def band_share(comparison, comparisons):
    """The mean difference as a share of the band (the all-labels V-Net's mean difference to the same
    labelled-only run): 0 % is the labelled-only V-Net, 100 % the all-labels one; None without a band, and when
    the band is under :data:`MIN_BAND` points or not significant (Wilcoxon p >= 0.05): a share of a band that may
    be noise says nothing (a band of 0.01 points would make a 1-point gain 10,000 %).

    The band is measured on the method's own pairs (seed × case): a method trained with fewer seeds than the
    bounds (a table still training) is placed in the band of its seeds, since the band differs from seed to seed;
    None when the band lacks one of the method's pairs."""
    for other in comparisons:
        if other.row.upper_bound and other.baseline is comparison.baseline:
            band = dict(other.differences)
            if any(key not in band for key, _ in comparison.differences):
                return None
            values = [band[key] for key, _ in comparison.differences]
            mean = statistics.fmean(values)
            if mean >= MIN_BAND and wilcoxon_p(values) < 0.05:
                return 100 * comparison.stats.mean / mean
            return None
    return None


def p_cell(stats):
    """A Wilcoxon p-value with two significant digits, "–" when there is none (every difference zero)."""
    return "–" if stats.p_value != stats.p_value else f"{stats.p_value:.2g}"


def control_cell(comparison):
    """``+3.54 [-0.59, +8.68], p 0.13, median +2.10``: a method's gain over its own control, or "–"."""
    if comparison is None:
        return "–"
    stats = comparison.stats
    return (f"{stats.mean:+.2f} [{stats.low:+.2f}, {stats.high:+.2f}], p {p_cell(stats)}, median "
            f"{stats.median:+.2f}")


def seed_means(differences):
    """``{seed: mean difference}`` of ``[((seed, case), difference)]``, in seed order."""
    by_seed = {}
    for (seed, _), difference in differences:
        by_seed.setdefault(seed, []).append(difference)
    return {seed: statistics.fmean(values) for seed, values in sorted(by_seed.items())}


def seed_gains_cell(comparison):
    """``42: +6.76, 1337: +1.93, 2024: +0.40``: a method's mean gain over its own control in each seed, or "–".
    The pooled test pairs cases within seeds; how far the seeds' gains differ is the spread between trainings
    that it cannot hold, so the table shows it."""
    if comparison is None:
        return "–"
    return ", ".join(f"{seed}: {mean:+.2f}" for seed, mean in seed_means(comparison.differences).items())


def comparison_lines(comparisons, control_comparisons=()):
    """The markdown table of the paired comparisons (with each method's gain over its own control) and its
    notes."""
    header = ["data", "method", "labelled", "pairs (seed × case)", "ΔDice mean (points)", "95 % CI (bootstrap)",
              "Wilcoxon p", "median (points)", "better / worse", "cases better in every seed", "share of the band",
              "gain over its own control", "gain over its own control, per seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    notes = []
    own_control = {id(c.row): c for c in control_comparisons}
    for comparison in comparisons:
        row, stats = comparison.row, comparison.stats
        labelled = f"{row.labelnum} vs {comparison.baseline.labelnum}" if row.upper_bound else str(row.labelnum)
        share = None if row.upper_bound else band_share(comparison, comparisons)
        better, cases = comparison.every_seed
        cells = [row.tag, row.label, labelled, str(stats.n), f"{stats.mean:+.2f}",
                 f"[{stats.low:+.2f}, {stats.high:+.2f}]", p_cell(stats), f"{stats.median:+.2f}",
                 f"{stats.better} / {stats.worse}", f"{better} of {cases}",
                 "–" if share is None else f"{share:.0f} %",
                 control_cell(own_control.get(id(row))), seed_gains_cell(own_control.get(id(row)))]
        lines.append("| " + " | ".join(cells) + " |")
        ours, theirs = row.runs[0].summary["protocol"], comparison.baseline.runs[0].summary["protocol"]
        if ours["nms"] != theirs["nms"]:
            notes.append(f"{row.label} ({row.tag}, {row.labelnum}): evaluated with LCC "
                         f"{'on' if ours['nms'] else 'off'}, the labelled-only V-Net with LCC "
                         f"{'on' if theirs['nms'] else 'off'}")
    return lines, notes


# -- validation-selected weights and labelled subsets ---------------------------------------------------------
def selection_lines(rows):
    """The table of every run whose validation kept weights (``best_val.pth``) and that has both evaluations:
    the final weights' Dice beside the validation-selected weights', with where and how well they validated."""
    header = ["run", "seed", "Dice, final weights (%)", "Dice, weights best on validation (%)",
              "selected at iteration", "validation Dice (%)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for run in (run for row in rows for run in row.runs if run.best_summary):
        protocol = run.best_summary["protocol"]
        cells = [f"`{run.name}`", str(run.seed), f"{100 * run.summary['dice']['mean']:.2f}",
                 f"{100 * run.best_summary['dice']['mean']:.2f}", str(protocol.get("iteration", "?")),
                 f"{100 * protocol['val_dice']:.2f}" if "val_dice" in protocol else "?"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else []


def subset_groups(rows):
    """Rows of one configuration and evaluation protocol that differ only in the labelled draw (``--label_seed``),
    for every configuration evaluated on at least two draws, each group in the order of its draws."""
    groups = defaultdict(list)
    for row in rows:
        if row.runs and row.runs[0].label_seed is not None:
            first = row.runs[0]
            groups[config_key(first)[:-1] + protocol_key(first)].append(row)
    return [sorted(group, key=lambda r: r.runs[0].label_seed) for group in groups.values() if len(group) > 1]


def subset_lines(rows):
    """The two-level table of the spread of Dice: per labelled draw over training seeds, then across draws, and
    which of the two spreads is larger."""
    header = ["data", "method", "labelled", "per draw: Dice (%) over training seeds", "across draws: mean ± sd of "
              "the draws' means", "within a draw: pooled sd over training seeds", "larger spread"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for group in subset_groups(rows):
        dice = [[100 * run.summary["dice"]["mean"] for run in row.runs] for row in group]
        per_draw = "<br>".join(f"draw {row.runs[0].label_seed}: {seed_statistic(values, 1)} ({len(values)} "
                               f"seed{'s' if len(values) > 1 else ''})" for row, values in zip(group, dice))
        means = [statistics.fmean(values) for values in dice]
        variances = [statistics.variance(values) for values in dice if len(values) > 1]
        across = statistics.stdev(means)
        within = math.sqrt(statistics.fmean(variances)) if variances else None
        larger = "–" if within is None else "the labelled draw" if across > within else "the training seed"
        first = group[0]
        cells = [first.tag, UPPER_BOUND if first.upper_bound else first.method.name, str(first.labelnum), per_draw,
                 f"{statistics.fmean(means):.2f} ± {across:.2f} ({len(group)} draws)",
                 "–" if within is None else f"{within:.2f}", larger]
        lines.append("| " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else []


# -- cells -------------------------------------------------------------------------------------------------
def seed_statistic(values, scale):
    """``mean ± std`` over seeds (sample std, n - 1; "–" with one seed) of the defined per-run means, with
    ``(k of n seeds)`` when some runs have none (every prediction empty)."""
    defined = [scale * v for v in values if v is not None]
    if not defined:
        return "undefined"
    std = f"{statistics.stdev(defined):.2f}" if len(defined) > 1 else "–"
    cell = f"{statistics.fmean(defined):.2f} ± {std}"
    return cell if len(defined) == len(values) else f"{cell} ({len(defined)} of {len(values)} seeds)"


def metric_cells(row):
    """The four metric cells of a row, or "failed / not evaluated" when no run of it has a number ("training"
    while each of its runs trains, "unfinished" when each trains or stopped to be resumed)."""
    if not row.runs:
        state = (TRAINING if all(run.training for run in row.failed)
                 else UNFINISHED if all(run.in_progress for run in row.failed) else FAILED)
        return [state] * len(METRIC_COLUMNS)
    return [seed_statistic([run.summary[key]["mean"] for run in row.runs], scale)
            for key, _, scale in METRIC_COLUMNS]


def seeds_cell(row):
    """``2 of 3 (missing 42)``: evaluated seeds out of every seed seen for the data tag, and which of the
    others failed, are training, stopped to be resumed or have no run at all."""
    evaluated = {run.seed for run in row.runs}
    failed = [run.seed for run in row.failed if not run.in_progress]
    training = [run.seed for run in row.failed if run.training]
    unfinished = [run.seed for run in row.failed if run.unfinished]
    missing = [s for s in row.tag_seeds if s not in evaluated and s not in failed + training + unfinished]
    details = [f"{what} {', '.join(map(str, seeds))}"
               for what, seeds in (("failed", failed), (TRAINING, training), (UNFINISHED, unfinished),
                                   ("missing", missing)) if seeds]
    cell = f"{len(evaluated)} of {len(row.tag_seeds)}"
    return f"{cell} ({'; '.join(details)})" if details else cell


def protocol_cell(row):
    """Training iterations, then the evaluation: patch, strides, checkpoint and folder(s), LCC, units, cases;
    for a row without evaluation, the protocol its configuration asks for."""
    run = (row.runs or row.failed)[0]
    if row.runs:
        protocol = run.summary["protocol"]
        folders = ", ".join(sorted({r.eval_dir.name for r in row.runs}))
        patch, stride_xy, stride_z, nms = (protocol["patch_size"], protocol["stride_xy"], protocol["stride_z"],
                                           protocol["nms"])
        evaluation = (f"{run.final_checkpoint} ({folders}), LCC {'on' if nms else 'off'}, "
                      f"{protocol.get('units')}, {run.summary['num_cases']} test cases")
    else:
        args = run.args
        patch, stride_xy, stride_z = args.get("patch_size"), args.get("stride_xy"), args.get("stride_z")
        evaluation = f"{run.final_checkpoint}, LCC {'on' if args['nms'] else 'off'} (configured, not evaluated)"
    patch = "×".join(map(str, patch)) if patch else "?"
    width = run.args.get("n_filters", 16)
    return (f"{'' if width == 16 else f'width {width}, '}{run.args['max_iterations']} it, patch {patch}, "
            f"stride {stride_xy}/{stride_z}, {evaluation}")


def published_cells(row):
    """Published Dice, Jaccard, 95HD, ASD and source (several sources on separate lines), for rows on the
    dataset itself only."""
    if row.tag != row.dataset:
        return ["–"] * 4 + [f"not comparable (data tag {row.tag}, not the {row.dataset} data)"]
    entries = PUBLISHED.get((row.method.key, row.dataset, row.labelnum))
    if not entries:
        return ["–"] * 4 + ["none in docs/methods/*.md"]
    values = [[getattr(entry, key) or "–" for entry in entries] for key, _, _ in METRIC_COLUMNS]
    return ["<br>".join(column) for column in values] + ["<br>".join(entry.source for entry in entries)]


# -- markdown ----------------------------------------------------------------------------------------------
def table_lines(rows):
    """The markdown table, one line per row."""
    header = (["data", "method", "labelled"] + [title for _, title, _ in METRIC_COLUMNS] + ["seeds", "protocol"]
              + [f"published {title}" for _, title, _ in METRIC_COLUMNS] + ["published source"])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = ([row.tag, row.label, str(row.labelnum)] + metric_cells(row) + [seeds_cell(row), protocol_cell(row)]
                 + published_cells(row))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(results, title, note=None, model_label=None, left_out=()):
    """The whole markdown document: title, how to read the table, the table, the notes. ``left_out``: the runs
    that were still training, or stopped to be resumed, when the run files were kept (:func:`export_run_files`)."""
    lines = [f"# {title}", ""]
    if note:
        lines += [note, ""]
    training = (f" Left out: {len(left_out)} run{'s' * (len(left_out) != 1)} unfinished (training, or stopped to "
                f"be resumed) when these run files were kept ({', '.join(f'`{name}`' for name in left_out)})."
                ) if left_out else ""
    lines += [f"Generated by `python code/report/summarize.py` from {results.num_runs} runs under "
              f"`{model_label or results.model_dir}`.{training}"
              " Each cell: mean ± standard deviation over seeds (sample, n - 1; \"–\" with one seed) of the "
              "per-run test-set means; Dice and Jaccard in %, 95HD and ASD in the units of the protocol column. The "
              "published columns quote docs/methods/*.md (other protocols and checkpoints; see there); they were "
              "not measured here. No number here was selected on the test set: every metric column is the final "
              "weights'; weights selected on validation cases held out of the "
              "training list (`--val_num`) get a table of their own, when there are any.", ""]
    lines += table_lines(results.rows)
    if results.notes:
        lines += ["", "Notes:", ""] + [f"- {note_line}" for note_line in results.notes]
    selection = selection_lines(results.rows)
    if selection:
        lines += ["", "## Weights selected on validation", "",
                  "Runs that validated on cases held out of the training list (`--val_num`, `--val_interval`) and kept "
                  "the weights with the best validation Dice (`best_val.pth`): their test Dice beside the final "
                  "weights' (the table above). The selection saw no test case.", ""] + selection
    subsets = subset_lines(results.rows)
    if subsets:
        lines += ["", "## Spread over labelled subsets", "",
                  "Configurations trained on several draws of the labelled cases (`--label_seed`): the Dice of each "
                  "draw over its training seeds, then the mean and standard deviation of the draws' means (the "
                  "spread the choice of labelled cases causes) beside the pooled standard deviation over training "
                  "seeds within a draw (the spread the seed causes).", ""] + subsets
    if results.comparisons:
        table, notes = comparison_lines(results.comparisons, results.control_comparisons)
        lines += ["", "## Paired comparison with the labelled-only V-Net", "",
                  "Each method against the labelled-only V-Net with the same labelled cases, case by case on the same "
                  "test cases (and seeds: a pair is one seed and one case): the mean difference of Dice in points, "
                  f"its bootstrap 95 % interval ({BOOTSTRAP_RESAMPLES:,} resamples of the pairs), the two-sided "
                  "Wilcoxon signed-rank p-value, the median difference (what a typical case gains), how many pairs "
                  "are better and worse, and how many cases are better in every seed (`code/report/paired.py`). "
                  "The all-labels V-Net compared the same way gives the band; \"share of the band\" places a method "
                  "in it (0 %: the labelled-only V-Net, 100 %: the all-labels one, on the method's own pairs; \"–\" "
                  f"when that band is under {MIN_BAND:g} point or not significant, p >= 0.05). "
                  "\"Gain over its own control\" compares a method the same way with its matched control: its "
                  "own script with every loss term that reads an unlabelled crop off (`--labelled_only 1`), the "
                  "same networks, batches and schedule, so it is what the unlabelled data add; \"per seed\" gives its "
                  "mean in each training seed, whose spread the pooled test does not hold. No number here was "
                  "selected on the test set.",
                  ""]
        lines += table + ([""] + [f"- {note}" for note in notes] if notes else [])
    return "\n".join(lines) + "\n"


# -- the files that define a table ---------------------------------------------------------------------------
def export_run_files(results, out, table):
    """Copy, for every run of ``results``, the small files that define its numbers into ``out`` (the run
    folders' layout kept): ``config.json``, and ``summary.json`` and ``metrics.csv`` of the evaluation the table
    uses and of the one of ``best_val.pth``, with the ``git.diff`` of each where the code had uncommitted edits,
    and what the run cost to train (``cost.json``, from its log: ``wall_times.py``); no weights, no logs. A run
    that a live process still trains, or that stopped before its end to be resumed, has no numbers yet: it is
    left out, and named in ``table`` (title, note, out, left out), which goes to ``out/table.json``, so that
    ``summarize.py --model_dir <out>`` writes the same document again without training. The run files already
    in ``out`` of a run that the model folder no longer holds (its weights deleted, a new machine) are kept as
    they are: a table grows across machines, and a result leaves it only when its folder in ``out`` is removed.
    ``out`` is replaced as a whole (built beside it, then swapped in). Returns the runs left out and the runs kept
    from ``out``."""
    staging, previous = out.with_name(out.name + ".new"), out.with_name(out.name + ".old")
    for folder in (staging, previous):
        shutil.rmtree(folder, ignore_errors=True)
    runs = [run for row in results.rows for run in row.runs + row.failed]
    table = {**table, "left_out": [run.name for run in runs if run.in_progress]}
    for run in (run for run in runs if not run.in_progress):
        destination = staging / run.name
        destination.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "git.diff", COST):
            if (run.path / name).is_file():
                shutil.copy2(run.path / name, destination / name)
        cost = run_cost(run.path, run.name) if (run.path / LOG).is_file() else None
        if cost is not None:
            write_cost(cost, destination)
        for folder in (run.eval_dir, run.best_dir):
            if folder is not None:
                (destination / folder.name).mkdir()
                for name in EVALUATION_FILES:
                    if (folder / name).is_file():
                        shutil.copy2(folder / name, destination / folder.name / name)
    kept = runs_only_in(out, results.model_dir)
    for folder in kept:
        shutil.copytree(folder, staging / folder.relative_to(out))
    staging.mkdir(parents=True, exist_ok=True)
    (staging / TABLE_FILE).write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    if out.exists():
        out.rename(previous)
    staging.rename(out)
    shutil.rmtree(previous, ignore_errors=True)
    return table["left_out"], [folder.relative_to(out).as_posix() for folder in kept]


def runs_only_in(files, model_dir):
    """The run folders of the run files ``files`` whose run the model folder does not hold (none where ``files``
    does not exist yet or is the model folder itself)."""
    if not files.is_dir() or files.resolve() == Path(model_dir).resolve():
        return []
    held = {folder.relative_to(model_dir) for folder in find_run_dirs(model_dir)}
    return [folder for folder in find_run_dirs(files) if folder.relative_to(files) not in held]


def table_settings(folder, args):
    """Title, note and output file of the document (and the runs left out as unfinished): the flags given,
    else those ``table.json`` of a folder of run files records (:func:`export_run_files`; ``folder``, the one read
    or the one written), else the defaults (``results.md`` in ``folder``, so that a bare call never overwrites a
    committed table)."""
    recorded = {}
    path = Path(folder) / TABLE_FILE
    if path.is_file():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise UserError(f"{path} cannot be read ({exc})") from None
    return {key: getattr(args, key, None) if getattr(args, key, None) is not None else recorded.get(key, default)
            for key, default in (("title", "Results"), ("note", None), ("out", str(Path(folder) / "results.md")),
                                 ("left_out", []))}


def folder_label(path):
    """How the document names the folder it was made from: relative to the repository root when inside it, so
    that the same folder gives the same document from any working directory."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def get_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default="model",
                        help="folder holding the runs, or the run files a table was made from (default: model)")
    parser.add_argument("--out", default=None,
                        help="markdown file to write, relative to the repository root (default: the one the run "
                             "files' table.json names, else results.md in --model_dir; never a committed table "
                             "unless named)")
    parser.add_argument("--title", default=None,
                        help="heading of the document (default: table.json's, else Results)")
    parser.add_argument("--note", default=None, help="paragraph printed under the heading (default: table.json's)")
    parser.add_argument("--run_files", default=None,
                        help="first copy the files that define every run's numbers (config.json, the evaluations' "
                             "summary.json and metrics.csv) into this folder, relative to the repository root, "
                             "and make the table from it: the folder is committed beside the table, and "
                             "`summarize.py --model_dir <folder>` writes the table again without training; the "
                             "files there of runs that --model_dir does not hold are kept")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    model_dir = resolve_path(args.model_dir)
    results = collect(model_dir)
    if args.run_files:
        model_dir = output_path(args.run_files)
        settings = table_settings(model_dir, args)
        settings["left_out"], kept = export_run_files(results, model_dir, settings)
        if kept:
            print(f"kept the run files of {len(kept)} run{'s' * (len(kept) != 1)} that {args.model_dir} does not "
                  f"hold: {', '.join(kept)}")
        results = collect(model_dir)
    else:
        settings = table_settings(model_dir, args)
    out = output_path(settings["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    text = render(results, settings["title"], settings["note"], model_label=folder_label(model_dir),
                  left_out=settings["left_out"])
    write_atomically(out, lambda handle: handle.write(text.encode("utf-8")))
    print(f"{len(results.rows)} rows from {results.num_runs} runs -> {out}")


if __name__ == "__main__":
    run_cli(main)
