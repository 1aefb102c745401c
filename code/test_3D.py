"""Evaluate a saved run: sliding-window inference on the test list, metrics per case, mean and std.

    python code/test_3D.py --run model/LA/Supervised_8/vnet                 # final weights, run's protocol
    python code/test_3D.py --run model/LA/Supervised_8/vnet --nms 1 --save_nii
    python code/test_3D.py --run <dir> --checkpoint iter_3000.pth --stride_xy 64 --stride_z 64
    python code/test_3D.py --run model/LA/CPS_8/vnet --network model2       # one network in place of the other

The run's ``config.json`` names the training script; that script's ``build_networks(args)`` and
``predict(nets, x)`` define the method's inference (one network, an ensemble, a fused head), so this file
stays generic; a script whose inference reads one network names it ``INFERENCE_NETWORK``, which ``--network``
replaces. Results go to a new folder ``<run>/eval_<checkpoint>[_<network>][_nms][_N]``, which appears only once it
is complete; nothing is overwritten. Everything that can stop an evaluation (settings, data, checkpoint, a
window the networks cannot take) is checked before the first case is predicted.
"""
import argparse
import importlib
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from dataloaders.registry import get_dataset_spec  # noqa: E402
from dataloaders.training_data import evaluation_warnings  # noqa: E402
from utils.args import RUNTIME_FLAGS, add_evaluation_args, stored_args  # noqa: E402
from utils.checkpoint import load_checkpoint, load_models, other_checkpoints  # noqa: E402
from utils.cli import ArgumentParser, resolve_path, run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.evaluation import (check_evaluation_dependencies, evaluate, format_summary,  # noqa: E402
                              prepare_for_inference, selection_record)
from utils.own_result import own_evaluation  # noqa: E402
from utils.run_files import BEST_VAL, snapshot_name  # noqa: E402
from utils.runtime import select_device  # noqa: E402
from utils.sliding_window import check_window  # noqa: E402


def get_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory, e.g. model/LA/Supervised_8/vnet")
    parser.add_argument("--checkpoint", default=None,
                        help="file in the run directory or a path (default: the final iter_<max_iterations>.pth)")
    parser.add_argument("--root_path", default=None, help="data root (default: the run's)")
    parser.add_argument("--split", default="test",
                        help="split to evaluate: test, train, or val for BraTS2019 (default: test)")
    parser.add_argument("--patch_size", type=int, nargs=3, default=None, help="default: the run's training patch")
    parser.add_argument("--stride_xy", type=int, default=None,
                        help="default: the run's (the dataset's unless given: LA 18, Pancreas 16, BraTS2019 64)")
    parser.add_argument("--stride_z", type=int, default=None,
                        help="default: the run's (the dataset's unless given: LA 4, Pancreas 16, BraTS2019 64)")
    parser.add_argument("--nms", type=int, choices=(0, 1), default=None,
                        help="keep the largest connected component (default: the run's setting)")
    parser.add_argument("--network", default=None,
                        help="evaluate this network of the run in place of the one the method predicts from, e.g. "
                             "model2 (CPS's second network) or ema_model (the teacher of MT, UA-MT, UG-MCL); "
                             "results go to eval_<checkpoint>_<network> (default: the method's own inference)")
    add_evaluation_args(parser)
    return parser


def read_run(run_dir):
    """The run's ``config.json`` and its training-script module; one line for a configuration that cannot be
    read or that lacks settings the script's networks are built from."""
    config_path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found")
    if not config_path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        script, run_args = config["script"], stored_args(config)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{config_path} is not a valid run configuration ({type(exc).__name__}: {exc})") from None
    methods = sorted(path.stem for path in Path(__file__).resolve().parent.glob("train_*_3D.py"))
    if script not in methods:  # only the project's method scripts are imported, never another module it names
        raise UserError(f"{config_path} names the script {script!r}, which is not one of this project's "
                        f"training scripts ({', '.join(methods)})")
    try:
        module = importlib.import_module(str(script))
    except ImportError as exc:  # a package the script needs is missing
        raise UserError(f"{script}.py cannot be imported: {exc}") from None
    if not all(hasattr(module, name) for name in ("build_networks", "predict", "get_parser")):
        raise UserError(f"{script}.py does not define build_networks(), predict() and get_parser()")
    missing = sorted(set(vars(module.get_parser().parse_args([]))) - set(run_args) - set(RUNTIME_FLAGS))
    if missing:
        raise UserError(f"{config_path} lacks settings that {script}.py needs: "
                        f"{', '.join('--' + name for name in missing)} (written by another version of the code?)")
    return config, argparse.Namespace(**run_args), module


def checkpoint_path(run_dir, run_args, checkpoint):
    """``--checkpoint`` as a file of the run (a bare name), else as a path; default: the final weights."""
    if checkpoint is None:
        path = run_dir / snapshot_name(run_args.max_iterations)
        if not path.is_file():
            raise UserError(f"{run_dir} has no final weights {path.name} (unfinished run? continue it with "
                            "--resume, or pass --checkpoint latest.pth)")
        return path
    given = Path(checkpoint).expanduser()
    in_run = run_dir / given
    if in_run.is_file() or (len(given.parts) == 1 and not given.exists()):
        if not in_run.is_file():
            raise UserError(f"--checkpoint {checkpoint}: not in {run_dir} (its checkpoints: "
                            f"{other_checkpoints(in_run)})")
        return in_run
    return resolve_path(checkpoint)


def check_settings(args, patch_size, stride_xy, stride_z):
    """One-line errors for evaluation settings that cannot work, before anything is loaded."""
    if any(p < 16 or p % 16 for p in patch_size):
        raise UserError(f"--patch_size {' '.join(map(str, patch_size))}: each size must be a positive multiple of "
                        "16 (the networks halve the resolution four times)")
    check_window(patch_size, stride_xy, stride_z)
    if args.sw_batch_size < 1:
        raise UserError(f"--sw_batch_size must be at least 1, got {args.sw_batch_size}")
    if args.spacing is not None and not all(math.isfinite(s) and s > 0 for s in args.spacing):
        raise UserError(f"--spacing must be three positive numbers (mm per voxel), got "
                        f"{' '.join(map(str, args.spacing))}")
    check_evaluation_dependencies(args.save_nii)


def swap_network(module, nets, name):
    """``nets`` with ``name`` in place of the network that the method's ``predict`` reads (the module's
    ``INFERENCE_NETWORK``), so that the method's own output transform applies to it; one line for a method that
    predicts from several networks together, or a name that is not one of the run's networks."""
    own = getattr(module, "INFERENCE_NETWORK", None)
    if own is None:
        raise UserError(f"--network: {module.__name__}.py predicts from its networks together "
                        f"({', '.join(nets)}); there is no single one to replace")
    if name not in nets:
        raise UserError(f"--network {name}: the networks of this run are {', '.join(nets)}")
    return {**nets, own: nets[name]}


def check_window_fits(module, nets, patch_size, device, run_patch):
    """Run the method's ``predict`` once on an empty window, so that a patch the networks cannot take (UC-Seg's
    fusion head is built for its training patch) fails now, in one line, not in the middle of the test set."""
    window = torch.zeros((1, 1, *patch_size), device=device)
    try:
        with torch.inference_mode():
            module.predict(nets, window)
    except RuntimeError as exc:
        raise UserError(f"the networks of this run cannot predict a {'x'.join(map(str, patch_size))} window "
                        f"({str(exc).splitlines()[0]}); its training patch is {'x'.join(map(str, run_patch))}"
                        ) from None


def main(argv=None):
    args = get_parser().parse_args(argv)
    run_dir = resolve_path(args.run)
    config, run_args, module = read_run(run_dir)
    spec = get_dataset_spec(run_args.dataset)
    root = resolve_path(args.root_path) if args.root_path else Path(run_args.root_path)
    patch_size = args.patch_size or run_args.patch_size
    stride_xy = run_args.stride_xy if args.stride_xy is None else args.stride_xy
    stride_z = run_args.stride_z if args.stride_z is None else args.stride_z
    nms = bool(run_args.nms if args.nms is None else args.nms)
    check_settings(args, patch_size, stride_xy, stride_z)
    device = select_device(args.device)
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(f"run directory {run_dir} is not writable (the evaluation writes a folder into it)")

    path = checkpoint_path(run_dir, run_args, args.checkpoint)
    nets = module.build_networks(run_args)
    evaluated = nets if args.network is None else swap_network(module, nets, args.network)
    state = load_checkpoint(path)
    load_models(state, nets, path, config["script"])
    dataset = spec.dataset_class(root, args.split, case_ids=args.cases)
    for warning in evaluation_warnings(dataset):
        print(f"warning: {warning}", file=sys.stderr)
    prepare_for_inference(nets, device)
    check_window_fits(module, evaluated, patch_size, device, run_args.patch_size)

    name = path.name if args.network is None else f"{path.stem}_{args.network}"
    summary, out_dir = evaluate(
        lambda x: module.predict(evaluated, x), dataset, run_dir, name, patch_size=patch_size, stride_xy=stride_xy,
        stride_z=stride_z, num_classes=spec.num_classes, device=device, sw_batch_size=args.sw_batch_size,
        nms=nms, spacing=args.spacing, save_nii=args.save_nii,
        protocol_extra={"checkpoint": str(path.name), "iteration": state.get("iteration"), "split": args.split,
                        **({} if args.network is None else {"network": args.network}), **selection_record(state)},
        source={"weights": path, "network": args.network, "evaluator": "test_3D"}, progress=bool(args.progress))
    print(f"{run_dir.name} {name}: {format_summary(summary)}")
    print(f"per-case metrics: {out_dir / 'metrics.csv'}")
    standing = table_standing(run_dir, config["args"], out_dir)
    if standing:
        print(standing)


def table_standing(run_dir, run_args, out_dir):
    """What ``summarize.py`` and ``reproduce.sh`` make of the new evaluation ``out_dir`` (``utils.own_result``):
    the run's result for its final weights or ``best_val.pth``, or kept apart, and why; None for an evaluation
    of another checkpoint, which no table reads."""
    for checkpoint in (None, BEST_VAL):
        result = own_evaluation(run_dir, run_args, checkpoint)
        if result.chosen is not None and result.chosen.folder == out_dir:
            return f"the run's result in tables ({result.chosen.folder.name})"
        for other in result.others:
            if other.folder == out_dir:
                why = ", ".join(other.problems) or f"{result.chosen.folder.name} is preferred"
                return f"note: kept apart from the run's result in tables ({why})"
    return None


if __name__ == "__main__":
    run_cli(main)
