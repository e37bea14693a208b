"""The errors streamconv reports to users, each with its exit code.

Every error a user can cause (bad input, unusable output folder, full disk, ...) is raised as one of
these; the CLI prints ``error: <message>`` on one line and exits with ``exit_code``. Anything else is a
bug and prints a traceback only with ``--debug``.
"""

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_IO = 4
EXIT_INTERRUPTED = 130


class StreamconvError(Exception):
    """A problem the user can act on; ``str(err)`` is the one-line message."""

    exit_code = EXIT_BAD_INPUT


class UsageError(StreamconvError):
    exit_code = EXIT_USAGE


class BadInputError(StreamconvError):
    exit_code = EXIT_BAD_INPUT


class UnsupportedModelError(BadInputError):
    pass


class OutputError(StreamconvError):
    """The output folder cannot be used (non-empty, read-only, full disk, ...)."""

    exit_code = EXIT_IO
