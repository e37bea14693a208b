"""A placing sink's kept chunks: which a resumed run keeps, and what ``--recheck`` does again.

Both placing sinks (``torch_dist.py``: ``.distcp`` files, ``safetensors.py``: shards) keep the same state for a
resumed run: ``committed`` (the files already complete), ``done`` (the chunk ids kept), ``_left`` (chunks still to
write per file), ``by_file``, the ``journal`` and the ``report`` counters. Checking a ``.partial`` file and reading
chunks back are each sink's own (its framing); the bookkeeping is here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from streamconv.errors import output_error


def keep_journaled(sink, f: int, journaled) -> None:
    """File ``f``'s ``.partial`` is this plan's, reopened: its chunks with a journal record since it was created
    (``journaled``: their ids) are kept; the rest are written again."""
    for c in sink.by_file[f]:
        if c.id in journaled:
            sink.done.add(c.id)
            sink._left[f] -= 1
            sink.report["chunks_kept"] += 1


def redo_bad_chunks(sink, checked: list[tuple[int, Path, list]], uncommit: Callable[[int], None],
                    resumed_counter: str) -> int:
    """For each ``(file, path, bad chunks)`` of ``checked`` with a bad chunk: a committed file is written again
    from the start (removed first, so no later run keeps it; ``uncommit(file)`` forgets it), an open ``.partial``
    chunk by chunk (a ``redo`` record voids each old one). ``resumed_counter``: the report's count of files kept
    whole, less one for each committed file redone that an earlier run wrote. Returns the chunks to write again."""
    redone = 0
    for f, path, bad in checked:
        if not bad:
            continue
        if f in sink.committed:
            try:
                path.unlink()
            except OSError as e:
                raise output_error(path, e) from e
            uncommit(f)
            kept = {c.id for c in sink.by_file[f]} & sink.done  # committed by this run from its .partial
            if kept:
                sink.done -= kept
                sink.report["chunks_kept"] -= len(kept)
            else:
                sink.report[resumed_counter] -= 1
            sink._left[f] = len(sink.by_file[f])
            redone += len(sink.by_file[f])
            continue
        for c in bad:
            sink.journal.append({"t": "redo", "key": c.key, "offsets": list(c.offsets)})
            sink.done.discard(c.id)
            sink._left[f] += 1
            sink.report["chunks_kept"] -= 1
            redone += 1
    sink.journal.sync()
    return redone
