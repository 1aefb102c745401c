"""Command-line plumbing shared by every script: one-line errors, repository-relative paths.

Every entry point does ``run_cli(main)``: a :class:`~utils.errors.UserError` raised anywhere below
becomes ``error: <message>`` on stderr and exit status 2, instead of a traceback from deep inside
numpy or h5py. Argument errors from :class:`ArgumentParser` are reported the same way.
"""
import argparse
import sys
from pathlib import Path

from utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
EXIT_USER_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (no usage dump) and exit 2."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def run_cli(main, argv=None):
    """Call ``main(argv)`` and exit with its return value; user errors become one line and exit 2.

    ``KeyboardInterrupt`` exits 130 with a one-line note (a training run's last checkpoint is
    already on disk, so ``--resume`` continues it).
    """
    try:
        status = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)


def resolve_path(path, default_base=REPO_ROOT):
    """Resolve a user path: as given when absolute or existing relative to the working directory,
    otherwise relative to ``default_base`` (the repository root), so that the documented commands
    work from any directory."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path.resolve()
    return (Path(default_base) / path).resolve()


def output_path(path):
    """An output path: as given when absolute, else under the repository root (never the working directory,
    so that a documented output such as ``docs/results.md`` lands in the repository from anywhere)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path
