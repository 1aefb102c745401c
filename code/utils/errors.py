"""User-facing errors and interruptions, reported as one line with a non-zero exit (see ``utils.cli.run_cli``)."""
import signal
import sys


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


_swallowed_stop = None


def keep_swallowed_stop(unraisable):
    """``sys.unraisablehook`` that keeps an :class:`Interrupted` instead of printing it.

    A stop signal's handler raises :class:`Interrupted` wherever Python happens to be; when that is a weakref
    callback or a ``__del__`` (torch and the garbage collector run many), Python cannot propagate it: it prints
    "Exception ignored in ..." with a traceback and carries on, and the stop would be lost. This hook keeps it
    silently; :func:`raise_swallowed_stop`, called where long work can stop safely (between sliding windows,
    before a result is published, when the script returns), raises it again. Other unraisable exceptions are
    reported as Python does."""
    global _swallowed_stop
    if isinstance(unraisable.exc_value, Interrupted):
        _swallowed_stop = _swallowed_stop or unraisable.exc_value
    else:
        sys.__unraisablehook__(unraisable)


def raise_swallowed_stop():
    """Raise the stop that :func:`keep_swallowed_stop` kept, once; nothing when there is none."""
    global _swallowed_stop
    stop, _swallowed_stop = _swallowed_stop, None
    if stop is not None:
        raise stop
