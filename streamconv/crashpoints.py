"""Hooks for crash tests: deterministic places where a test can SIGKILL a real conversion process.

They do nothing unless their environment variable is set (tests/test_resume.py sets them on the CLI
subprocess it kills):

- ``STREAMCONV_TEST_PAUSE=<point>[:<n>]``: the n-th time ``pause(point)`` is reached (default 1), create the
  file ``STREAMCONV_TEST_PAUSE_FILE`` and stop the whole process (SIGSTOP: no other thread goes on) until
  it is killed. Points: ``chunk`` (a chunk written and journaled, sinks/torch_dist.py; written into its shard,
  sinks/safetensors.py; compared, sinks/compare.py), ``metadata``
  (half of ``.metadata`` written to its temporary file), ``work`` (set up, before the engine's first chunk).
  With ``STREAMCONV_TEST_PAUSE_CONTINUE=1`` a SIGCONT lets it go on (a test changes something meanwhile).
  The file exists a moment before the SIGSTOP lands, and a SIGCONT sent in between is lost (the process
  then stops for good): a test that sends one first waits for the stop (``wait_stopped``).
- ``STREAMCONV_TEST_RANK=<r>``: in a distributed run, the hooks act on rank ``r`` only.
- ``STREAMCONV_TEST_SLOW=<seconds>``: ``slow(f)`` sleeps ``f`` times that (per chunk, once it is written),
  so a test can see a run at work before it signals it.
- ``STREAMCONV_TEST_TINY_BUDGET=1``: ``--max-memory`` below 1 MiB is accepted (``inputs.check_budget``),
  so a tiny test model splits into many chunks (tests/conftest.py sets it for every test).
- ``STREAMCONV_TEST_HUB_WAIT=<seconds>``: the Hub source's first wait before a retry (``sources/hub.py``; 1 s),
  so a test that injects faults does not wait a second per retry.
- ``STREAMCONV_TEST_STARTED=<file>``: ``started()`` creates that file (when the sink starts, before resuming),
  so a test times its kill from there rather than from the interpreter's start.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path

HUB_WAIT_HOOK = "STREAMCONV_TEST_HUB_WAIT"
_counts: dict[str, int] = defaultdict(int)
_lock = threading.Lock()


def _mine() -> bool:
    rank = os.environ.get("STREAMCONV_TEST_RANK")
    return rank is None or rank == os.environ.get("RANK", "0")


def pause(point: str) -> None:
    want = os.environ.get("STREAMCONV_TEST_PAUSE")
    if not want or not _mine():
        return
    name, _, n = want.partition(":")
    if name != point:
        return
    with _lock:
        _counts[point] += 1
        hit = _counts[point] == int(n or 1)
    if hit:  # the whole process stops here (every thread), so what the test sees is what a kill leaves
        Path(os.environ["STREAMCONV_TEST_PAUSE_FILE"]).write_text(f"{point} {os.getpid()}")
        os.kill(os.getpid(), signal.SIGSTOP)
        if os.environ.get("STREAMCONV_TEST_PAUSE_CONTINUE") == "1":
            return
        while True:  # resumed by SIGCONT instead of killed: stay here
            time.sleep(60)


def slow(fraction: float) -> None:
    s = os.environ.get("STREAMCONV_TEST_SLOW")
    if s and _mine():
        time.sleep(float(s) * fraction)


def started() -> None:
    path = os.environ.get("STREAMCONV_TEST_STARTED")
    if path:
        Path(path).write_text(str(os.getpid()))


def wait_stopped(pid: int, timeout: float = 120.0) -> None:
    """For tests: return once process ``pid`` is stopped (state ``T`` in ``/proc/<pid>/stat``), so that a
    SIGCONT sent next lets it go on; ``timeout`` only guards a run that never gets there."""
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        if state in ("T", "t"):
            return
        if state in ("Z", "X") or time.monotonic() > deadline:
            raise RuntimeError(f"process {pid} did not stop at its pause point (state {state})")
        time.sleep(0.001)
