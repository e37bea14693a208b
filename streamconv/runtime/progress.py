"""Progress reporting with rich: bytes, tensors and chunks done, rate, ETA, memory in use vs budget, layer;
and the end-of-run summary table."""

from __future__ import annotations

import sys
import threading

from streamconv.errors import printable
from streamconv.units import fmt_bytes

# rich is imported where a bar or a table is drawn: a --quiet or --json run never loads it (0.2 s here)


class RichProgress:
    """A live display on stderr; used as the engine's ``progress`` argument and as a context manager.

    Two lines, so that an 80-column terminal (down to ~60) shows the essentials unabridged::

        hf2mcore ━━━━━━━━━━━━━━━━━━━━━━━━━━   1.2/2.8 GiB  393.4 MiB/s  0:00:04
          123/201 source tensors, 40/96 chunks · mem 64.0 MiB/2.0 GiB · layer 12

    line 1: bytes done/total, rate and ETA of this run's work (bytes an earlier run kept are taken off the
    total, not counted as throughput); line 2: what moves (source tensors read for hf2mcore, tensors written
    otherwise: a stacked megatron tensor completes only at the end), chunks, memory in flight against the
    budget, where the run is. ``advance`` may be called from any engine thread.
    """

    def __init__(self, title: str, total_bytes: int, total_chunks: int, budget: int, console=None, plan=None,
                 source_line=None):
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
        from rich.text import Text

        self.console = console or Console(stderr=True)
        self.budget = budget
        self.total_chunks = total_chunks
        self.chunks = 0
        self.kept = 0  # bytes an earlier run did, kept by this one
        self.mem = 0
        self.where = ""
        self._lock = threading.Lock()
        self._count = _Counter(plan)
        self._source_line = source_line  # () -> str: what the source says of itself (a Hub source: the network)
        width = self.console.width
        title_width = len(title)
        bar = max(8, min(40, width - title_width - 38))  # what line 1's numbers leave
        status = self

        class _Display(Progress):
            def get_renderables(self):
                yield self.make_tasks_table(self.tasks)
                yield Text(status.status_line(), no_wrap=True, overflow="ellipsis", style="dim")

        class _Speed(ProgressColumn):  # binary units, as every size people see here
            def render(self, task):
                speed = task.finished_speed or task.speed
                return Text("?" if speed is None else f"{fmt_bytes(int(speed))}/s", style="progress.data.speed")

        self.progress = _Display(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=bar),
            DownloadColumn(binary_units=True),
            _Speed(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task(title, total=total_bytes)

    def status_line(self) -> str:
        parts = [f"{self._count.text()}{self.chunks}/{self.total_chunks} chunks",
                 f"mem {fmt_bytes(self.mem)}/{fmt_bytes(self.budget)}"]
        where = self.where
        if self.kept:
            where = (where + " " if where else "") + f"({fmt_bytes(self.kept)} kept)"
        if where:
            parts.append(where)
        if self._source_line is not None:
            parts.append(self._source_line())
        return "  " + " · ".join(parts)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def advance(self, chunk, in_flight: int, skipped: bool = False) -> None:
        with self._lock:
            self.chunks += 1
            self._count.done(chunk)
            if skipped:  # kept from an earlier run: not this run's work, so neither its rate nor its ETA
                self.kept += chunk.nbytes
                self.progress.update(self.task, total=self.progress.tasks[0].total - chunk.nbytes)
                return
            layer = chunk.layer
            self.where = f"layer {layer}" if layer is not None else chunk.key.split(".")[0]
            self.mem = in_flight
            self.progress.update(self.task, advance=chunk.nbytes)

    def remote(self, done: int, kept: int, chunks: int) -> None:
        """Other ranks' work in a distributed run (their bytes done and kept, chunks), since the last call."""
        with self._lock:
            self.chunks += chunks
            self.kept += kept
            task = self.progress.tasks[0]
            self.progress.update(self.task, advance=done, total=task.total - kept)


class _Counter:
    """What moves as a run goes: the source tensors whose rows have all been read, when the plan reads
    more source tensors than it writes (hf2mcore: layers are stacked into a few megatron tensors); else the
    output tensors whose chunks are all written."""

    def __init__(self, plan):
        self.left: dict[str, int] = {}
        self.by_reads = False
        chunks = list(getattr(plan, "chunks", ()))
        names = {r.name for c in chunks for r in c.reads}
        keys = {c.key for c in chunks}
        if names and len(names) > len(keys):
            self.by_reads, self.label = True, "source tensors"
            for c in chunks:
                for r in c.reads:
                    self.left[r.name] = self.left.get(r.name, 0) + (r.row1 - r.row0) + 1  # +1: empty reads count
        else:
            self.label = "tensors"
            for c in chunks:
                self.left[c.key] = self.left.get(c.key, 0) + 1
        self.total = len(self.left)
        self.count = 0

    def done(self, chunk) -> None:
        items = ([(r.name, (r.row1 - r.row0) + 1) for r in chunk.reads] if self.by_reads else [(chunk.key, 1)])
        for name, n in items:
            left = self.left.get(name)
            if left is not None:
                self.left[name] = left - n
                self.count += left - n <= 0 < left

    def text(self) -> str:
        return f"{self.count}/{self.total} {self.label}, " if self.total else ""


class NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def advance(self, chunk, in_flight: int, skipped: bool = False) -> None:
        pass


def status(message: str, quiet: bool = False) -> None:
    """One line on stderr saying what a command is doing before its bar appears (reading headers, planning,
    resuming): for people only (a terminal, or STREAMCONV_PROGRESS=1), never with --quiet or --json."""
    if quiet or not (sys.stderr.isatty() or _force()):
        return
    sys.stderr.write(f"streamconv: {printable(message)}\n")
    sys.stderr.flush()


def make_progress(quiet: bool, title: str, total_bytes: int, total_chunks: int, budget: int, plan=None,
                  source_line=None):
    """``source_line``: a function giving a few words on the source, shown at the end of line 2 (the Hub's:
    bytes fetched, connections, retries)."""
    if quiet or not sys.stderr.isatty() and not _force():
        return NullProgress()
    return RichProgress(title, total_bytes, total_chunks, budget, plan=plan, source_line=source_line)


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
    ("bytes", "bytes", lambda v: f"{fmt_bytes(v)} ({v:,} bytes)"),
    ("seconds", "time", lambda v: f"{v:.1f} s"),
    ("mb_per_s", "throughput", lambda v: f"{fmt_bytes(v * 1e6)}/s"),
    ("hub", "from the Hub", lambda v: f"{v['repo']}@{v['sha'][:12]}: {fmt_bytes(v['bytes_fetched'])} fetched in "
                                      f"{v['requests']:,} requests, {v['retries']} retries, {v['connections']} "
                                      f"connections; {v.get('shards_checked', 0)} shards match their SHA-256"),
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
