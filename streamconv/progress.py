"""Progress reporting with rich: bytes and chunks done, rate, ETA, memory in use vs budget, layer."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

from streamconv.engine import fmt_bytes


class RichProgress:
    """A live bar on stderr; used as the engine's ``progress`` argument and as a context manager."""

    def __init__(self, title: str, total_bytes: int, total_chunks: int, budget: int, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.budget = budget
        self.total_chunks = total_chunks
        self.chunks = 0
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[chunks]}"),
            TextColumn("mem {task.fields[mem]}"),
            TextColumn("{task.fields[where]}"),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task(title, total=total_bytes, chunks=f"0/{total_chunks}",
                                           mem=f"0/{fmt_bytes(budget)}", where="")

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def advance(self, chunk, in_flight: int, skipped: bool = False) -> None:
        self.chunks += 1
        layer = chunk.layer
        where = f"layer {layer}" if layer is not None else chunk.key.split(".")[0]
        self.progress.update(self.task, advance=chunk.nbytes, chunks=f"{self.chunks}/{self.total_chunks}",
                             mem=f"{fmt_bytes(in_flight)}/{fmt_bytes(self.budget)}",
                             where=where + (" (resumed)" if skipped else ""))


class NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def advance(self, chunk, in_flight: int, skipped: bool = False) -> None:
        pass


def make_progress(quiet: bool, title: str, total_bytes: int, total_chunks: int, budget: int):
    if quiet or not sys.stderr.isatty() and not _force():
        return NullProgress()
    return RichProgress(title, total_bytes, total_chunks, budget)


def _force() -> bool:
    import os

    return os.environ.get("STREAMCONV_PROGRESS") == "1"
