"""Evaluate a method on a list of cases: sliding window, optional largest component, metrics, files.

Used by every training script at the end of its run and by ``test_3D.py``, so both write the same files
into a fresh folder ``<run>/eval_<checkpoint>[_nms]`` (suffixed ``_2``, ``_3``, ... rather than ever
replacing an earlier evaluation). The folder appears only complete: the files are written into a hidden
``<run>/.partial-eval-*`` folder, which is renamed when the last file is there, so an evaluation that is
killed leaves no ``eval_*`` folder that a reader (``reproduce.sh``, ``summarize.py``) could take as done; the
next evaluation of the run removes what a killed one left.

- ``metrics.csv``: one row per case (dice, jaccard, hd95, asd, empty_pred, empty_gt) and mean/std rows;
- ``summary.json``: means, standard deviations, counts, the protocol behind them and what was evaluated (the
  ``provenance`` record of ``utils.provenance``: weights, network, cases, code);
- ``git.diff``: the code's uncommitted edits, when there are any;
- with ``save_nii``: ``<case>_pred.nii.gz``, ``<case>_img.nii.gz``, ``<case>_gt.nii.gz``.

:func:`validation_dice` is the lighter periodic validation during a run (``--val_interval``): mean Dice only,
no files.
"""
import contextlib
import csv
import importlib.util
import json
import math
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from tqdm import tqdm

from utils.cli import bar_interval
from utils.errors import UserError, raise_swallowed_stop
from utils.folder_lock import LOCK_FILE, FolderLock, is_abandoned
from utils.metrics import calculate_metric_percase, dice_score, largest_connected_component, summarize_metrics
from utils.provenance import evaluation_record
from utils.sliding_window import channels_last, keep_freed_memory, sliding_window_inference

METRICS = ("dice", "jaccard", "hd95", "asd")
PARTIAL_PREFIX = ".partial-eval-"
LOCKLESS_AFTER_SECONDS = 60


def check_evaluation_dependencies(save_nii=False):
    """The evaluation's optional imports (medpy for the surface distances, nibabel for ``--save_nii``), checked
    before a run starts rather than after hours of training. Found, not imported: importing medpy's metrics (and
    with them scipy.stats) costs about 1 s at every start, which a run that never evaluates should not pay."""
    needed = ["medpy"] + (["nibabel"] if save_nii else [])
    for package in needed:
        if importlib.util.find_spec(package) is None:
            raise UserError(f"{package} is not installed and the evaluation needs it: "
                            "pip install -r requirements.txt")


def prepare_for_inference(nets, device):
    """Move the networks to ``device`` in eval mode; on the CPU also use the channels-last-3d layout and
    let malloc keep freed memory, which together made sliding-window inference about 2x faster on our
    2-core CPU with identical predictions (docs/benchmarks.md). Not applied on a GPU until measured there."""
    for net in nets.values():
        net.to(device).eval()
        if device.type == "cpu":
            channels_last(net)
    if device.type == "cpu":
        keep_freed_memory()


def selection_record(state):
    """What an evaluation's summary keeps of how its checkpoint was chosen: for ``best_val.pth`` (``state`` holds
    ``val_dice``), that validation selected it, and its validation Dice; nothing for any other checkpoint."""
    if "val_dice" not in state:
        return {}
    return {"selected_on": "validation", "val_dice": float(state["val_dice"])}


def new_eval_dir(run_dir, checkpoint_name, nms):
    """A folder name that does not exist yet: ``eval_<checkpoint>[_nms]``, then ``_2``, ``_3``..."""
    base = f"eval_{Path(checkpoint_name).stem}" + ("_nms" if nms else "")
    candidate, index = Path(run_dir) / base, 1
    while candidate.exists():
        index += 1
        candidate = Path(run_dir) / f"{base}_{index}"
    return candidate


def _save_nii(path, volume, spacing):
    import nibabel as nib

    affine = np.diag(list(spacing or (1.0, 1.0, 1.0)) + [1.0])
    nib.save(nib.Nifti1Image(np.asarray(volume), affine), str(path))


def _write_csv(path, rows, summary):
    fields = ["case"] + list(METRICS) + ["empty_pred", "empty_gt"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in fields})
        for stat in ("mean", "std"):
            writer.writerow({"case": stat, **{m: summary[m][stat] for m in METRICS}})


def format_summary(summary):
    """One line: ``Dice 89.12 +- 3.40 | Jaccard ... | 95HD ... | ASD ... (20 cases, ...)``."""
    parts = [f"Dice {100 * summary['dice']['mean']:.2f} +- {100 * summary['dice']['std']:.2f}",
             f"Jaccard {100 * summary['jaccard']['mean']:.2f} +- {100 * summary['jaccard']['std']:.2f}",
             f"95HD {summary['hd95']['mean']:.2f} +- {summary['hd95']['std']:.2f}",
             f"ASD {summary['asd']['mean']:.2f} +- {summary['asd']['std']:.2f}"]
    protocol = summary["protocol"]
    notes = [f"{summary['num_cases']} cases", f"LCC {'on' if protocol['nms'] else 'off'}", protocol["units"]]
    if summary["num_empty_pred"]:
        notes.append(f"{summary['num_empty_pred']} empty predictions (HD/ASD undefined, excluded)")
    if summary.get("num_empty_gt"):
        cases = ", ".join(summary.get("empty_gt_cases", []))
        notes.append(f"{summary['num_empty_gt']} cases with an empty ground truth ({cases}): Dice 1 only for an "
                     "empty prediction, else 0")
    return " | ".join(parts) + f" ({', '.join(notes)})"


def evaluate(predict, dataset, run_dir, checkpoint_name, *, patch_size, stride_xy, stride_z, num_classes, device,
             sw_batch_size=4, nms=False, spacing=None, save_nii=False, protocol_extra=None, source=None,
             progress=True):
    """Evaluate ``predict`` on every case of ``dataset``; return ``(summary, folder)``, the folder being the new
    ``<run_dir>/eval_<checkpoint>[_nms][_N]`` (:func:`new_eval_dir`) that holds the result files.

    ``source`` says what is evaluated, ``{"weights": <checkpoint file>, "network": <name or None>, "evaluator":
    <script>}``; the summary then carries its ``provenance`` record (``utils.provenance``): the weights' hash,
    the exact cases, the code.

    The files are written into a hidden partial folder that is renamed only when complete; an evaluation that
    fails or is interrupted leaves nothing behind (a killed one leaves its partial folder, which the next
    evaluation of the run removes)."""
    run_dir = Path(run_dir)
    remove_abandoned_partials(run_dir)
    partial = run_dir / f"{PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    partial.mkdir()
    lock = FolderLock(partial).acquire("evaluation folder")
    try:
        summary = _evaluate_into(predict, dataset, partial, patch_size, stride_xy, stride_z, num_classes, device,
                                 sw_batch_size, nms, spacing, save_nii, protocol_extra, progress)
        if source is not None:
            summary["provenance"] = evaluation_record(
                run_dir, source["weights"], network=source.get("network"), split=dataset.split,
                cases=dataset.case_ids, split_cases=dataset.split_ids, evaluator=source["evaluator"], out_dir=partial)
        write_summary(partial, summary)
        raise_swallowed_stop()
        out_dir = publish(partial, run_dir, checkpoint_name, nms)
    except BaseException:
        lock.release()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    (out_dir / LOCK_FILE).unlink(missing_ok=True)
    lock.release()
    return summary, out_dir


def publish(partial, run_dir, checkpoint_name, nms):
    """Rename the complete ``partial`` folder to the first free ``eval_...`` name (see :func:`new_eval_dir`);
    a name that another evaluation takes meanwhile is skipped."""
    while True:
        target = new_eval_dir(run_dir, checkpoint_name, nms)
        try:
            partial.rename(target)
            return target
        except OSError:
            if not target.exists():
                raise


def remove_abandoned_partials(run_dir):
    """Remove the partial folders of evaluations that were killed: no live process holds their lock, or, for one
    killed between creating its folder and taking the lock, no lock file and its creator (the pid in its name) is
    gone or the folder is older than :data:`LOCKLESS_AFTER_SECONDS` (a live evaluation takes its lock at once)."""
    for folder in Path(run_dir).glob(f"{PARTIAL_PREFIX}*"):
        if not folder.is_dir():
            continue
        if (folder / LOCK_FILE).exists():
            abandoned = is_abandoned(folder)
        else:
            abandoned = not creator_alive(folder) or time.time() - folder.stat().st_mtime > LOCKLESS_AFTER_SECONDS
        if abandoned:
            shutil.rmtree(folder, ignore_errors=True)


def creator_alive(partial):
    """Whether the process that created the partial folder (its pid is in the name) still runs here."""
    pid = partial.name[len(PARTIAL_PREFIX):].split("-")[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def eval_mode(nets):
    """The networks in eval mode inside the block; after it every module has its own mode back (a teacher
    that a method keeps in train mode for its dropout stays so), even when the block fails."""
    modes = {name: [module.training for module in net.modules()] for name, net in nets.items()}
    for net in nets.values():
        net.eval()
    try:
        yield nets
    finally:
        for name, net in nets.items():
            for module, training in zip(net.modules(), modes[name]):
                module.training = training


def validation_dice(predict, dataset, *, patch_size, stride_xy, stride_z, num_classes, device, sw_batch_size=4):
    """Mean foreground Dice of ``predict``'s sliding-window predictions over every case of ``dataset``, without
    the largest-component step or the surface distances (SSL4MIS's periodic validation); writes nothing."""
    scores = []
    for index in range(len(dataset)):
        sample = dataset.load(index)
        prediction, _ = sliding_window_inference(predict, sample["image"], patch_size, stride_xy, stride_z,
                                                 num_classes, device, sw_batch_size)
        scores.append(dice_score(prediction == 1, sample["label"] == 1))
    return float(np.mean(scores))


def _evaluate_into(predict, dataset, out_dir, patch_size, stride_xy, stride_z, num_classes, device,
                   sw_batch_size, nms, spacing, save_nii, protocol_extra, progress):
    """The body of :func:`evaluate`."""
    rows, started = [], time.time()
    for index in tqdm(range(len(dataset)), desc="evaluate", ncols=80, disable=not progress, leave=False,
                      mininterval=bar_interval(sys.stderr)):
        sample = dataset.load(index)
        prediction, _ = sliding_window_inference(predict, sample["image"], patch_size, stride_xy, stride_z,
                                                 num_classes, device, sw_batch_size)
        if nms:
            prediction = largest_connected_component(prediction)
        row = calculate_metric_percase(prediction == 1, sample["label"] == 1, spacing)
        rows.append({"case": sample["case"], **row})
        if save_nii:
            for suffix, volume in (("pred", prediction), ("img", sample["image"]), ("gt", sample["label"])):
                _save_nii(out_dir / f"{sample['case']}_{suffix}.nii.gz", volume, spacing)
    summary = summarize_metrics(rows, METRICS)
    summary["empty_gt_cases"] = [row["case"] for row in rows if row["empty_gt"]]
    summary["protocol"] = {
        "patch_size": list(patch_size), "stride_xy": stride_xy, "stride_z": stride_z, "nms": bool(nms),
        "units": "mm" if spacing else "voxels", "spacing": list(spacing) if spacing else None,
        "hd95": "medpy hd95", "asd": "medpy asd (prediction to ground truth, as the anchors)",
        "seconds": round(time.time() - started, 2), **(protocol_extra or {}),
    }
    _write_csv(out_dir / "metrics.csv", rows, summary)
    return summary


def write_summary(out_dir, summary):
    """``summary.json`` of an evaluation folder."""
    (out_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")


def _json_safe(value):
    """NaN is not JSON: write it as null."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
