"""SIGINT and SIGTERM both become ``KeyboardInterrupt`` in the main thread.

So every ``except BaseException: clean up; raise`` path in the commands runs the same way for ctrl-C
and for ``kill`` (a scheduler's preemption, ``timeout``, ``docker stop``), and the CLI reports both on one
line with exit code ``128 + signal``. A second signal while cleaning up ends the process at once: the
output is crash-safe (nothing looks complete before ``.metadata`` is written), so this is no worse than
SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: list[int] = []
_cancelled: list[BaseException] = []  # cancel(): the error the main thread stops with
_delivered: list[bool] = []


def _handler(signum, frame) -> None:
    if _cancelled:  # cancel() interrupted the main thread: it is stopping already; a launcher's SIGTERM
        if _delivered:  # on top of that changes nothing
            return
        _delivered.append(True)
        raise _cancelled[0]
    if _received:  # second signal while the first is being handled: stop now
        os._exit(128 + signum)
    _received.append(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def cancel(error: BaseException) -> None:
    """From any thread: make the main thread raise ``error`` where it is, as a signal would (the same
    clean-up paths run). Used when another rank of a distributed job failed (``dist.Heartbeat``)."""
    if _cancelled:
        return
    _cancelled.append(error)
    import _thread

    _thread.interrupt_main(signal.SIGINT)


@contextlib.contextmanager
def signals_as_interrupt():
    """Within the block, SIGINT and SIGTERM raise ``KeyboardInterrupt`` (main thread only)."""
    _received.clear()
    _cancelled.clear()
    _delivered.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def received() -> int:
    """The signal that interrupted the block (SIGINT if the interrupt came from elsewhere)."""
    return _received[0] if _received else signal.SIGINT
