"""Whether a finished run was trained with the settings of a command line: ``reproduce.sh`` asks before it
skips a run as "trained already", so that a table never silently shows a run made with other settings (an
``EXTRA_ARGS`` changed since, another schedule).

    python code/utils/same_settings.py model/reproduce/LA/LA_seed1337/MT_8/vnet code/train_mt_3D.py --exp ... ...

The command line is read by the training script's own parser and completed as the script completes it
(``utils.args.finalize_args``: dataset defaults, resolved paths), then compared with the run's ``config.json``,
the flags that do not change what a run computes aside. Exit status 0 when they agree, else one line naming
every difference and exit status 2.
"""
import argparse
import importlib
import json
import sys
from pathlib import Path

CODE_DIR = str(Path(__file__).resolve().parents[1])
if CODE_DIR not in sys.path:
    sys.path.insert(0, CODE_DIR)

from dataloaders.registry import get_dataset_spec  # noqa: E402
from utils.args import finalize_args, stored_args  # noqa: E402
from utils.cli import ArgumentParser, resolve_path, run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.run import changed_settings, describe_changes  # noqa: E402


def get_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory")
    parser.add_argument("script", help="the training script, e.g. code/train_mt_3D.py")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="the script's flags (with --exp)")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    run_dir = resolve_path(args.run)
    try:
        stored = stored_args(json.loads((run_dir / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{run_dir / 'config.json'} cannot be read ({type(exc).__name__}: {exc})") from None
    module = importlib.import_module(Path(args.script).stem)
    current = module.get_parser().parse_args(args.flags)
    if current.exp is None:
        raise UserError("pass --exp: the script's default experiment name is only known to its main()")
    finalize_args(current, get_dataset_spec(current.dataset))
    changes = changed_settings(stored, vars(current))
    if changes:
        raise UserError(f"{run_dir} was trained with other settings: {describe_changes(changes)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
