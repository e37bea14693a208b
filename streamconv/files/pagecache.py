"""Keeping the page cache small: every byte is read once and written once, so its pages are let go.

A conversion streams the whole model through the kernel's page cache. Left alone, that is harmful in
three ways on the hosts streamconv is for: a 506 GB run evicts everything else the host had cached;
dirty output pages pile up until the kernel throttles the writer and then flushes them in bursts; and
on virtual machines whose memory the host backs lazily, touching pages that have sat free for a while
costs more than the disk itself (docs/benchmarks.md: writing fresh page cache against recycled pages).
So:

- ``drop(fd, offset, length)``: sources call it on each byte range they have read (``POSIX_FADV_DONTNEED``
  only drops whole clean pages inside the range; a page shared with a read still to come stays).
- ``WriteBehind``: outputs call ``wrote(end)`` after each piece they append; writeback of the new bytes
  starts at once (``sync_file_range``), the previous piece is waited for and dropped. Dirty pages stay at
  about two pieces, and the commit's ``fsync`` finds the data already on disk. Durability still comes
  from that ``fsync`` only (``sync_file_range`` does not flush metadata or the disk's cache).

- ``copy_range``: a file-to-file copy inside the kernel (``copy_file_range``): the bytes never pass through
  this process's memory (staged chunks are assembled into ``.distcp`` files this way).

Where the calls do not exist (not Linux), the advice does nothing and copies go through a small buffer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4  # SYNC_FILE_RANGE_* (linux/fs.h)
MIN_PIECE = 8 * 1024 * 1024  # smaller appends are gathered: one call per 8 MiB at least


def _libc_sync_file_range():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        f = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


_sync_file_range = _libc_sync_file_range()


def drop(fd: int, offset: int = 0, length: int = 0) -> None:
    """Let the kernel drop the cached pages of ``[offset, offset + length)`` (``length`` 0: to the end)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # advice only


def sync_range(fd: int, offset: int, length: int, flags: int) -> None:
    """``sync_file_range``; an I/O error (EIO, ENOSPC) raises ``OSError`` like a write would."""
    if length <= 0:
        return
    if _sync_file_range is None:
        if flags & _WAIT_AFTER:
            os.fdatasync(fd)
        return
    if _sync_file_range(fd, offset, length, flags) != 0:
        err = ctypes.get_errno()
        if err in (0, 22, 29, 38, 95):  # EINVAL, ESPIPE, ENOSYS, EOPNOTSUPP: a file without it
            return
        raise OSError(err, os.strerror(err))


class WriteBehind:
    """Write-behind for one file being appended to: bytes before ``done`` are on disk and dropped,
    bytes in ``[done, started)`` are being written back."""

    def __init__(self, fd: int, start: int = 0, min_piece: int = MIN_PIECE):
        self.fd = fd
        self.done = self.started = start
        self.min_piece = min_piece

    def wrote(self, end: int) -> None:
        """The file now holds its bytes up to ``end`` (flushed from any user-space buffer)."""
        if end - self.started < self.min_piece:
            return
        sync_range(self.fd, self.started, end - self.started, _WRITE)
        if self.started > self.done:  # the previous piece: wait for it, then let it go
            sync_range(self.fd, self.done, self.started - self.done, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
            drop(self.fd, self.done, self.started - self.done)
            self.done = self.started
        self.started = end

    def finish(self) -> None:
        """After the final ``fsync``: drop what is left."""
        drop(self.fd, self.done, 0)
        self.done = self.started


_NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF)
COPY_BUFFER = 8 * 1024 * 1024


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> int:
    """Copy ``length`` bytes between two files at the given offsets (the file positions do not move);
    returns the bytes copied, fewer only if the source ends first."""
    done = 0
    kernel = hasattr(os, "copy_file_range")
    while done < length:
        if kernel:
            try:
                n = os.copy_file_range(src_fd, dst_fd, length - done, src_offset + done, dst_offset + done)
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise
                kernel = False  # a file system or kernel without it: through a buffer
                continue
        else:
            data = os.pread(src_fd, min(COPY_BUFFER, length - done), src_offset + done)
            n = os.pwrite(dst_fd, data, dst_offset + done) if data else 0
        if n <= 0:
            break
        done += n
    return done
