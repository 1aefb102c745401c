"""Whether two checkpoints hold the same weights, bit for bit: were two runs the same training?

Two trainings that should compute the same thing (a method's control and another method's control with every
unlabelled term off; one command trained by two commits of the code; a run interrupted and resumed against one
that was not) can be checked here without trusting a Dice that agrees to two decimals:

    python code/report/same_weights.py <run A>/iter_3375.pth <run B>/iter_3375.pth

Every tensor of every network in the checkpoints' ``models`` is compared: shape, dtype, then its bytes (so
-0.0 differs from 0.0, and a NaN equals the same NaN). Exit status 0 and one line when all are equal; else a
line naming what differs (a tensor only one holds, or the first differing tensors with their largest absolute
difference) and exit status 1.
"""
import sys
from pathlib import Path

import torch

CODE_DIR = str(Path(__file__).resolve().parents[1])
if CODE_DIR not in sys.path:
    sys.path.insert(0, CODE_DIR)

from utils.checkpoint import load_checkpoint  # noqa: E402
from utils.cli import ArgumentParser, resolve_path, run_cli  # noqa: E402

SHOWN = 3  # differing tensors named in the message


def model_tensors(state):
    """``{"network/parameter": tensor}`` of a checkpoint's ``models``."""
    return {f"{network}/{name}": tensor for network, weights in state["models"].items()
            for name, tensor in weights.items()}


def same_bits(a, b):
    """Whether two tensors of one shape and dtype hold the same bytes."""
    return torch.equal(*(t.detach().reshape(-1).contiguous().view(torch.uint8) for t in (a, b)))


def differences(first, second):
    """What differs between two ``{name: tensor}``: names only one holds, then tensors that are not equal (with
    the largest absolute difference where the shapes agree), as short phrases; empty when they are the same."""
    found = [f"{name} only in the first" for name in first if name not in second]
    found += [f"{name} only in the second" for name in second if name not in first]
    for name in first:
        if name not in second:
            continue
        a, b = first[name], second[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            found.append(f"{name} ({tuple(a.shape)} {a.dtype} against {tuple(b.shape)} {b.dtype})")
        elif not same_bits(a, b):
            found.append(f"{name} (largest difference {(a.double() - b.double()).abs().max().item():.3g})")
    return found


def get_parser():
    parser = ArgumentParser(description="Whether two checkpoints hold the same weights, bit for bit.")
    parser.add_argument("first", help="a checkpoint (iter_N.pth, latest.pth, best_val.pth)")
    parser.add_argument("second", help="the checkpoint to compare it with")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    first, second = (resolve_path(path) for path in (args.first, args.second))
    tensors = [model_tensors(load_checkpoint(path, hint="name another checkpoint")) for path in (first, second)]
    found = differences(*tensors)
    if found:
        shown = "; ".join(found[:SHOWN]) + (f"; and {len(found) - SHOWN} more" if len(found) > SHOWN else "")
        print(f"DIFFERENT: {len(found)} of {len(tensors[0])} tensors: {shown}")
        raise SystemExit(1)
    print(f"the same weights, bit for bit: {len(tensors[0])} tensors of "
          f"{len({name.split('/')[0] for name in tensors[0]})} network(s)")


if __name__ == "__main__":
    run_cli(main)
