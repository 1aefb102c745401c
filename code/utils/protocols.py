"""The protocols of training scripts, for ``reproduce.sh``: one line per method, read from each script's parser.

    python code/utils/protocols.py mt mymt

A method ``name`` is the script ``code/train_<name>_3D.py``; what the script's ``--print_protocol`` prints
(``utils.args.protocol``: run folder name, network, iterations, labelled-only or semi-supervised, whether it has a
matched control and ``--recompute``, the flags counted in iterations) comes out as one tab-separated line::

    mt	MT	vnet	6000	1	1	0	--lr_step 2500 --iterations_per_epoch 150.0

so that ``reproduce.sh`` runs a copied script like any other without restating its protocol. All scripts are read in
one process (one import of torch). A script that is missing, cannot be imported, or does not build its parser with
``utils.args.training_parser``, and two methods whose runs would share a folder name, are one line and exit 2.
"""
import importlib.util
import re
import sys
import traceback
from pathlib import Path

CODE_DIR = Path(__file__).resolve().parents[1]
if str(CODE_DIR) not in sys.path:
    sys.path.insert(0, str(CODE_DIR))

from utils.args import protocol_text  # noqa: E402
from utils.cli import ArgumentParser, run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402

FIELDS = ("exp", "model", "max_iterations", "semi_supervised", "control", "recompute", "schedule")
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def get_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="+", help="method names: code/train_<name>_3D.py")
    return parser


def script_of(method):
    """The training script of ``method``; a name that is no script's is a :class:`UserError`."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", method):
        raise UserError(f"'{method}' is not a method name (letters, digits and _: code/train_<name>_3D.py)")
    script = CODE_DIR / f"train_{method}_3D.py"
    if not script.is_file():
        known = sorted(path.name[len("train_"):-len("_3D.py")] for path in CODE_DIR.glob("train_*_3D.py"))
        raise UserError(f"unknown method '{method}': there is no code/{script.name} (known: {' '.join(known)})")
    return script


def parser_of(method):
    """The parser the script of ``method`` trains with (its ``get_parser()``), the script imported as a module."""
    script = script_of(method)
    spec = importlib.util.spec_from_file_location(f"method_script_{method}", script)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        parser = module.get_parser()
    except Exception as exc:  # a copied script being edited: say where it failed, in one line
        where = traceback.extract_tb(exc.__traceback__)[-1]
        raise UserError(f"code/{script.name} cannot say its protocol: {type(exc).__name__}: {exc} "
                        f"({Path(where.filename).name}, line {where.lineno})") from None
    if not hasattr(parser, "schedule_flags"):
        raise UserError(f"code/{script.name} cannot say its protocol: its get_parser() does not build on "
                        "utils.args.training_parser")
    return parser


def method_protocol(method):
    """The protocol of ``method`` as text (``utils.args.protocol_text``); its run folder name checked."""
    described = protocol_text(parser_of(method))
    if not FOLDER_NAME.fullmatch(described["exp"]):
        raise UserError(f"code/train_{method}_3D.py: its --exp default names the folder '{described['exp']}'; "
                        "reproduce.sh needs one folder name (letters, digits, . _ -)")
    return described


def main(argv=None):
    args = get_parser().parse_args(argv)
    protocols = {method: method_protocol(method) for method in dict.fromkeys(args.methods)}
    owners = {}
    for method, described in protocols.items():
        exp = described["exp"]
        if exp in owners:
            raise UserError(f"methods {owners[exp]} and {method} both name their runs {exp} (the --exp default in "
                            f"their get_parser()): their runs would share folders; give code/train_{method}_3D.py "
                            "its own exp=")
        owners[exp] = method
    print("\n".join("\t".join(str(v) for v in [method, *(described[f] for f in FIELDS)])
                    for method, described in protocols.items()))
    return 0


if __name__ == "__main__":
    run_cli(main)
