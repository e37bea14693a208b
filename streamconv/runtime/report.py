"""What a conversion reports (``--json``, the end-of-run table): one builder for both directions.

Every field means the same in ``hf2mcore`` and ``mcore2hf``, alone or under torchrun (then rank 0 reports
the job, from every rank's figures):

- ``bytes``, ``chunks``, ``chunks_resumed``, ``cpu_seconds``, ``phases``: summed over ranks
- ``seconds``: the conversion's own time, from the inputs checked to the commit (rank 0's clock)
- ``engine_seconds``: the slowest rank's engine
- ``peak_rss_bytes`` (whole process, start-up included), ``conversion_peak_rss_bytes`` (from the engine's
  start), ``peak_in_flight_bytes`` (the budget's accounting): the highest rank's
- ``processes`` and ``ranks`` (each rank's own figures): distributed runs only
"""

from __future__ import annotations

import socket

from streamconv.engine.contracts import Stats
from streamconv.runtime import rss

SUMMED = ("chunks", "bytes", "chunks_resumed")
HIGHEST = ("engine_seconds", "peak_rss_bytes", "conversion_peak_rss_bytes", "peak_in_flight_bytes")


def rank_figures(rank: int, stats: Stats, seconds: float, cpu: float, **extra) -> dict:
    """What one rank did; ``extra``: the sink's own counts (summed in the job's summary when numbers)."""
    return {"rank": rank, "host": socket.gethostname(), "chunks": stats.chunks_done, "bytes": stats.bytes_done,
            "chunks_resumed": stats.chunks_skipped, "seconds": round(seconds, 3),
            "engine_seconds": round(stats.seconds, 3), "cpu_seconds": round(cpu, 3),
            "peak_rss_bytes": rss.run_peak(), "conversion_peak_rss_bytes": rss.window_peak(),
            "peak_in_flight_bytes": stats.peak_in_flight, "engine_path": stats.path,
            "phases": stats.phase_seconds(), **extra}


def summarize(command: str, figures: list[dict], seconds: float, *, processes: int | None, summed=(), **fields) -> dict:
    """The run's summary from every rank's ``rank_figures`` (one alone); ``summed``: more per-rank counts to
    add up; ``fields``: the command's own (input, output, architecture, ...), placed after ``command``;
    ``processes``: the job's size under a launcher, None alone."""
    total = sum(f["bytes"] for f in figures)
    out = {"command": command, **fields}
    out.update({k: sum(f[k] for f in figures) for k in SUMMED + tuple(summed)})
    out.update(seconds=round(seconds, 3), mb_per_s=round(total / 1e6 / max(seconds, 1e-9), 1),
               cpu_seconds=round(sum(f["cpu_seconds"] for f in figures), 3),
               phases={k: round(sum(f["phases"].get(k, 0.0) for f in figures), 3)
                       for k in dict.fromkeys(k for f in figures for k in f["phases"])},
               engine_path=figures[0]["engine_path"])
    out.update({k: max(f[k] for f in figures) for k in HIGHEST})
    if processes is not None:
        out.update(processes=processes, ranks=figures)
    return out
