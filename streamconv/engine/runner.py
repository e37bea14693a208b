"""The engine's entry point: runs a plan chunk by chunk under a memory budget.

``run`` takes the direct path (``direct.py``: extents copied piece by piece into a placing sink's files)
when the source is a ``FileSource``, the sink places chunks and the work is on the CPU; otherwise the
buffered path (``buffered.py``: chunk buffers, a stage on ``--device``, a writer thread). The contracts
both paths hold a source and a sink to are in ``contracts.py``.
"""

from __future__ import annotations

import os
import time

from streamconv.engine import buffered, direct
from streamconv.engine.contracts import Sink, Source, Stage, Stats
from streamconv.plan.build import Chunk, Plan

DEFAULT_MAX_MEMORY = 2 * 1024**3


def default_workers() -> int:
    """One engine thread per CPU this process may use, at most 8: on tmpfs, more threads than cores only
    contend (docs/benchmarks.md); beyond 8, file systems seldom gain."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def chunk_cost(plan: Plan, chunk: Chunk, source: Source, sink: Sink | None = None) -> int:
    """Bytes a chunk holds at most while in flight (on the CPU stage)."""
    return buffered.make_job(plan, chunk, source, sink).cost


def min_memory(plan: Plan, source: Source, sink: Sink | None = None) -> int:
    """The smallest budget that can run ``plan``: its largest single chunk (plus the sink's reserve)."""
    return max((chunk_cost(plan, c, source, sink) for c in plan.chunks), default=0) + (
        0 if sink is None else sink.reserved_memory)


def run(plan: Plan, source: Source, sink: Sink, *, max_memory: int = DEFAULT_MAX_MEMORY, workers: int = 4,
        device: str = "cpu", progress=None, skip=None, stage: Stage | None = None) -> Stats:
    """Execute ``plan`` reading from ``source`` and writing to ``sink``.

    ``skip(chunk) -> bool`` marks chunks already done (resume). ``progress``, if given, gets
    ``advance(chunk, in_flight_bytes, skipped=False)`` after each chunk. ``stage`` overrides the one
    ``device`` selects (tests).
    """
    t0 = time.perf_counter()
    if stage is None and direct.usable(source, sink, device):
        stats = Stats(path="direct")
        direct.run(plan, source, sink, max_memory=max_memory, workers=workers, progress=progress, skip=skip,
                   stats=stats)
        stats.seconds = time.perf_counter() - t0
        return stats
    return buffered.run(plan, source, sink, max_memory=max_memory, workers=workers, device=device, progress=progress,
                        skip=skip, stage=stage, t0=t0)
