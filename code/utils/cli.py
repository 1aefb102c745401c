"""Command-line plumbing shared by every script: one-line errors, signals, repository-relative paths.

Every entry point does ``run_cli(main)``: a :class:`~utils.errors.UserError` raised anywhere below
becomes ``error: <message>`` on stderr and exit status 2, instead of a traceback from deep inside
numpy or h5py; so does an ``OSError`` (a full disk, a folder that cannot be written). Argument errors from
:class:`ArgumentParser` are reported the same way. SIGINT (Ctrl-C) and SIGTERM (what schedulers send before
they kill a job) raise :class:`~utils.errors.Interrupted`, so ``finally`` blocks run and the process exits
with ``128 + signal`` (130, 143); a training loop replaces them with handlers that first save a
checkpoint (``utils.run.TrainingRun``).
"""
import argparse
import errno
import gc
import os
import signal
import sys
from pathlib import Path

from utils.errors import Interrupted, UserError, keep_swallowed_stop, raise_swallowed_stop

REPO_ROOT = Path(__file__).resolve().parents[2]
EXIT_USER_ERROR = 2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` ends every flag's text with its default, as the user gets it, unless the text already says
    what the default is; a switch (off unless given) and a flag without default (None: not used unless given)
    need none."""

    def _get_help_string(self, action):
        text = action.help or ""
        silent = isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction)) or action.default is None
        if silent or "default" in text or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (no usage dump) and exit 2, and whose ``--help``
    shows every default (:class:`DefaultsHelpFormatter`).

    Flags must be spelled out (no abbreviations), so that a command line means the same thing when it is
    stored in ``config.json`` or printed back as the command that resumes a run."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def bar_interval(stream):
    """Seconds between a progress bar's updates on ``stream``: tqdm's default on a terminal; a minute into a
    file or a pipe (``nohup``, ``reproduce.sh``'s job logs), where every update adds a line of its own."""
    try:
        return 0.1 if stream.isatty() else 60.0
    except (AttributeError, ValueError):
        return 60.0


def raise_interrupted(signum, frame):
    """Signal handler: stop now with :class:`~utils.errors.Interrupted`."""
    raise Interrupted(signum)


def install_stop_handlers(handler=raise_interrupted):
    """Let SIGINT and SIGTERM call ``handler`` (also when the shell started us with SIGINT ignored, as
    bash does for background jobs); an :class:`~utils.errors.Interrupted` that Python cannot raise where the
    signal arrived is kept, not printed, and raised again at the next safe point
    (:func:`~utils.errors.keep_swallowed_stop`)."""
    sys.unraisablehook = keep_swallowed_stop
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


def run_cli(main, argv=None):
    """Call ``main(argv)`` and exit with its return value; user errors become one line and exit 2,
    SIGINT/SIGTERM exit ``128 + signal`` with a one-line note.

    Before exiting, the objects alive are frozen out of the cyclic garbage collector (``gc.freeze``): the
    interpreter's shutdown otherwise spends about a second collecting over torch's modules (0.2 s frozen,
    docs/benchmarks.md section 6), for nothing, since the process ends. Files and logs are closed by then."""
    install_stop_handlers()
    status = exit_status(main, argv)
    gc.freeze()
    sys.exit(status)


def exit_status(main, argv):
    """``main(argv)``'s exit status, with a user error, an interruption or a failed write reported in one line."""
    try:
        status = main(argv) or 0
        raise_swallowed_stop()
        return status
    except SystemExit as stop:  # argparse: --help, a flag error
        return stop.code
    except (UserError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Interrupted as exc:
        print(exc.message, file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def resolve_path(path, default_base=REPO_ROOT):
    """Resolve a user path: as given when absolute or existing relative to the working directory,
    otherwise relative to ``default_base`` (the repository root), so that the documented commands
    work from any directory. A loop of symbolic links is a one-line :class:`UserError` naming the path."""
    path = Path(path).expanduser()
    if not (path.is_absolute() or path.exists() or symlink_loop(path)):
        path = Path(default_base) / path
    if symlink_loop(path):
        raise UserError(f"{path} runs into a loop of symbolic links: it names no file or folder")
    return path.resolve()


def symlink_loop(path):
    """Whether the system, following the symbolic links of ``path``, runs into a loop (``ELOOP``): ``Path.exists``
    says only that the path is not there, and ``Path.resolve`` raises a ``RuntimeError`` before Python 3.13."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    except ValueError:  # a path the system cannot take (a NUL byte)
        return False
    return False


def output_path(path):
    """An output path: as given when absolute, else under the repository root (never the working directory,
    so that a documented output such as ``docs/results.md`` lands in the repository from anywhere)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path
