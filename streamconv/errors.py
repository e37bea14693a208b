"""The errors streamconv reports to users, each with its exit code.

Every error a user can cause (bad input, unusable output folder, full disk, ...) is raised as one of
these; the CLI prints ``error: <message>`` on one line and exits with ``exit_code``. Anything else is a
bug and prints a traceback only with ``--debug``.
"""

import errno

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_IO = 4
EXIT_MISMATCH = 5  # streamconv verify: the output differs from its source
EXIT_INTERRUPTED = 130  # SIGINT (ctrl-C): 128 + 2
EXIT_TERMINATED = 143  # SIGTERM: 128 + 15


MAX_LINE = 2000  # characters of one line streamconv prints about an input (a crafted name can be any length)


def printable(text: str, limit: int = MAX_LINE) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``) and cut to ``limit`` characters: a name
    or path from an input can never forge another line, colour the terminal or flood it."""
    out = "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)
    return out if len(out) <= limit else f"{out[:limit]}... ({len(out) - limit} more characters)"


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


class SourceIOError(StreamconvError):
    """The input cannot be read for now (the Hub unreachable after retries): run the same command again."""

    exit_code = EXIT_IO


# errno -> (what happened, what to do) for OSErrors met while writing output
_OUTPUT_ERRNO = {
    errno.ENOSPC: ("disk full (no space left on device)", "free space or choose another output folder, then run again"),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose another output folder, then run again"),
    errno.EFBIG: ("file too large for this file system", "choose an output folder on another file system"),
    errno.EROFS: ("read-only file system", "choose a writable output folder"),
    errno.EACCES: ("permission denied", "choose an output folder you can write to"),
    errno.EPERM: ("operation not permitted", "choose an output folder you can write to"),
}


def output_error(path, err: OSError) -> OutputError:
    """An ``OSError`` met while writing ``path``, as a one-line ``OutputError`` that says what to do."""
    what, todo = _OUTPUT_ERRNO.get(err.errno, (f"cannot write: {err.strerror or err}", "check the output folder"))
    return OutputError(f"{path}: {what}; {todo}" if path else f"{what}; {todo}")
