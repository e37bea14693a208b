"""The engine's direct path: each chunk copied piece by piece from its source extents to its final place.

When the sink knows, before a byte is read, where every chunk's bytes go (``sink.place(chunk)``: the
torch_dist sink lays out every ``.distcp`` from the plan), a chunk needs no buffer of its own and no
writer thread. Each of ``--workers`` threads takes the next chunk in plan order and, for every source
extent the chunk is made of (``plan.Read`` -> file, offset, length; QKV's q/k/v blocks and gate/up are
separate extents landing next to each other), moves it in pieces of ``PIECE_BYTES``::

    preadv(source, piece)  ->  cast (if --dtype changes it)  ->  CRC-32  ->  pwrite(output, its place)

A piece fits in the CPU cache, so the CRC-32 (which zip requires) and the write read it from there, not
from memory. Every source byte is read once, every output byte written once; the threads work on
different chunks at once. A piece may gather several extents (a torch_dist tensor split by columns
gives one per row and stored item). When a chunk's last piece is written the sink completes it
(``sink.placed(chunk, placement, crc)``: item framing, journal record, and the file's commit once all
its chunks are in). Memory is ``workers`` x two pieces, whatever the model and chunk sizes (four when a
quantized source is dequantized: its float32 values and their output, ``_dequantize``).

Page cache: each piece's source range is dropped once read; the output is written behind
(``pagecache.WriteBehind`` over the chunk's range), and each file is dropped after its commit ``fsync``.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np

from streamconv.engine.contracts import FileSource, Phases, PlacingSink, Placement, Sink, Source
from streamconv.engine.device import on_cpu
from streamconv.errors import output_error
from streamconv.files import pagecache
from streamconv.files.checksum import crc32
from streamconv.files.fileio import OpenFiles, pwrite_all, read_exact
from streamconv.plan.build import Chunk

PIECE_BYTES = 1 << 20  # small enough to stay in the CPU cache between read, CRC and write (docs/benchmarks.md)


def usable(source: Source, sink: Sink, device: str) -> bool:
    """Whether the direct path serves: a source of file extents, a sink that places chunks, the CPU."""
    return source.reads == "extents" and sink.places and on_cpu(device)


def piece_bytes(max_memory: int, workers: int) -> int:
    """Each worker holds two pieces (read, cast output): as big as ``PIECE_BYTES`` when the budget allows."""
    return max(4096, min(PIECE_BYTES, max_memory // (2 * max(1, workers))) // 64 * 64)


class _Worker:
    def __init__(self, source: FileSource, files: OpenFiles, piece: int, writing: "_WriteLocks"):
        self.source, self.files, self.writing = source, files, writing
        self.src = np.empty(piece, dtype=np.uint8)
        self.out = np.empty(piece, dtype=np.uint8)
        self.piece = piece
        self.phases = Phases()
        self._f32 = self._wide = None  # dequantization buffers (_dequant_buffers), made on first use

    def copy(self, chunk: Chunk, out_dtype, place: Placement, stop: threading.Event) -> int:
        """Copy ``chunk``'s reads to ``place``; returns the CRC-32 of the bytes written."""
        crc, pos = 0, 0
        behind = pagecache.WriteBehind(place.fd, start=place.offset)
        out_item = out_dtype.itemsize
        for r in chunk.reads:
            scale = self.source.dequant.get(r.name)
            if scale is not None:
                crc, pos = self._dequantize(r, scale, out_dtype, place, behind, stop, crc, pos)
                continue
            src_dtype = self.source.dtype_of(r.name)
            src_item = src_dtype.itemsize
            cast = src_dtype != out_dtype
            cap = self.piece // max(src_item, out_item) * src_item  # source bytes per piece
            filled, t0 = 0, time.perf_counter()
            for path, off, n in self.source.spans(r):  # a piece is filled from as many spans as it takes
                fd = self.files.fd(path)
                while n:
                    if stop.is_set():
                        raise _Stopped
                    take = min(n, cap - filled)
                    read_exact(fd, memoryview(self.src)[filled:filled + take], off, path)
                    pagecache.drop(fd, off, take)
                    filled, off, n = filled + take, off + take, n - take
                    if filled == cap:
                        crc, pos = self._convert(filled, src_dtype, out_dtype, cast, place, behind, crc, pos, t0)
                        filled, t0 = 0, time.perf_counter()
            if filled:
                crc, pos = self._convert(filled, src_dtype, out_dtype, cast, place, behind, crc, pos, t0)
        if pos != chunk.nbytes:
            raise RuntimeError(f"chunk {chunk.key} {list(chunk.offsets)}: copied {pos} of {chunk.nbytes} bytes")
        return crc

    def _convert(self, filled: int, src_dtype, out_dtype, cast: bool, place: Placement, behind, crc: int, pos: int,
                 t0: float) -> tuple[int, int]:
        """The ``filled`` source bytes of the piece (read from ``t0``), cast if the dtypes differ, then
        emitted (``_emit``)."""
        t1 = time.perf_counter()
        data = memoryview(self.src)[:filled]
        if cast:  # torch's rounding (imported only by a conversion that casts)
            import torch

            e = filled // src_dtype.itemsize
            dst = torch.from_numpy(self.out[: e * out_dtype.itemsize]).view(out_dtype.torch)
            dst.copy_(torch.from_numpy(self.src[:filled]).view(src_dtype.torch))
            data = memoryview(self.out)[: e * out_dtype.itemsize]
        return self._emit(data, place, behind, crc, pos, t0, t1)

    def _dequantize(self, r, scale, out_dtype, place: Placement, behind, stop, crc: int, pos: int) -> tuple[int, int]:
        """A quantized weight's rows: whole rows per piece (a block scale's column blocks need the row),
        read as float8, dequantized to ``out_dtype`` (``transforms.dequantize``), checksummed and written."""
        import torch

        from streamconv.engine.transforms import dequantize

        out_dtype = out_dtype.torch
        (path, off, n), = self.source.spans(r)  # a quantized safetensors weight: its rows are one range
        info = self.source.info(r.name)
        cols = math.prod(info.shape[1:])
        step = max(1, self.piece // (4 * max(1, cols)))  # rows whose float32 value fits in a piece
        fd = self.files.fd(path)
        for row in range(r.row0, r.row1, step):
            if stop.is_set():
                raise _Stopped
            k = min(step, r.row1 - row)
            t0 = time.perf_counter()
            raw = self.src if k * cols <= len(self.src) else np.empty(k * cols, dtype=np.uint8)  # a very wide row
            at = off + (row - r.row0) * cols
            read_exact(fd, memoryview(raw)[: k * cols], at, path)
            pagecache.drop(fd, at, k * cols)
            t1 = time.perf_counter()
            values = torch.from_numpy(raw[: k * cols]).view(info.dtype.torch).view(k, cols)
            out, work = self._dequant_buffers(k * cols, out_dtype)
            out = dequantize(values, scale.values, scale.block, row, out_dtype, out.view(k, cols), work.view(k, cols))
            crc, pos = self._emit(memoryview(out.reshape(-1).view(torch.uint8).numpy()), place, behind, crc, pos, t0, t1)
        return crc, pos

    def _emit(self, data: memoryview, place: Placement, behind, crc: int, pos: int, t0: float, t1: float
              ) -> tuple[int, int]:
        """A piece ready (read from ``t0``, converted from ``t1``): its CRC-32, then its write in place (and
        to ``place.also``); the phases' seconds. Returns the running CRC and position."""
        t2 = time.perf_counter()
        crc = crc32(data, crc)
        t3 = time.perf_counter()
        with self.writing.of(place.fd):
            self._write(place.fd, place.path, data, place.offset + pos)
        for fd2, off2 in place.also:
            self._write(fd2, place.path, data, off2 + pos)
        pos += len(data)
        behind.wrote(place.offset + pos)
        t4 = time.perf_counter()
        ph = self.phases
        ph.read += t1 - t0
        ph.cast += t2 - t1
        ph.crc += t3 - t2
        ph.write += t4 - t3
        return crc, pos

    def _dequant_buffers(self, n: int, out_dtype):
        """``n`` elements of ``out_dtype`` (a torch dtype) and of float32, kept for the next pieces (fresh
        pages cost a fault each)."""
        import torch

        if self._f32 is None or self._f32.numel() < n:
            self._f32 = torch.empty(n, dtype=torch.float32)
            self._wide = torch.empty(n * 4, dtype=torch.uint8)
        return self._wide[: n * out_dtype.itemsize].view(out_dtype), self._f32[:n]

    @staticmethod
    def _write(fd: int, path, data: memoryview, at: int) -> None:
        try:
            pwrite_all(fd, data, at)
        except OSError as e:
            raise output_error(path, e) from e


class _Stopped(Exception):
    pass


class _WriteLocks:
    """One lock per output file: two threads writing one file at once queue on its inode lock in the kernel,
    where the waiter spins (``rwsem_spin_on_owner``: 15% of an export's CPU, whose one shard all threads
    write); waiting here it sleeps. The writes of one file are serialized either way."""

    def __init__(self):
        self._locks: dict[int, threading.Lock] = {}
        self._lock = threading.Lock()

    def of(self, fd: int) -> threading.Lock:
        lock = self._locks.get(fd)
        if lock is None:
            with self._lock:
                lock = self._locks.setdefault(fd, threading.Lock())
        return lock


class _FileQueue:
    """Which chunk a worker does next: the next one of the file it is writing, else the first chunk of a
    file nobody writes yet, else (at the end) the next one of any file. Writers of one file would queue
    on its inode lock; one file per worker keeps them apart, and each worker's reads sequential."""

    def __init__(self, chunks):
        self.files: dict[int, list] = {}
        for c in chunks:
            self.files.setdefault(c.file, []).append(c)
        for f in self.files:
            self.files[f].reverse()  # pop() from the end = plan order
        self.busy: set[int] = set()

    def next(self, mine):
        """``(file, chunk)`` for a worker that was writing ``mine``; ``chunk`` None when all are taken."""
        if mine not in self.files:
            mine = None
            free = [f for f in self.files if f not in self.busy]
            if free:
                mine = min(free)
                self.busy.add(mine)
            elif self.files:
                mine = min(self.files)  # every file has a writer: help the oldest
            else:
                return None, None
        left = self.files[mine]
        chunk = left.pop()
        if not left:
            del self.files[mine]
            self.busy.discard(mine)
        return mine, chunk


def run(plan, source: FileSource, sink: PlacingSink, *, max_memory: int, workers: int, progress, skip, stats) -> None:
    """Run ``plan`` on the direct path (see the module docstring); fills ``stats`` (``contracts.Stats``)."""
    todo = []
    for c in plan.chunks:
        if skip is not None and skip(c):
            stats.chunks_skipped += 1
            if progress is not None:
                progress.advance(c, 0, skipped=True)
        else:
            todo.append(c)
    n = max(1, min(workers, len(todo)))
    quantized = bool(source.dequant)  # dequantizing holds two more pieces: float32, output
    piece = piece_bytes(max_memory // 2 if quantized else max_memory, n)
    held = (4 if quantized else 2) * piece * n
    stats.budget = max_memory
    stats.peak_in_flight = held if todo else 0
    files = OpenFiles(sequential=True)
    stop = threading.Event()
    lock = threading.Lock()
    errors: list[BaseException] = []
    queue = _FileQueue(todo)
    writing = _WriteLocks()
    crews = [_Worker(source, files, piece, writing) for _ in range(n)]

    def work(w: _Worker) -> None:
        mine = None
        try:
            while not stop.is_set():
                with lock:
                    mine, chunk = queue.next(mine)
                if chunk is None:
                    return
                place = sink.place(chunk)
                crc = w.copy(chunk, plan.targets[chunk.key].dtype, place, stop)
                t0 = time.perf_counter()
                sink.placed(chunk, place, crc)
                w.phases.complete += time.perf_counter() - t0
                with lock:
                    stats.bytes_done += chunk.nbytes
                    stats.chunks_done += 1
                if progress is not None:
                    progress.advance(chunk, held)
        except _Stopped:
            pass
        except BaseException as e:  # the first error stops every worker and is raised in the caller
            with lock:
                errors.append(e)
            stop.set()

    threads = [threading.Thread(target=work, args=(w,), name=f"streamconv-copy-{i}", daemon=True)
               for i, w in enumerate(crews)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.1)  # short waits: a signal reaches the main thread as KeyboardInterrupt
    except BaseException:
        stop.set()
        for t in threads:
            if t.ident is not None:  # started (a signal may come while they are being started)
                t.join()
        raise
    finally:
        files.close()
        for w in crews:
            stats.phases.add(w.phases)
    if errors:
        raise errors[0]
