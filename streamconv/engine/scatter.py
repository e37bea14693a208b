"""Reading a chunk's source rows straight into the chunk's own buffer.

A chunk is the row-wise concatenation of its reads (``plan.Read``). Instead of reading each into a
tensor of its own and concatenating them, the engine allocates the chunk's buffer once and every read
lands in its rows. For a safetensors source, the reads of a chunk are turned into file extents, sorted
by (file, offset), and runs that are contiguous in a file become one ``preadv`` into several places of
the buffer: QKV's q rows of all query groups of a block are read in one sequential request that
scatters them between the k and v rows. No copy is made in user space, and each file is read in order.
Every byte of a source is read once: its pages are dropped from the page cache once read (pagecache.py).

Sources other than safetensors fill the rows through ``read_rows`` (a source may also offer its own
``read_into(chunk_reads, buffer)``); a read whose dtype differs from the buffer's is cast on copy.
"""

from __future__ import annotations

import math
import os
from typing import Callable

from streamconv import dtypes
from streamconv.files import pagecache
from streamconv.errors import BadInputError
from streamconv.plan.build import Chunk, Read

IOV_MAX = 1024  # Linux: most iovecs one preadv takes


def chunk_rows(chunk: Chunk) -> int:
    return sum(r.row1 - r.row0 for r in chunk.reads)


def buffer_shape(chunk: Chunk) -> tuple[int, int]:
    """The chunk as ``[rows, row_elems]``: each read fills a contiguous block of rows."""
    rows = chunk_rows(chunk)
    numel = math.prod(chunk.sizes)
    return (rows, numel // rows) if rows else (0, 0)


def source_dtype(source, name: str) -> dtypes.DType | None:
    if name in getattr(source, "dequant", ()):  # a quantized weight reads as its float32 value
        return dtypes.FLOAT32
    info = getattr(source, "info", None)
    if info is None:
        dtype_of = getattr(source, "dtype_of", None)
        return dtypes.maybe(dtype_of(name)) if dtype_of is not None else None
    return dtypes.of(info(name).dtype)


def read_dtype(source, chunk: Chunk) -> dtypes.DType | None:
    """The dtype every read of ``chunk`` is stored in; None when they differ or the source cannot say."""
    dtypes = {source_dtype(source, r.name) for r in chunk.reads}
    return dtypes.pop() if len(dtypes) == 1 else None


def quantized_reads(source, chunk: Chunk) -> tuple[dtypes.DType, list[tuple[int, int, object, int]]] | None:
    """For a stage that dequantizes where it casts (``device.CudaStage``): the float8 dtype the reads are
    stored in, and per read (first row in the buffer, rows, its ``formats.quantized.Scale``, first row in
    the weight), when every read of ``chunk`` is a whole-weight read of a quantized weight of one float8
    dtype; else None (the reads are dequantized on the CPU, by ``read_rows``)."""
    dequant = getattr(source, "dequant", None)
    if not dequant or not all(r.name in dequant and not r.index for r in chunk.reads):
        return None
    stored = {source.info(r.name).dtype for r in chunk.reads}
    if len(stored) != 1:
        return None
    out, row = [], 0
    for r in chunk.reads:
        out.append((row, r.row1 - r.row0, dequant[r.name], r.row0))
        row += r.row1 - r.row0
    return stored.pop(), out


def row_blocks(chunk: Chunk, buf: torch.Tensor) -> list[tuple[Read, torch.Tensor]]:
    """Each read with the rows of ``buf`` (a ``buffer_shape`` tensor) it fills."""
    out, row = [], 0
    for r in chunk.reads:
        n = r.row1 - r.row0
        out.append((r, buf[row:row + n]))
        row += n
    return out


def copy_reads(source, chunk: Chunk, buf: torch.Tensor) -> None:
    """Fill ``buf`` through ``source.read_rows`` (one read held at a time; cast on copy)."""
    for r, dst in row_blocks(chunk, buf):
        if dst.numel():
            dst.copy_(source.read_rows(r.name, r.row0, r.row1, r.index).reshape(dst.shape))


class FileScatter:
    """``read_into`` for a ``SafetensorsSource``: file extents -> ``preadv`` into the buffer."""

    def __init__(self, source):
        self.source = source
        self._fds: dict = {}

    def fd(self, path) -> int:
        """The open descriptor of ``path`` (opened once, shared by the reader threads)."""
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            fd = self._fds.setdefault(path, fd)  # another thread may have opened it too: keep one
        return fd

    def extent(self, r: Read) -> tuple:
        """``(path, file offset, length)`` of a read."""
        return self.source.extent(r.name, r.row0, r.row1, r.index)

    def __call__(self, chunk: Chunk, buf: torch.Tensor) -> None:
        stored = {self.source.info(r.name).dtype for r in chunk.reads}
        if stored != {dtypes.of(buf.dtype)}:  # cast on copy; a quantized weight dequantized (unless the stage does it)
            return copy_reads(self.source, chunk, buf)
        import torch

        raw = buf.reshape(-1).view(torch.uint8).numpy()
        pieces = []  # (path, offset, length, destination byte offset)
        dst = 0
        for r in chunk.reads:
            path, off, n = self.extent(r)
            if n:
                pieces.append((path, off, n, dst))
            dst += n
        pieces.sort()
        run: list = []
        for p in pieces:
            if run and (p[0] != run[-1][0] or p[1] != run[-1][1] + run[-1][2] or len(run) == IOV_MAX):
                self._read_run(run, raw)
                run = []
            run.append(p)
        if run:
            self._read_run(run, raw)

    def _read_run(self, run: list, raw) -> None:
        """One file range, contiguous, into several places of ``raw``."""
        path, pos = run[0][0], run[0][1]
        start = pos
        views = [memoryview(raw[d:d + n]) for _, _, n, d in run]
        fd = self.fd(path)
        while views:
            got = os.preadv(fd, views, pos)
            if got <= 0:
                raise BadInputError(f"{path}: unexpected end of file at byte {pos}; the shard is truncated, "
                                    "re-download it")
            pos += got
            while views and got >= len(views[0]):
                got -= len(views[0])
                views.pop(0)
            if got:
                views[0] = views[0][got:]
        pagecache.drop(fd, start, pos - start)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def direct(source) -> bool:
    """Whether reads land in the buffer with no tensor of their own (else ``copy_reads`` holds one read).

    A stand-in source used only for planning says so with ``direct_reads = True``.
    """
    from streamconv.sources.safetensors import SafetensorsSource

    return (hasattr(source, "read_into") or isinstance(source, SafetensorsSource)
            or getattr(source, "direct_reads", False))


def reader_for(source) -> Callable[[Chunk, torch.Tensor], None]:
    """A ``read_into(chunk, buf)`` for ``source``: its own, file scatter for safetensors, else copies."""
    own = getattr(source, "read_into", None)
    if own is not None:
        return own
    from streamconv.sources.safetensors import SafetensorsSource

    if isinstance(source, SafetensorsSource):
        return FileScatter(source)
    return lambda chunk, buf: copy_reads(source, chunk, buf)
