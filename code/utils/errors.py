"""User-facing errors, reported as one line with a non-zero exit (see ``utils.cli.run_cli``)."""


class UserError(Exception):
    """A problem the user can fix (input, flags, environment), reported as one line."""


class DataError(UserError):
    """A dataset is missing, malformed or inconsistent."""
