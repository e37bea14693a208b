"""The engine: runs a plan chunk by chunk under a memory budget.

Reads (``source.read_rows``) run ahead on worker threads; the calling thread transforms (gather + cast,
on ``device``) and hands each finished piece to the sink, in plan order. Every chunk in flight is
accounted at the bytes it will hold (its reads plus its output); a new chunk starts only while the total
stays under the budget, so peak memory is bounded by ``max_memory`` whatever the model size.
"""

from __future__ import annotations

import collections
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from streamconv.plan import Chunk, Plan
from streamconv.transforms import gather

DEFAULT_MAX_MEMORY = 2 * 1024**3


@dataclass
class Stats:
    bytes_done: int = 0
    chunks_done: int = 0
    chunks_skipped: int = 0
    seconds: float = 0.0
    peak_in_flight: int = 0


def chunk_cost(chunk: Chunk, source) -> int:
    """Bytes a chunk holds while in flight: what it reads plus what it produces."""
    read = sum(source.read_nbytes(r) for r in chunk.reads)
    return read + chunk.nbytes


def run(plan: Plan, source, sink, *, max_memory: int = DEFAULT_MAX_MEMORY, workers: int = 4,
        device: str = "cpu", progress=None, skip=None) -> Stats:
    """Execute ``plan`` reading from ``source`` and writing to ``sink``.

    ``skip(chunk) -> bool`` marks chunks already done (resume). ``progress``, if given, gets
    ``advance(chunk)`` after each chunk and ``memory(in_flight_bytes)`` as the budget changes.
    """
    stats = Stats()
    t0 = time.perf_counter()
    dev = torch.device(device)
    in_flight: collections.deque = collections.deque()  # (chunk, future, cost)
    used = 0

    def finish_oldest() -> None:
        nonlocal used
        chunk, fut, cost = in_flight.popleft()
        parts = fut.result()
        target = plan.targets[chunk.key]
        out = gather([p.to(dev, non_blocking=True) for p in parts], target.dtype)
        out = out.reshape(chunk.sizes)
        if out.device.type != "cpu":
            out = out.cpu()
        sink.write(chunk, out)
        del parts, out
        used -= cost
        stats.bytes_done += chunk.nbytes
        stats.chunks_done += 1
        if progress is not None:
            progress.advance(chunk, used)

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="streamconv-read") as pool:
        for chunk in plan.chunks:
            if skip is not None and skip(chunk):
                stats.chunks_skipped += 1
                if progress is not None:
                    progress.advance(chunk, used, skipped=True)
                continue
            cost = chunk_cost(chunk, source)
            while in_flight and used + cost > max_memory:
                finish_oldest()
            used += cost
            stats.peak_in_flight = max(stats.peak_in_flight, used)
            fut = pool.submit(lambda c=chunk: [source.read_rows(r.name, r.row0, r.row1, r.index) for r in c.reads])
            in_flight.append((chunk, fut, cost))
        while in_flight:
            finish_oldest()
    stats.seconds = time.perf_counter() - t0
    return stats


def min_memory(plan: Plan, source) -> int:
    """The smallest budget that can run ``plan``: its largest single chunk."""
    return max((chunk_cost(c, source) for c in plan.chunks), default=0)


def fmt_bytes(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    exp = min(int(math.log(n, 1024)), 5)
    return f"{n / 1024**exp:.1f} {'BKMGTP'[exp]}iB"


def parse_size(text: str) -> int:
    """``"2GiB"``, ``"512MB"``, ``"1.5G"``, ``"1000000"`` -> bytes (K/M/G/T are powers of 1024)."""
    s = text.strip().upper().replace("IB", "").replace("B", "")
    mult = 1
    if s and s[-1] in "KMGT":
        mult, s = 1024 ** ("KMGT".index(s[-1]) + 1), s[:-1]
    try:
        value = float(s)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 512MiB, 2GiB)") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return int(value * mult)
