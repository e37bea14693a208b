"""Progress reporting with rich: bytes, tensors and chunks done, rate, ETA, memory in use vs budget, layer;
and the end-of-run summary table."""

from __future__ import annotations

import sys
import threading

from streamconv.units import fmt_bytes

# rich is imported where a bar or a table is drawn: a --quiet or --json run never loads it (0.2 s here)


class RichProgress:
    """A live bar on stderr; used as the engine's ``progress`` argument and as a context manager.

    Shows bytes done/total, rate, ETA, tensors and chunks done/total, memory in flight vs the budget and
    the layer being written. ``advance`` may be called from the engine's writer thread.
    """

    def __init__(self, title: str, total_bytes: int, total_chunks: int, budget: int, console=None, plan=None):
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.console = console or Console(stderr=True)
        self.budget = budget
        self.total_chunks = total_chunks
        self.chunks = 0
        self.kept = 0  # bytes an earlier run did, kept by this one
        self._lock = threading.Lock()
        # chunks still to come per output tensor: a tensor is done when its last chunk is
        self._left: dict[str, int] = {}
        for c in getattr(plan, "chunks", ()):
            self._left[c.key] = self._left.get(c.key, 0) + 1
        self.total_tensors = len(self._left)
        self.tensors = 0
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[counts]}"),
            TextColumn("mem {task.fields[mem]}"),
            TextColumn("{task.fields[where]}"),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task(title, total=total_bytes, counts=self._counts(),
                                           mem=f"0/{fmt_bytes(budget)}", where="")

    def _counts(self) -> str:
        tensors = f"{self.tensors}/{self.total_tensors} tensors, " if self.total_tensors else ""
        return f"{tensors}{self.chunks}/{self.total_chunks} chunks"

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def advance(self, chunk, in_flight: int, skipped: bool = False) -> None:
        with self._lock:
            self.chunks += 1
            left = self._left.get(chunk.key)
            if left is not None:
                self._left[chunk.key] = left - 1
                self.tensors += left == 1
            if skipped:  # kept from an earlier run: not this run's work, so neither its rate nor its ETA
                self.kept += chunk.nbytes
                self.progress.update(self.task, total=self.progress.tasks[0].total - chunk.nbytes,
                                     counts=self._counts(), where=f"{fmt_bytes(self.kept)} kept from the last run")
                return
            layer = chunk.layer
            where = f"layer {layer}" if layer is not None else chunk.key.split(".")[0]
            if self.kept:
                where += f" ({fmt_bytes(self.kept)} kept)"
            self.progress.update(self.task, advance=chunk.nbytes, counts=self._counts(),
                                 mem=f"{fmt_bytes(in_flight)}/{fmt_bytes(self.budget)}", where=where)

    def remote(self, done: int, kept: int, chunks: int) -> None:
        """Other ranks' work in a distributed run (their bytes done and kept, chunks), since the last call."""
        with self._lock:
            self.chunks += chunks
            self.kept += kept
            task = self.progress.tasks[0]
            self.progress.update(self.task, advance=done, total=task.total - kept, counts=self._counts())


class NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def advance(self, chunk, in_flight: int, skipped: bool = False) -> None:
        pass


def make_progress(quiet: bool, title: str, total_bytes: int, total_chunks: int, budget: int, plan=None):
    if quiet or not sys.stderr.isatty() and not _force():
        return NullProgress()
    return RichProgress(title, total_bytes, total_chunks, budget, plan=plan)


# summary keys shown to people at the end, in this order: (key, label, how to show the value)
_SUMMARY_ROWS = (
    ("input", "input", str),
    ("output", "output", str),
    ("architecture", "model", lambda v: str(v)),
    ("layers", "layers", str),
    ("tensors", "tensors", lambda v: f"{v:,}"),
    ("chunks", "chunks written", lambda v: f"{v:,}"),
    ("chunks_resumed", "chunks resumed", lambda v: f"{v:,}"),
    ("shards", "shards", str),
    ("files", "files", str),
    ("bytes", "bytes", lambda v: f"{fmt_bytes(v)} ({v / 1e9:.2f} GB)"),
    ("seconds", "time", lambda v: f"{v:.1f} s"),
    ("mb_per_s", "throughput", lambda v: f"{v:,.0f} MB/s"),
    ("peak_rss_bytes", "peak RSS", fmt_bytes),
    ("conversion_peak_rss_bytes", "peak RSS converting", fmt_bytes),
    ("max_memory_bytes", "--max-memory", fmt_bytes),
    ("peak_in_flight_bytes", "peak in flight", fmt_bytes),
    ("device", "device", str),
    ("workers", "workers", str),
)


def summary_table(summary: dict, title: str | None = None):
    """The end-of-run summary for people: one small table (what ``--json`` prints, readable)."""
    from rich.table import Table

    table = Table(title=title or f"streamconv {summary.get('command', '')}".strip(), show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, label, show in _SUMMARY_ROWS:
        if summary.get(key) is not None:
            table.add_row(label, show(summary[key]))
    return table


def print_summary(summary: dict, console=None) -> None:
    (console or stdout_console()).print(summary_table(summary))


def stdout_console():
    """A rich Console for stdout: the terminal's width on a terminal; into a file or a pipe, no width limit
    (rich would otherwise assume 80 columns and cut table cells: "20,938.…")."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=100_000, soft_wrap=True)


def _force() -> bool:
    import os

    return os.environ.get("STREAMCONV_PROGRESS") == "1"
