"""Atomic, durable file commits shared by every writer.

A file is written under a temporary name and appears under its final name only when complete:
flush, fsync, close, rename, fsync the folder (so the rename itself survives a power cut).
"""

from __future__ import annotations

import os
from pathlib import Path

from streamconv.files import pagecache
from streamconv.files.fileio import pwrite_all
from streamconv.errors import output_error


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the renames and deletions in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_file = fsync_path  # the names say what is being made durable at each call


NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def create_temporary(tmp: Path):
    """A new, empty temporary file at ``tmp``, opened for writing (``wb``). Whatever is at that name first
    goes (a planted symlink is removed, never followed), and the file is created with ``O_EXCL|O_NOFOLLOW``:
    a link that appears in between makes this fail instead of writing through it."""
    return os.fdopen(create_exclusive(tmp, os.O_WRONLY), "wb")


def create_exclusive(path: Path, mode: int) -> int:
    """A descriptor of a new, empty file at ``path`` (``mode``: ``os.O_WRONLY`` or ``os.O_RDWR``): what was
    at that name goes, and ``O_EXCL|O_NOFOLLOW`` make a link that appears in between fail the call."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.open(path, mode | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)


def commit(fh, tmp: Path, final: Path, drop_cache: bool = False) -> None:
    """Make the open file ``fh`` (written at ``tmp``) appear complete at ``final``; ``drop_cache``: let
    its pages go once they are on disk (a converter's output is not read back by the converter)."""
    try:
        fh.flush()
        os.fsync(fh.fileno())
        if drop_cache:
            pagecache.drop(fh.fileno())
        fh.close()
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as e:
        raise output_error(final, e) from e


def fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fh = create_temporary(tmp)
        fh.write(data)
    except OSError as e:
        raise output_error(path, e) from e
    commit(fh, tmp, path)


class PartialFile:
    """A file a placing sink writes in any order, under ``<name>.partial``: created with its size reserved (and
    ``head`` written at its start) or, ``fresh=False``, a killed run's reopened; ``commit`` makes it appear
    complete under ``path`` (fsync, its pages dropped, rename, the folder fsynced)."""

    def __init__(self, path: Path, size: int, fresh: bool, head: bytes = b""):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        try:
            if fresh:  # a new file, never through a link planted at its name
                self.fd = create_exclusive(self.tmp, os.O_RDWR)
                if head:
                    pwrite_all(self.fd, head, 0)
            else:  # a killed run's file, checked by the caller
                self.fd = os.open(self.tmp, os.O_RDWR | NOFOLLOW)
            os.ftruncate(self.fd, size)  # every byte has its place: a hole until written
        except OSError as e:
            raise output_error(self.tmp, e) from e

    def commit(self) -> None:
        try:
            os.fsync(self.fd)
            pagecache.drop(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)
        except OSError as e:
            raise output_error(self.path, e) from e

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
