"""Evaluate weights another repository released, with this repository's evaluator.

    python code/test_released.py --weights ../DTC/model/DTC_16labels/best_model.pth --arch dtc
    python code/test_released.py --weights ../UA-MT/model/UAMT_unlabel/iter_6000.pth --arch vnet --nms 1

The anchors save a bare ``state_dict`` of their network (``torch.save(net.state_dict(), ...)``), each read by its
own test script; here every such file is read into our network of the same architecture (``--arch``, with the
anchor's key names mapped to ours) and evaluated exactly as our runs are (``utils.evaluation``: sliding window,
metrics, per-case CSV), so that published numbers and ours are measured the same way. The result goes to a new
folder ``<out>/eval_<weights stem>[_nms][_N]``; nothing is overwritten.

Architectures (``--arch``):

- ``vnet``: the V-Net of UA-MT (``code/networks/vnet.py`` of yulequan/UA-MT), also SSL4MIS's and this repository's
  labelled-only, MT, UA-MT and CPS networks: two output classes, softmax. Its keys are ours.
- ``dtc``: DTC's dual-task V-Net (``code/networks/vnet_sdf.py`` of HiLab-git/DTC): one output channel, sigmoid.
  DTC's ``out_conv2`` is the segmentation head (our ``out_conv``) and its ``out_conv``, through ``tanh``, the
  distance head (our ``out_conv_sdf``).

Keys saved through ``nn.DataParallel`` (``module.`` prefix) are read as well. A file whose keys or shapes do not
match the architecture is refused in one line naming them.
"""
import sys
from collections import namedtuple
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import importlib  # noqa: E402

import torch  # noqa: E402

from dataloaders.registry import get_dataset_spec  # noqa: E402
from dataloaders.training_data import evaluation_warnings  # noqa: E402
from test_3D import check_settings, check_window_fits  # noqa: E402
from utils.args import add_evaluation_args  # noqa: E402
from utils.cli import ArgumentParser, output_path, resolve_path, run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.evaluation import evaluate, format_summary, prepare_for_inference  # noqa: E402
from utils.runtime import select_device  # noqa: E402

# An architecture: the training script whose build_networks() and predict() it is (at the script's defaults,
# width 16), and how the anchor's key prefixes map to ours (the first matching prefix applies).
Arch = namedtuple("Arch", ["script", "renames", "source"])
ARCHS = {
    "vnet": Arch("train_supervised_3D", (), "yulequan/UA-MT code/networks/vnet.py"),
    "dtc": Arch("train_dtc_3D", (("out_conv2.", "out_conv."), ("out_conv.", "out_conv_sdf.")),
                "HiLab-git/DTC code/networks/vnet_sdf.py"),
}
SHOWN_KEYS = 5


def get_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="the released file: a state dict saved with torch.save")
    parser.add_argument("--arch", required=True, choices=sorted(ARCHS), help="the network the file belongs to")
    parser.add_argument("--dataset", default="LA", help="LA, Pancreas or BraTS2019 (default: LA)")
    parser.add_argument("--root_path", default=None, help="data root (default: the dataset's folder under data/)")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--patch_size", type=int, nargs=3, default=None,
                        help="sliding window (default: the dataset's training patch, 112 112 80 for LA)")
    parser.add_argument("--stride_xy", type=int, default=None, help="default: the dataset's (LA 18)")
    parser.add_argument("--stride_z", type=int, default=None, help="default: the dataset's (LA 4)")
    parser.add_argument("--nms", type=int, choices=(0, 1), default=0,
                        help="keep the largest connected component (default: 0, our protocol; the anchors' "
                             "test scripts differ, see docs/methods/)")
    parser.add_argument("--out", default=None,
                        help="folder for the evaluation (default: model/released/<folder of the weights>)")
    add_evaluation_args(parser)
    return parser


def read_state_dict(path):
    """The tensors of a released file: a bare state dict, or one under ``state_dict``; ``module.`` prefixes
    dropped. One line for a file that is missing, not loadable without running its code, or not a state dict."""
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types; its advice to drop weights_only is unsafe
        raise UserError(f"--weights {path} cannot be read as plain tensors ({type(exc).__name__}); it is not a "
                        "state dict saved with torch.save") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if isinstance(state, dict) and "models" in state and "format" in state:
        raise UserError(f"--weights {path} is a checkpoint of this repository: evaluate its run with "
                        "code/test_3D.py --run <run folder> --checkpoint <file>")
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"--weights {path} is not a state dict (a mapping of parameter names to tensors)")
    return {key[len("module."):] if key.startswith("module.") else key: value for key, value in state.items()}


def our_key(key, renames):
    """``key`` with the first matching anchor prefix of ``renames`` replaced by ours."""
    for theirs, ours in renames:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key


def describe(keys):
    """``a, b, c, ... (12 in all)``."""
    keys = sorted(keys)
    return ", ".join(keys[:SHOWN_KEYS]) + (f", ... ({len(keys)} in all)" if len(keys) > SHOWN_KEYS else "")


def load_released(path, arch):
    """``(networks, predict)`` of ``arch`` holding the weights of the released file ``path``, on the CPU."""
    spec = ARCHS[arch]
    module = importlib.import_module(spec.script)
    nets = module.build_networks(module.get_parser().parse_args([]))
    net = nets["model"]
    state = {our_key(key, spec.renames): value for key, value in read_state_dict(path).items()}
    expected = net.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise UserError(f"--weights {path} does not fit --arch {arch} ({spec.source}): "
                        + "; ".join(f"{what}: {describe(keys)}" for what, keys in
                                    (("missing", missing), ("unexpected", unexpected)) if keys))
    wrong = [f"{key} {tuple(state[key].shape)} (ours {tuple(value.shape)})" for key, value in expected.items()
             if state[key].shape != value.shape]
    if wrong:
        raise UserError(f"--weights {path} does not fit --arch {arch} ({spec.source}): shapes differ: "
                        f"{describe(wrong)}")
    net.load_state_dict(state)
    return nets, module.predict


def main(argv=None):
    args = get_parser().parse_args(argv)
    weights = resolve_path(args.weights)
    dataset = get_dataset_spec(args.dataset)
    root = resolve_path(args.root_path or dataset.default_root)
    patch_size = args.patch_size or list(dataset.patch_size)
    stride_xy = dataset.stride_xy if args.stride_xy is None else args.stride_xy
    stride_z = dataset.stride_z if args.stride_z is None else args.stride_z
    check_settings(args, patch_size, stride_xy, stride_z)
    device = select_device(args.device)
    nets, predict = load_released(weights, args.arch)
    cases = dataset.dataset_class(root, args.split, case_ids=args.cases)
    for warning in evaluation_warnings(cases):
        print(f"warning: {warning}", file=sys.stderr)
    prepare_for_inference(nets, device)
    check_window_fits(importlib.import_module(ARCHS[args.arch].script), nets, patch_size, device, patch_size)
    out = output_path(args.out or f"model/released/{weights.parent.name}")
    out.mkdir(parents=True, exist_ok=True)
    summary, out_dir = evaluate(
        lambda x: predict(nets, x), cases, out, weights.name, patch_size=patch_size, stride_xy=stride_xy,
        stride_z=stride_z, num_classes=dataset.num_classes, device=device, sw_batch_size=args.sw_batch_size,
        nms=bool(args.nms), spacing=args.spacing, save_nii=args.save_nii,
        protocol_extra={"checkpoint": weights.name, "weights": str(weights), "arch": args.arch,
                        "split": args.split},
        source={"weights": weights, "network": None, "evaluator": "test_released"}, progress=bool(args.progress))
    print(f"{weights} (--arch {args.arch}): {format_summary(summary)}")
    print(f"per-case metrics: {out_dir / 'metrics.csv'}")


if __name__ == "__main__":
    run_cli(main)
