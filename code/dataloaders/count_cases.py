"""How many case ids a split list holds, read as every script reads it (``read_list``: lines stripped of spaces
and carriage returns, blank ones ignored): ``reproduce.sh`` sizes its all-labels run with it.

    python code/dataloaders/count_cases.py data/LA/train.list      # prints 80

One line and exit status 2 for a list the scripts would refuse (missing, empty, not UTF-8, repeated ids).
Torch-free.
"""
import sys
from pathlib import Path

CODE_DIR = str(Path(__file__).resolve().parents[1])
if CODE_DIR not in sys.path:
    sys.path.insert(0, CODE_DIR)

from dataloaders.h5_dataset import read_list  # noqa: E402
from utils.cli import ArgumentParser, resolve_path, run_cli  # noqa: E402


def get_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("list", help="a split list, e.g. data/LA/train.list")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    print(len(read_list(resolve_path(args.list))))


if __name__ == "__main__":
    run_cli(main)
