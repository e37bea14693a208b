"""The chunk journal's committer: what makes a placed chunk durable and then records it, off the workers.

A placing sink (``sinks/torch_dist.py``, ``sinks/safetensors.py``) hands every completed chunk to ``put``.
A thread takes them in batches: one ``fdatasync`` per file of the batch (the chunk's bytes and framing are on
disk), then one journal record per chunk (``{"t": "chunk", "key", "offsets", "crc32"}``: the chunk's commit,
which a resumed run trusts), then the sink's ``done(chunk)`` (which commits a file once it is full). The
engine's workers never wait for the disk's flush.

An error on the thread is kept and raised at the next ``check`` (the sink calls it in ``placed``) or at
``stop``; after ``abort`` nothing more is journaled.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable

from streamconv.errors import output_error


class _Aborted(Exception):
    pass


def chunk_record(chunk, crc: int) -> dict:
    return {"t": "chunk", "key": chunk.key, "offsets": list(chunk.offsets), "crc32": crc}


class Committer:
    def __init__(self, journal, done: Callable[[object], None]):
        self.journal = journal
        self.done = done
        self.error: BaseException | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = threading.Thread(target=self._loop, name="streamconv-commit",
                                                                 daemon=True)
        self._thread.start()

    def put(self, chunk, place, crc: int) -> None:
        """``chunk``'s bytes are written at ``place`` (a ``contracts.Placement``) with CRC-32 ``crc``."""
        self._queue.put((chunk, place, crc))

    def check(self) -> None:
        """Raise the thread's error, if it had one."""
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Journal what was put, end the thread, raise its error if any."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self.check()

    def abort(self) -> None:
        """End the thread; what is still queued is not journaled (it is redone by the next run)."""
        self.error = self.error or _Aborted()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get())
            stop = any(b is None for b in batch)
            batch = [b for b in batch if b is not None]
            if self.error is not None:
                continue
            try:
                synced = set()
                for _, place, _ in batch:
                    if place.fd not in synced:
                        try:
                            os.fdatasync(place.fd)
                        except OSError as e:
                            raise output_error(place.path, e) from e
                        synced.add(place.fd)
                for chunk, _, crc in batch:
                    self.journal.append(chunk_record(chunk, crc))
                    self.done(chunk)
            except BaseException as e:  # reported at the next check() or at stop()
                self.error = e
