"""``hf2mcore --recheck``: a resumed run first proves that the source of what it keeps has not changed.

A resumed run keeps every chunk its journal records (``sinks/torch_dist.py``) without reading it
again. The identity check (``resume.describe_difference``: each shard's size, mtime, ctime, inode and header
hash) catches a source replaced or written to since the killed run on any file system that keeps ctime; it
cannot see bytes changed behind the file system's back (bit rot, a file system without ctime, a shard
rewritten in place with its inode and times forged by root). ``--recheck`` closes that: the source of every
kept chunk is read again and converted in memory, on the engine's own direct path (``direct.run``, with a
sink that keeps nothing), and the CRC-32 of the bytes it would write is compared with the one journaled
when the chunk was written: the conversion of a chunk is a function of its source bytes (casts and
dequantization round the same way every time, ``--device cuda`` included), so equal sources give equal
CRCs. A chunk whose CRC differs is refused (exit 3) with its tensor and source file named.

Cost: one read (and cast, if any) of the kept bytes, no write. Without the chunk journal (``--no-staging``)
there is no per-chunk CRC to compare: that combination is refused.
"""

from __future__ import annotations

import os

from streamconv.engine import direct
from streamconv.engine import runner
from streamconv.engine.direct import Placement
from streamconv.errors import BadInputError


class _Compare:
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
            files = sorted({str(self.source.extent(r.name, r.row0, r.row1, r.index)[0]) for r in chunk.reads})
            raise BadInputError(
                f"{', '.join(files)}: changed since the interrupted run: {chunk.key} {list(chunk.offsets)} converts "
                f"to other bytes than the ones kept (CRC-32 {crc:08x}, journaled {want:08x}); run again with "
                "--overwrite to convert it from the start")

    def close(self) -> None:
        os.close(self.fd)


def kept(plan, source, expected: dict, *, max_memory: int, workers: int) -> tuple[int, int]:
    """Re-read and convert, in memory, every chunk of ``plan`` that ``expected`` (``{(key, offsets):
    journaled CRC-32}``) names, and compare; raises ``BadInputError`` at the first difference. Returns the
    chunks and bytes checked."""
    if not expected:
        return 0, 0
    sink = _Compare(source, expected)
    stats = runner.Stats(path="direct")
    try:
        direct.run(plan, source, sink, max_memory=max_memory, workers=workers, progress=None,
                   skip=lambda c: c.id not in expected, stats=stats)
    finally:
        sink.close()
    return stats.chunks_done, stats.bytes_done
