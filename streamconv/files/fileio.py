"""Exact reads and writes at an offset, and the one cache of open input files.

``pread``/``preadv`` may return fewer bytes than asked and ``pwrite`` may write fewer: every caller goes
through ``read_exact``, ``read_scattered`` and ``pwrite_all``, which loop until done and turn an early end
of file into one line (a truncated input is bad input, exit 3).
"""

from __future__ import annotations

import os
import threading

from streamconv.errors import BadInputError

REDOWNLOAD = "the file is truncated; re-download it"


def _truncated(path, at: int, hint: str) -> BadInputError:
    return BadInputError(f"{path}: unexpected end of file at byte {at}; {hint}")


def read_exact(fd: int, buf: memoryview, at: int, path, hint: str = REDOWNLOAD) -> None:
    """Fill all of ``buf`` from ``fd`` at offset ``at``."""
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], at + done)
        if got <= 0:
            raise _truncated(path, at + done, hint)
        done += got


def read_scattered(fd: int, views: list[memoryview], at: int, path, hint: str = REDOWNLOAD) -> int:
    """One contiguous file range from ``at`` into several buffers, in order; returns the bytes read."""
    views = list(views)
    pos = at
    while views:
        got = os.preadv(fd, views, pos)
        if got <= 0:
            raise _truncated(path, pos, hint)
        pos += got
        while views and got >= len(views[0]):
            got -= len(views[0])
            views.pop(0)
        if got:
            views[0] = views[0][got:]
    return pos - at


def pwrite_all(fd: int, data, at: int) -> None:
    """All of ``data`` at offset ``at`` of ``fd``."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n


class OpenFiles:
    """Read-only descriptors, opened once per key and shared by threads; ``close`` closes them all.

    ``opener(key) -> fd`` opens one (default: ``os.open(key, O_RDONLY)``); ``sequential`` advises the kernel
    that each file is read in order (larger read-ahead)."""

    def __init__(self, opener=None, sequential: bool = False):
        self._opener = opener or (lambda path: os.open(path, os.O_RDONLY))
        self._sequential = sequential and hasattr(os, "posix_fadvise")
        self._fds: dict = {}
        self._lock = threading.Lock()

    def fd(self, key) -> int:
        fd = self._fds.get(key)
        if fd is None:
            with self._lock:
                fd = self._fds.get(key)
                if fd is None:
                    fd = self._fds[key] = self._opener(key)
                    if self._sequential:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
