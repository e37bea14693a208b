"""Atomic, durable file commits shared by every writer.

A file is written under a temporary name and appears under its final name only when complete:
flush, fsync, close, rename, fsync the folder (so the rename itself survives a power cut).
"""

from __future__ import annotations

import os
from pathlib import Path

from streamconv import pagecache
from streamconv.errors import output_error


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the renames and deletions in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_file = fsync_path  # the names say what is being made durable at each call


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
        fh = open(tmp, "wb")
        fh.write(data)
    except OSError as e:
        raise output_error(path, e) from e
    commit(fh, tmp, path)
