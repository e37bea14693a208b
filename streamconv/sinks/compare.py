"""Sinks that compare instead of keeping: ``verify`` and ``--recheck``.

- ``ItemCompare`` (``streamconv verify``): each chunk the mapping makes of the source is compared, bit for
  bit, with the checkpoint's items in those rows; every difference is a line of the ``Report``.
- ``CrcCompare`` (``hf2mcore --recheck``, for what a plain resume cannot see: bytes changed behind the file system's
  back, a file system without ctime): a resumed run's kept chunks are converted again, in memory, on the
  engine's direct path (casts and FP8 dequantization included) and their CRC-32 compared with the one
  journaled when the chunk was written (``recheck_kept``); a difference is refused in one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from streamconv import crashpoints
from streamconv.engine import direct
from streamconv.engine.contracts import Placement, PlacingSink, Sink, Stats
from streamconv.engine.transforms import INT_VIEW
from streamconv.errors import BadInputError

@dataclass
class Report:
    checkpoint: str
    source: str
    tensors: int = 0
    items: int = 0
    bytes: int = 0
    items_checked: int = 0
    mismatches: list[str] = field(default_factory=list)
    seconds: float = 0.0
    not_compared: list[str] = field(default_factory=list)  # source tensors the checkpoint leaves out (--drop-mtp)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def as_dict(self) -> dict:
        return {"command": "verify", "checkpoint": self.checkpoint, "source": self.source, "ok": self.ok,
                "tensors": self.tensors, "items": self.items, "items_checked": self.items_checked,
                "bytes": self.bytes, "seconds": round(self.seconds, 3), "mismatches": self.mismatches,
                "not_compared": self.not_compared}


def first_difference(actual: torch.Tensor, expected: torch.Tensor) -> tuple[int, tuple[int, ...]] | None:
    """(number of differing elements, index of the first) comparing bits; None if bit-identical."""
    view = INT_VIEW[expected.element_size()]
    a = actual.contiguous().view(view).reshape(-1)
    e = expected.contiguous().view(view).reshape(-1)
    if torch.equal(a, e):  # the usual case: no element-wise mask to build
        return None
    diff = a != e
    n = int(diff.sum())
    if n == 0:
        return None
    flat = int(diff.nonzero()[0, 0])
    index = []
    for size in reversed(expected.shape):
        index.append(flat % size)
        flat //= size
    return n, tuple(reversed(index))


class ItemCompare(Sink):
    """The engine's sink for verify: each expected chunk (full rows) is compared with the checkpoint's items
    that lie in it (``items``: {(key, offsets): [(item offsets, item sizes)]}; one, unless the checkpoint
    splits those rows along another dimension, as a tensor-parallel save does)."""

    def __init__(self, ckpt_source, report: Report, items: dict | None = None):
        self.ckpt = ckpt_source
        self.report = report
        self.items = items or {}

    def write_overhead(self, chunk) -> int:
        return 2 * chunk.nbytes  # the item read (a plain archive: straight into its tensor; else its bytes
        #                          and the tensor torch.load makes of them)

    def write(self, chunk, expected: torch.Tensor) -> None:
        for offsets, sizes in self.items.get(chunk.id, [(chunk.offsets, chunk.sizes)]):
            part = expected
            for d, (o, n, o0) in enumerate(zip(offsets, sizes, chunk.offsets)):
                if n != part.shape[d]:
                    part = part.narrow(d, o - o0, n)
            self._compare(chunk.key, tuple(offsets), tuple(sizes), part)
        crashpoints.pause("chunk")

    def _compare(self, key: str, offsets: tuple, sizes: tuple, expected: torch.Tensor) -> None:
        where = f"{key} chunk at offsets {list(offsets)} sizes {list(sizes)}"
        try:
            actual = self.ckpt.read_item(key, offsets)
        except BadInputError as e:
            self.report.mismatches.append(f"{where}: unreadable ({e})")
            return
        self.report.items_checked += 1
        if actual.dtype != expected.dtype or tuple(actual.shape) != tuple(expected.shape):
            self.report.mismatches.append(f"{where}: holds {actual.dtype} {list(actual.shape)}, expected "
                                          f"{expected.dtype} {list(expected.shape)}")
            return
        d = first_difference(actual, expected.reshape(actual.shape))
        if d is not None:
            n, index = d
            self.report.mismatches.append(f"{where}: {n} of {actual.numel()} elements differ from the source "
                                          f"(first at {list(index)})")

    def close(self) -> None:
        pass



class CrcCompare(PlacingSink):
    """A sink for ``direct.run`` that writes nothing (``/dev/null``) and compares each chunk's CRC-32."""

    def __init__(self, source, expected: dict):
        self.source = source
        self.expected = expected
        self.fd = os.open(os.devnull, os.O_WRONLY)

    def place(self, chunk) -> Placement:
        return Placement(self.fd, 0, os.devnull)

    def placed(self, chunk, place: Placement, crc: int) -> None:
        want = self.expected[chunk.id]
        if crc != want:
            files = sorted({str(path) for r in chunk.reads for path, _, _ in self.source.spans(r)})
            raise BadInputError(
                f"{', '.join(files)}: changed since the interrupted run: {chunk.key} {list(chunk.offsets)} converts "
                f"to other bytes than the ones kept (CRC-32 {crc:08x}, journaled {want:08x}); run again with "
                "--overwrite to convert it from the start")

    def close(self) -> None:
        os.close(self.fd)


def recheck_kept(plan, source, expected: dict, *, max_memory: int, workers: int) -> tuple[int, int]:
    """Re-read and convert, in memory, every chunk of ``plan`` that ``expected`` (``{(key, offsets):
    journaled CRC-32}``) names, and compare; raises ``BadInputError`` at the first difference. Returns the
    chunks and bytes checked."""
    if not expected:
        return 0, 0
    sink = CrcCompare(source, expected)
    stats = Stats(path="direct")
    try:
        direct.run(plan, source, sink, max_memory=max_memory, workers=workers, progress=None,
                   skip=lambda c: c.id not in expected, stats=stats)
    finally:
        sink.close()
    return stats.chunks_done, stats.bytes_done
