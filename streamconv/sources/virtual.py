"""A source with no disk behind it: the engine at any scale, on any host (with ``sinks/digest.py``).

``VirtualSource`` serves every HF tensor of a ``ModelSpec`` with deterministic values generated on the
fly for each read: element ``k`` (row-major) of tensor ``name`` is ``pattern[(start(name) + k) % P]``,
with ``pattern`` a fixed seeded random vector of ``P`` (prime) values, so any row range of any tensor is
produced by a few memory copies, at memory speed. ``sinks.digest.DigestSink`` checksums what it is given (one CRC-32
over all output bytes in plan order: invariant to chunk size, budget and worker count) and discards
it; every ``verify_every``-th chunk is also rebuilt independently (``read_rows`` per read, concatenated
and cast) and compared bit for bit.

Together they run the real Ultra-253B plan (~506 GB of traffic) through the real engine with no disk:
``bench/ultra_virtual.py``.
"""

from __future__ import annotations

import math
import zlib

import torch

from streamconv import dtypes
from streamconv.engine.contracts import Source

from streamconv.models import rules
from streamconv.models.spec import ModelSpec
from streamconv.engine.scatter import buffer_rows
from streamconv.plan.build import Chunk, Read

PATTERN = 1_048_573  # elements; prime, so the pattern never lines up with a row length


class VirtualSource(Source):
    """Every HF tensor of ``spec``, in ``dtype``, made up on request (same values for the same request)."""

    reads = "buffer"

    def __init__(self, spec: ModelSpec, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
        self.dtype = dtype
        self.shapes = {t.name: t.shape for t in rules.hf_tensors(spec)}
        g = torch.Generator().manual_seed(seed)
        pattern = (torch.randn(PATTERN, generator=g) * 0.02).to(dtype)
        self._pattern2 = torch.cat([pattern, pattern])  # any window of <= PATTERN elements is one slice

    def dtype_of(self, name: str) -> dtypes.DType:
        return dtypes.of(self.dtype)

    def read_nbytes(self, read: Read) -> int:
        shape = self.shapes[read.name][len(read.index):]
        return (read.row1 - read.row0) * math.prod(shape[1:]) * self.dtype.itemsize

    def _span(self, read: Read) -> tuple[int, int]:
        """``(first element, element count)`` of a read, row-major in its tensor."""
        full = self.shapes[read.name]
        shape = full[len(read.index):]
        rows = shape[0] if shape else 1
        if not 0 <= read.row0 <= read.row1 <= rows:
            raise ValueError(f"rows [{read.row0}, {read.row1}) outside {read.name} {list(full)}")
        first = 0
        for i, n in zip(read.index, full):
            first = first * n + i
        row = math.prod(shape[1:])
        return (first * rows + read.row0) * row, (read.row1 - read.row0) * row

    def _fill(self, name: str, start: int, out: torch.Tensor) -> None:
        """``out`` (flat) = elements ``[start, start + out.numel())`` of tensor ``name``."""
        pos = (zlib.crc32(name.encode()) + start) % PATTERN
        done, n = 0, out.numel()
        while done < n:
            k = min(PATTERN, n - done)
            out[done:done + k].copy_(self._pattern2[pos:pos + k])
            done += k
            pos = (pos + k) % PATTERN

    def read_rows(self, name: str, row0: int, row1: int, index: tuple[int, ...] = ()) -> torch.Tensor:
        read = Read(name, row0, row1, tuple(index))
        start, count = self._span(read)
        out = torch.empty(count, dtype=self.dtype)
        self._fill(name, start, out)
        shape = self.shapes[name][len(index):]
        return out.view(row1 - row0, *shape[1:]) if shape else out.view(())

    def read_into(self, chunk: Chunk, buf: torch.Tensor) -> None:
        """The engine's direct read: each read generated straight into its rows of ``buf``."""
        for r, dst in buffer_rows(chunk, buf):
            start, count = self._span(r)
            if buf.dtype == self.dtype:
                self._fill(r.name, start, dst.reshape(-1))
            else:
                dst.reshape(-1).copy_(self.read_rows(r.name, r.row0, r.row1, r.index).reshape(-1))

    def close(self) -> None:
        pass
