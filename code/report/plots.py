"""Figures of the runs under a model folder: Dice against labelled cases, training curves, a segmentation overlay.

    python code/report/plots.py --model_dir model --out docs/figures [--case <id>] [--device auto]

Runs are read and grouped exactly as ``summarize.py`` does (same rows, same evaluation chosen per run). It
writes PNGs (matplotlib's Agg backend, no display needed) into ``--out``:

- ``dice_vs_labelled_<tag>.png``: test Dice (mean over seeds, bars from the lowest to the highest seed) against
  the number of labelled cases, one line per method; the all-labels V-Net as a dashed horizontal line.
- ``curves_<tag>_<method>_<labelled>.png``: every value logged per iteration in each run's ``log.txt`` (loss
  terms, lr, consistency weight, the validation Dice of ``--val_interval`` (``iteration N : val_dice : value``),
  and any other ``name: number`` on an iteration line), one panel per value, seeds overlaid. Failed runs are
  drawn too (their logs show where they stopped).
- ``overlay_<tag>_<labelled>_<case>.png``: a few axial slices of one test case (default: the first case of the
  evaluation) with the ground truth and each method's prediction (its lowest evaluated seed). Predictions come
  from ``<case>_pred.nii.gz`` in the run's evaluation folder when ``test_3D.py --save_nii`` wrote them;
  otherwise they are computed again from the final checkpoint with the run's own ``build_networks``/``predict``
  (``test_3D.read_run``) and the evaluation's protocol (patch, strides, LCC), which needs the run's data and
  costs one sliding-window inference per method (seconds on a GPU, about a minute per LA case on a CPU).
- ``paired_<tag>_<labelled>.png``: per test case (and seed), the Dice difference of each method to the
  labelled-only V-Net with the same labelled cases, one strip per method, with the mean and its bootstrap 95 %
  interval (``summarize.py``'s paired comparison); the all-labels V-Net's strip is the band.
- ``paired_control_<tag>_<labelled>.png``: the same strips of each method against its own matched control
  (``--labelled_only 1``): what its unlabelled-data terms add, case by case.

From a folder of run files (``summarize.py --run_files``: no logs, no weights) the figures that need only the
evaluations are written (Dice against labelled cases, the paired strips); the curves need ``log.txt`` and the
overlay the weights and the data.

Relative paths: ``--model_dir`` from the working directory when it exists there, else from the repository
root; ``--out`` from the repository root.
"""
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

CODE_DIR = str(Path(__file__).resolve().parents[1])
if CODE_DIR not in sys.path:
    sys.path.insert(0, CODE_DIR)

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from utils.cli import ArgumentParser, output_path, resolve_path, run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402
from report.paired import metrics_rows  # noqa: E402
from report.summarize import collect  # noqa: E402

ITERATION = re.compile(r"\biteration (\d+)\b")
TERM = re.compile(r"([A-Za-z_][\w/]*)\s*:\s*([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))(?![\w.])")
SLICE_QUANTILES = (0.25, 0.5, 0.75)
GROUND_TRUTH_FILL = ListedColormap(["lime"])
PREDICTION_FILL = ListedColormap(["red"])
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]  # one per method of figure (a), cycled
COLORS = [f"C{index}" for index in range(10)]  # matplotlib's default cycle, one per method of figure (a)


def slug(text):
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")


def save(fig, path):
    """Render ``fig`` with the Agg backend into ``path`` and return the path."""
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


# -- (a) Dice against labelled cases -------------------------------------------------------------------------
def dice_points(rows):
    """``{method label: [(labelled, mean, lowest, highest)]}`` of the evaluated rows, Dice in %."""
    points = defaultdict(list)
    for row in rows:
        dice = [100 * run.summary["dice"]["mean"] for run in row.runs if run.summary["dice"]["mean"] is not None]
        if dice:
            points[row.label].append((row.labelnum, float(np.mean(dice)), min(dice), max(dice)))
    return points


def series_styles(labels, controls):
    """``{label: errorbar keywords}`` for figure (a): each method its own colour and marker, in order, and a
    method's control (``controls``: ``{control's label: method's label}``) its method's colour and marker,
    hollow and dashed, so that the two read as a pair (matplotlib's cycle repeats after ten colours, which would
    give a sixteen-series table two identical series)."""
    def style(index):
        return {"color": COLORS[index % len(COLORS)], "marker": MARKERS[index % len(MARKERS)]}

    methods = [label for label in labels if label not in controls]
    styles = {label: style(index) for index, label in enumerate(methods)}
    for offset, label in enumerate(label for label in labels if label in controls):
        # a control whose method was not evaluated gets a style of its own, hollow too
        method = styles.get(controls[label]) or style(len(methods) + offset)
        styles[label] = {**method, "markerfacecolor": "white", "linestyle": "--"}
    return styles


def plot_dice_vs_labelled(rows, tag, out_dir, controls=None):
    """Figure (a) for one data tag; None when no run of it was evaluated. ``controls``: ``{control's label:
    method's label}`` (:func:`series_styles`)."""
    upper = dice_points([row for row in rows if row.upper_bound])
    points = dice_points([row for row in rows if not row.upper_bound])
    if not points and not upper:
        return None
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    labelnums = sorted({labelnum for series in points.values() for labelnum, *_ in series})
    shifts = dodge(len(points), labelnums)
    styles = series_styles(list(points), controls or {})
    for (label, series), shift in zip(points.items(), shifts):
        x, mean, low, high = map(np.array, zip(*sorted(series)))
        ax.errorbar(x + shift, mean, yerr=[mean - low, high - mean], capsize=3, label=label, **styles[label])
    for label, series in upper.items():
        for labelnum, mean, _, _ in series:
            ax.axhline(mean, linestyle="--", color="grey", label=f"{label} ({labelnum})")
    ax.set_xticks(labelnums)
    if labelnums:
        ax.set_xlim(*x_limits(labelnums, shifts))
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel("test Dice (%)")
    ax.set_title(f"{tag}: mean over seeds, bars from lowest to highest seed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save(fig, out_dir / f"dice_vs_labelled_{slug(tag)}.png")


def dodge(count, labelnums):
    """Horizontal shifts of ``count`` methods around each labelled count, so that methods with equal values stay
    visible side by side: spread over a third of the smallest gap between labelled counts (1 with one count)."""
    if count < 2:
        return [0.0] * count
    gaps = np.diff(labelnums)
    width = (gaps.min() if gaps.size else 1.0) / 3
    return list(np.linspace(-width / 2, width / 2, count))


def x_limits(labelnums, shifts):
    """The x range of figure (a): every dodged method with room for its marker on both sides (the outermost
    ones were clipped at the edges), as much room again as the dodge spreads them, at least half a case."""
    spread = max((abs(shift) for shift in shifts), default=0.0)
    pad = max(2 * spread, 0.5)
    return min(labelnums) - pad, max(labelnums) + pad


# -- (b) training curves -------------------------------------------------------------------------------------
def parse_log(path):
    """``{term: {iteration: value}}`` of every ``name: number`` pair on the log lines that name an iteration.
    A resumed run logs some iterations twice; the later line wins, as it is the one the run continued from."""
    curves = defaultdict(dict)
    if not Path(path).is_file():
        return curves
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        match = ITERATION.search(line)
        if match:
            for name, value in TERM.findall(line[match.end():]):
                curves[name][int(match[1])] = float(value)
    return curves


def plot_curves(runs, title, path):
    """Figure (b): one panel per logged term, one line per seed; None when no log has any term."""
    logs = [(run.seed, parse_log(run.path / "log.txt")) for run in sorted(runs, key=lambda r: r.seed)]
    terms = list(dict.fromkeys(term for _, curves in logs for term in curves))
    if not terms:
        return None
    ncols = min(4, len(terms))
    nrows = math.ceil(len(terms) / ncols)
    fig = Figure(figsize=(3.6 * ncols, 2.6 * nrows), layout="constrained")
    for index, term in enumerate(terms):
        ax = fig.add_subplot(nrows, ncols, index + 1)
        for seed, curves in logs:
            if curves.get(term):
                iterations, values = zip(*sorted(curves[term].items()))
                ax.plot(iterations, values, linewidth=0.8, label=f"seed {seed}")
        ax.set_title(term, fontsize="small")
        ax.tick_params(labelsize="x-small")
        ax.ticklabel_format(axis="y", useOffset=False)  # the values themselves, not "+1e-2" above the axis
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize="x-small")
    fig.suptitle(title)
    fig.supxlabel("iteration", fontsize="small")
    return save(fig, path)


def curve_groups(rows):
    """``{(tag, method label, labelled): runs}``, every run of a configuration once (a configuration split over
    two evaluation protocols is one training)."""
    groups = defaultdict(dict)
    for row in rows:
        for run in row.runs + row.failed:
            groups[(row.tag, row.label, row.labelnum)][run.path] = run
    return {key: list(runs.values()) for key, runs in groups.items()}


# -- (c) overlay ---------------------------------------------------------------------------------------------
def read_nii(path):
    import nibabel as nib

    return np.asanyarray(nib.load(str(path)).dataobj)


def saved_volumes(eval_dir, case):
    """``{"pred", "img", "gt"}`` volumes that ``test_3D.py --save_nii`` wrote for ``case`` (those present)."""
    files = {kind: eval_dir / f"{case}_{kind}.nii.gz" for kind in ("pred", "img", "gt")}
    return {kind: read_nii(path) for kind, path in files.items() if path.is_file()}


def predicted_volumes(run, case, device):
    """``{"pred", "img", "gt"}`` of ``case`` computed from the run's final checkpoint with its own networks and
    ``predict`` (through ``test_3D.read_run``) under the protocol of its chosen evaluation."""
    from dataloaders.registry import get_dataset_spec
    from test_3D import read_run
    from utils.checkpoint import load_checkpoint, load_models
    from utils.evaluation import prepare_for_inference
    from utils.metrics import largest_connected_component
    from utils.runtime import select_device
    from utils.sliding_window import sliding_window_inference

    config, run_args, module = read_run(run.path)
    spec = get_dataset_spec(run_args.dataset)
    path = run.path / run.final_checkpoint
    nets = module.build_networks(run_args)
    load_models(load_checkpoint(path), nets, path, config["script"])
    device = select_device(device)
    prepare_for_inference(nets, device)
    sample = spec.dataset_class(run_args.root_path, "test", case_ids=[case]).load(0)
    protocol = run.summary["protocol"]
    pred, _ = sliding_window_inference(lambda x: module.predict(nets, x), sample["image"], protocol["patch_size"],
                                       protocol["stride_xy"], protocol["stride_z"], spec.num_classes, device)
    if protocol["nms"]:
        pred = largest_connected_component(pred)
    return {"pred": pred, "img": sample["image"], "gt": sample["label"]}


def case_volumes(run, case, device):
    """The saved volumes of ``case`` when the run's evaluation folder has its prediction, else computed ones."""
    saved = saved_volumes(run.eval_dir, case)
    return saved if "pred" in saved else predicted_volumes(run, case, device)


def axial_slices(gt, depth):
    """A few axial (last-axis) slice indices: quantiles of the ground truth's extent, or of the volume."""
    z = np.flatnonzero(np.asarray(gt).any(axis=(0, 1)))
    if z.size == 0:
        z = np.arange(depth)
    return sorted({int(np.quantile(z, q, method="nearest")) for q in SLICE_QUANTILES})


def case_dice(run, case):
    """``Dice 91.20`` of ``case`` from the run's ``metrics.csv``, or "" when it is not listed there."""
    for row in metrics_rows(run.eval_dir):
        if row["case"] == case:
            return f": Dice {100 * float(row['dice']):.2f}"
    return ""


def draw_slice(ax, image, mask, gt, fill):
    """The image in grey, ``mask`` filled with the one-colour map ``fill``, the ground truth outlined in green."""
    ax.imshow(image.T, cmap="gray", origin="lower")
    if mask.any():
        ax.imshow(np.ma.masked_equal(mask.T, 0), cmap=fill, alpha=0.4, origin="lower")
    if gt.any() and not gt.all():
        ax.contour(gt.T, levels=[0.5], colors="lime", linewidths=0.7)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_overlay(rows, case, path, device):
    """Figure (c): ground truth and each row's prediction of ``case`` (one lowest-seed run per row), on the
    same slices. Rows whose prediction cannot be had are left out with a line on stderr."""
    panels, base = [], None
    for row in rows:
        run = row.runs[0]
        try:
            volumes = case_volumes(run, case, device)
        except UserError as exc:
            print(f"overlay: {run.name}: {exc}; left out", file=sys.stderr)
            continue
        if base is None and {"img", "gt"} <= set(volumes):
            base = volumes
        panels.append((f"{row.label} (seed {run.seed}){case_dice(run, case)}", volumes["pred"]))
    if base is None or not panels:
        print(f"overlay: no prediction, image and ground truth of case {case}; {path.name} not written",
              file=sys.stderr)
        return None
    gt = np.asarray(base["gt"]) > 0
    slices = axial_slices(gt, gt.shape[-1])
    fig = Figure(figsize=(2.8 * len(slices), 2.8 * (1 + len(panels))), layout="constrained")
    for r, (title, mask) in enumerate([("ground truth", gt)] + panels):
        for c, z in enumerate(slices):
            ax = fig.add_subplot(1 + len(panels), len(slices), r * len(slices) + c + 1)
            draw_slice(ax, np.asarray(base["img"])[:, :, z], np.asarray(mask)[:, :, z] > 0, gt[:, :, z],
                       GROUND_TRUTH_FILL if r == 0 else PREDICTION_FILL)
            ax.set_title(f"{title}, z={z}" if c == 0 else f"z={z}", fontsize="small")
    fig.suptitle(f"case {case}: first row the ground truth (filled green); then each prediction filled red, "
                 "with the ground truth outlined green")
    return save(fig, path)


def first_case(rows):
    """The first case of the first evaluation among ``rows`` (test-list order)."""
    for row in rows:
        cases = metrics_rows(row.runs[0].eval_dir)
        if cases:
            return cases[0]["case"]
    return None


# -- (d) paired differences ----------------------------------------------------------------------------------
def plot_paired(comparisons, tag, labelnum, path, against="the labelled-only V-Net"):
    """Figure (d) for the comparisons of ``tag`` at ``labelnum`` with ``against``."""
    fig = Figure(figsize=(7.5, 1.5 + 0.55 * len(comparisons)), layout="constrained")
    ax = fig.add_subplot()
    jitter = np.random.default_rng(0)
    for position, comparison in enumerate(comparisons):
        values = np.array([difference for _, difference in comparison.differences])
        ax.scatter(values, position + jitter.uniform(-0.18, 0.18, values.size), s=14, alpha=0.55)
        stats = comparison.stats
        ax.errorbar(stats.mean, position, xerr=[[stats.mean - stats.low], [stats.high - stats.mean]], fmt="D",
                    color="black", capsize=4, markersize=5)
    ax.axvline(0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(comparisons)))
    ax.set_yticklabels([f"{c.row.label} ({c.row.labelnum})" if c.row.upper_bound else c.row.label
                        for c in comparisons])
    ax.invert_yaxis()
    ax.set_xlabel(f"Dice difference to {against} (points), one dot per test case and seed")
    ax.set_title(f"{tag}, {labelnum} labelled: black diamond = mean, bar = bootstrap 95 % interval", fontsize="medium")
    ax.grid(axis="x", alpha=0.3)
    return save(fig, path)


# -- command line --------------------------------------------------------------------------------------------
def make_figures(results, out_dir, case=None, device="auto"):
    """Write every figure for the collected ``results``; return the paths written."""
    by_tag = defaultdict(list)
    for row in results.rows:
        by_tag[row.tag].append(row)
    controls = {comparison.baseline.label: comparison.row.label for comparison in results.control_comparisons}
    written = []
    for tag, rows in by_tag.items():
        written.append(plot_dice_vs_labelled(rows, tag, out_dir, controls))
        evaluated = defaultdict(list)
        for row in rows:
            if row.runs:
                evaluated[row.labelnum].append(row)
        for labelnum, group in sorted(evaluated.items()):
            chosen = case or first_case(group)
            if chosen:
                path = out_dir / f"overlay_{slug(tag)}_{labelnum}_{slug(chosen)}.png"
                written.append(plot_overlay(group, chosen, path, device))
    for (tag, label, labelnum), runs in curve_groups(results.rows).items():
        path = out_dir / f"curves_{slug(tag)}_{slug(label)}_{labelnum}.png"
        written.append(plot_curves(runs, f"{tag}: {label}, {labelnum} labelled", path))
    paired = defaultdict(list)
    for comparison in results.comparisons:
        paired[(comparison.baseline.tag, comparison.baseline.labelnum)].append(comparison)
    for (tag, labelnum), comparisons in sorted(paired.items()):
        written.append(plot_paired(comparisons, tag, labelnum, out_dir / f"paired_{slug(tag)}_{labelnum}.png"))
    controlled = defaultdict(list)
    for comparison in results.control_comparisons:
        controlled[(comparison.row.tag, comparison.row.labelnum)].append(comparison)
    for (tag, labelnum), comparisons in sorted(controlled.items()):
        path = out_dir / f"paired_control_{slug(tag)}_{labelnum}.png"
        written.append(plot_paired(comparisons, tag, labelnum, path, against="the method's own control"))
    return [path for path in written if path is not None]


def get_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default="model", help="folder holding the runs (default: model)")
    parser.add_argument("--out", default="docs/figures",
                        help="folder for the PNGs, relative to the repository root (default: docs/figures)")
    parser.add_argument("--case", default=None, help="test case of the overlay (default: the first evaluated)")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu or cuda[:N]: where predictions not saved as NIfTI are computed")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    results = collect(resolve_path(args.model_dir))
    out_dir = output_path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in make_figures(results, out_dir, args.case, args.device):
        print(path)


if __name__ == "__main__":
    run_cli(main)
