"""User-facing errors and interruptions, reported as one line with a non-zero exit (see ``utils.cli.run_cli``)."""
import signal


class UserError(Exception):
    """A problem the user can fix (input, flags, environment), reported as one line."""


class DataError(UserError):
    """A dataset is missing, malformed or inconsistent."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the process; it exits with status ``128 + signum``, the shell's convention,
    so that a caller (``reproduce.sh``, a scheduler) sees which signal stopped it.

    A subclass of ``KeyboardInterrupt``, so that code that already lets Ctrl-C through (PyTorch's data loader
    workers, ``finally`` blocks) treats SIGTERM the same way.
    """

    def __init__(self, signum, message=None):
        self.signum = int(signum)
        self.message = message or f"interrupted by {signal_name(signum)}"
        super().__init__(self.message)

    @property
    def exit_status(self):
        return 128 + self.signum


def signal_name(signum):
    """``SIGINT``, ``SIGTERM``, ... for a signal number."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
