"""Evaluate a saved run: sliding-window inference on the test list, metrics per case, mean and std.

    python code/test_3D.py --run model/LA/Supervised_8/vnet                 # final weights, run's protocol
    python code/test_3D.py --run model/LA/Supervised_8/vnet --nms 1 --save_nii
    python code/test_3D.py --run <dir> --checkpoint iter_3000.pth --stride_xy 64 --stride_z 64

The run's ``config.json`` names the training script; that script's ``build_networks(args)`` and
``predict(nets, x)`` define the method's inference (one network, an ensemble, a fused head), so this file
stays generic. Results go to a new folder ``<run>/eval_<checkpoint>[_nms][_N]``; nothing is overwritten.
"""
import argparse
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dataloaders.registry import get_dataset_spec  # noqa: E402
from utils.checkpoint import load_checkpoint, load_models  # noqa: E402
from utils.cli import ArgumentParser, resolve_path, run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.evaluation import evaluate, format_summary, new_eval_dir, prepare_for_inference  # noqa: E402
from utils.run import snapshot_name  # noqa: E402
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
    parser.add_argument("--cases", nargs="+", default=None, help="evaluate only these case ids")
    parser.add_argument("--patch_size", type=int, nargs=3, default=None, help="default: the run's training patch")
    parser.add_argument("--stride_xy", type=int, default=None,
                        help="default: the run's (the dataset's unless given: LA 18, Pancreas 16, BraTS2019 64)")
    parser.add_argument("--stride_z", type=int, default=None,
                        help="default: the run's (the dataset's unless given: LA 4, Pancreas 16, BraTS2019 64)")
    parser.add_argument("--nms", type=int, choices=(0, 1), default=None,
                        help="keep the largest connected component (default: the run's setting)")
    parser.add_argument("--sw_batch_size", type=int, default=4, help="windows per forward pass (default: 4)")
    parser.add_argument("--spacing", type=float, nargs=3, default=None,
                        help="voxel spacing for HD95/ASD in mm (default: voxel units, as the papers)")
    parser.add_argument("--save_nii", action="store_true", help="also write predictions as NIfTI")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--progress", type=int, choices=(0, 1), default=1)
    return parser


def read_run(run_dir):
    """The run's ``config.json`` and its training-script module."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.json)")
    try:
        config = json.loads(config_path.read_text())
        script, run_args = config["script"], config["args"]
    except (ValueError, KeyError) as exc:
        raise UserError(f"{config_path} is not a valid run configuration ({exc})") from None
    try:
        module = importlib.import_module(script)
    except ImportError:
        raise UserError(f"{config_path} names the script {script!r}, which is not in code/") from None
    if not all(hasattr(module, name) for name in ("build_networks", "predict")):
        raise UserError(f"{script}.py does not define build_networks() and predict()")
    return config, argparse.Namespace(**run_args), module


def checkpoint_path(run_dir, run_args, checkpoint):
    """``--checkpoint`` as a file of the run, else as a path; default: the final weights."""
    if checkpoint is None:
        path = run_dir / snapshot_name(run_args.max_iterations)
        if not path.is_file():
            raise UserError(f"{run_dir} has no final weights {path.name} (unfinished run? continue it with "
                            "--resume, or pass --checkpoint latest.pth)")
        return path
    in_run = run_dir / checkpoint
    return in_run if in_run.is_file() else resolve_path(checkpoint)


def main(argv=None):
    args = get_parser().parse_args(argv)
    run_dir = resolve_path(args.run)
    config, run_args, module = read_run(run_dir)
    spec = get_dataset_spec(run_args.dataset)
    root = resolve_path(args.root_path) if args.root_path else Path(run_args.root_path)
    patch_size = args.patch_size or run_args.patch_size
    stride_xy = args.stride_xy or run_args.stride_xy
    stride_z = args.stride_z or run_args.stride_z
    nms = bool(run_args.nms if args.nms is None else args.nms)
    if args.sw_batch_size < 1:
        raise UserError(f"--sw_batch_size must be at least 1, got {args.sw_batch_size}")
    check_window(patch_size, stride_xy, stride_z)
    device = select_device(args.device)

    path = checkpoint_path(run_dir, run_args, args.checkpoint)
    nets = module.build_networks(run_args)
    state = load_checkpoint(path)
    load_models(state, nets, path, config["script"])
    prepare_for_inference(nets, device)
    dataset = spec.dataset_class(root, args.split, case_ids=args.cases)

    out_dir = new_eval_dir(run_dir, path.name, nms)
    summary = evaluate(
        lambda x: module.predict(nets, x), dataset, out_dir, patch_size=patch_size, stride_xy=stride_xy,
        stride_z=stride_z, num_classes=spec.num_classes, device=device, sw_batch_size=args.sw_batch_size,
        nms=nms, spacing=args.spacing, save_nii=args.save_nii,
        protocol_extra={"checkpoint": str(path.name), "iteration": state.get("iteration"), "split": args.split},
        progress=bool(args.progress))
    print(f"{run_dir.name} {path.name}: {format_summary(summary)}")
    print(f"per-case metrics: {out_dir / 'metrics.csv'}")


if __name__ == "__main__":
    run_cli(main)
