"""A sink that checksums and discards (253B-scale engine runs without a disk: ``bench/ultra_virtual.py``).

Every ``verify_every``-th chunk is rebuilt independently from the source's ``read_rows`` and compared.
"""

from __future__ import annotations

import zlib

import torch

from streamconv.dtypes import to_torch
from streamconv.engine.contracts import Sink
from streamconv.engine.transforms import INT_VIEW
from streamconv.plan.build import Chunk


class DigestSink(Sink):
    """Checksums and discards; rebuilds every ``verify_every``-th chunk independently and compares."""

    def __init__(self, plan, source, verify_every: int = 0):
        self.plan = plan
        self.source = source
        self.verify_every = verify_every
        self.crc = 0
        self.bytes = 0
        self.chunks = 0
        self.verified = 0
        self.mismatches: list[str] = []

    def sampled(self, chunk: Chunk) -> bool:
        """Whether ``chunk`` is rebuilt and compared (a fixed property of the chunk, about 1 in ``verify_every``)."""
        return bool(self.verify_every) and zlib.crc32(f"{chunk.key}{chunk.offsets}".encode()) % self.verify_every == 0

    def write_overhead(self, chunk: Chunk) -> int:
        """Nothing, except for a sampled chunk: its reference and the reads that build it."""
        if not self.sampled(chunk):
            return 0
        return 2 * chunk.nbytes + sum(self.source.read_nbytes(r) for r in chunk.reads)

    def write(self, chunk: Chunk, tensor: torch.Tensor) -> None:
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        self.crc = zlib.crc32(data, self.crc)
        if self.sampled(chunk):
            parts = [self.source.read_rows(r.name, r.row0, r.row1, r.index) for r in chunk.reads]
            ref = torch.cat(parts).to(to_torch(self.plan.targets[chunk.key].dtype)).reshape(chunk.sizes)
            bits = INT_VIEW[ref.element_size()]
            if ref.shape != tensor.shape or not torch.equal(ref.view(bits), tensor.view(bits)):
                self.mismatches.append(f"{chunk.key} at {list(chunk.offsets)}")
            self.verified += 1
        self.bytes += data.nbytes
        self.chunks += 1

    def close(self) -> None:
        pass

