"""Reading a chunk's source rows straight into the chunk's own buffer.

A chunk is the row-wise concatenation of its reads (``plan.Read``). Instead of reading each into a
tensor of its own and concatenating them, the engine allocates the chunk's buffer once and every read
lands in its rows. For a ``FileSource`` (safetensors; a torch_dist checkpoint of plain items), the reads of a chunk are turned
into file extents (``spans``), sorted
by (file, offset), and runs that are contiguous in a file become one ``preadv`` into several places of
the buffer: QKV's q rows of all query groups of a block are read in one sequential request that
scatters them between the k and v rows. No copy is made in user space, and each file is read in order.
Every byte of a source is read once: its pages are dropped from the page cache once read (pagecache.py).

Other sources fill the buffer themselves (``reads = "buffer"``: ``read_into``) or through ``read_rows``
(``reads = "rows"``; ``engine/contracts.py``); a read whose dtype differs from the buffer's is cast on copy.
"""

from __future__ import annotations

import math

from streamconv import dtypes
from streamconv.engine.contracts import FileSource, Source
from streamconv.files import pagecache
from streamconv.files.fileio import OpenFiles, read_scattered
from streamconv.plan.build import Chunk, Read

IOV_MAX = 1024  # Linux: most iovecs one preadv takes


def chunk_rows(chunk: Chunk) -> int:
    return sum(r.row1 - r.row0 for r in chunk.reads)


def buffer_shape(chunk: Chunk) -> tuple[int, int]:
    """The chunk as ``[rows, row_elems]``: each read fills a contiguous block of rows."""
    rows = chunk_rows(chunk)
    numel = math.prod(chunk.sizes)
    return (rows, numel // rows) if rows else (0, 0)


def source_dtype(source: Source, name: str) -> dtypes.DType | None:
    if name in source.dequant:  # a quantized weight reads as its float32 value
        return dtypes.FLOAT32
    return dtypes.maybe(source.dtype_of(name))


def read_dtype(source, chunk: Chunk) -> dtypes.DType | None:
    """The dtype every read of ``chunk`` is stored in; None when they differ or the source cannot say."""
    dtypes = {source_dtype(source, r.name) for r in chunk.reads}
    return dtypes.pop() if len(dtypes) == 1 else None


def quantized_reads(source, chunk: Chunk) -> tuple[dtypes.DType, list[tuple[int, int, object, int]]] | None:
    """For a stage that dequantizes where it casts (``device.CudaStage``): the float8 dtype the reads are
    stored in, and per read (first row in the buffer, rows, its ``formats.quantized.Scale``, first row in
    the weight), when every read of ``chunk`` is a whole-weight read of a quantized weight of one float8
    dtype; else None (the reads are dequantized on the CPU, by ``read_rows``)."""
    dequant = source.dequant
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


def buffer_rows(chunk: Chunk, buf: torch.Tensor) -> list[tuple[Read, torch.Tensor]]:
    """Each read with the rows of ``buf`` (a ``buffer_shape`` tensor) it fills."""
    out, row = [], 0
    for r in chunk.reads:
        n = r.row1 - r.row0
        out.append((r, buf[row:row + n]))
        row += n
    return out


def copy_reads(source, chunk: Chunk, buf: torch.Tensor) -> None:
    """Fill ``buf`` through ``source.read_rows`` (one read held at a time; cast on copy)."""
    for r, dst in buffer_rows(chunk, buf):
        if dst.numel():
            dst.copy_(source.read_rows(r.name, r.row0, r.row1, r.index).reshape(dst.shape))


def contiguous_runs(pieces: list, most: int | None = None):
    """``pieces`` ``(file, offset, length, destination)``, sorted by file and offset and grouped into runs that
    continue each other in a file (at most ``most`` pieces a run): each run is one read scattered into its
    pieces' destinations."""
    run: list = []
    for p in sorted(pieces):
        if run and (p[0] != run[-1][0] or p[1] != run[-1][1] + run[-1][2] or len(run) == most):
            yield run
            run = []
        run.append(p)
    if run:
        yield run


class FileScatter:
    """``read_into`` for a ``FileSource``: file extents -> ``preadv`` into the buffer."""

    def __init__(self, source: FileSource):
        self.source = source
        self.files = OpenFiles(sequential=True)

    def __call__(self, chunk: Chunk, buf: torch.Tensor) -> None:
        stored = {self.source.dtype_of(r.name) for r in chunk.reads}
        if stored != {dtypes.of(buf.dtype)}:  # cast on copy; a quantized weight dequantized (unless the stage does it)
            return copy_reads(self.source, chunk, buf)
        import torch

        raw = buf.reshape(-1).view(torch.uint8).numpy()
        pieces = []  # (path, offset, length, destination byte offset)
        dst = 0
        for r in chunk.reads:
            for path, off, n in self.source.spans(r):
                if n:
                    pieces.append((path, off, n, dst))
                dst += n
        for run in contiguous_runs(pieces, IOV_MAX):
            self._read_run(run, raw)

    def _read_run(self, run: list, raw) -> None:
        """One file range, contiguous, into several places of ``raw``."""
        path, start = run[0][0], run[0][1]
        fd = self.files.fd(path)
        n = read_scattered(fd, [memoryview(raw[d:d + n]) for _, _, n, d in run], start, path)
        pagecache.drop(fd, start, n)

    def close(self) -> None:
        self.files.close()


def direct(source: Source) -> bool:
    """Whether reads land in the buffer with no tensor of their own (else ``copy_reads`` holds one read)."""
    return source.reads != "rows"


class _Through:
    """``read_into`` through the source itself: its own ``read_into``, or ``read_rows`` copied in."""

    def __init__(self, source: Source):
        self.source = source

    def __call__(self, chunk: Chunk, buf: torch.Tensor) -> None:
        if self.source.reads == "buffer":
            self.source.read_into(chunk, buf)
        else:
            copy_reads(self.source, chunk, buf)

    def close(self) -> None:
        pass  # the source is the caller's to close


def reader_for(source: Source) -> FileScatter | _Through:
    """A ``read_into(chunk, buf)`` for ``source`` (closed with ``close()``): file scatter for a ``FileSource``."""
    return FileScatter(source) if source.reads == "extents" else _Through(source)
