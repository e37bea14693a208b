"""Resident memory of this process: the whole-run peak, and the peak over a window (Linux).

``getrusage`` gives the peak since the process started, which includes one-off costs of start-up (imports,
planning). To see what the conversion itself holds, ``reset_peak()`` clears the kernel's high-water mark
(``/proc/self/clear_refs`` ``5``) and ``window_peak()`` reads it back (``VmHWM``). Where that is not
possible, both fall back to the whole-run peak.
"""

from __future__ import annotations

import resource
import sys


_before_reset = 0  # the high-water mark when ``reset_peak`` last cleared it


def run_peak() -> int:
    """Peak RSS of this process since it started, in bytes: the kernel's high-water mark of this program's
    memory (``VmHWM``, kept across ``reset_peak``). Not ``getrusage``'s ``ru_maxrss``, which Linux carries
    over ``execve`` from the process that forked this one (a parent of 2 GB makes every child look 2 GB); it
    is the fallback where ``/proc`` is not there."""
    hwm = _status("VmHWM")
    if hwm is not None:
        return max(hwm, _before_reset)
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current() -> int:
    return _status("VmRSS") or run_peak()


def reset_peak() -> bool:
    """Start a new window: the high-water mark drops to the current RSS. False where unsupported."""
    global _before_reset
    _before_reset = max(_before_reset, _status("VmHWM") or 0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def window_peak() -> int:
    """Peak RSS since the last ``reset_peak()`` (the whole-run peak where that is unsupported)."""
    return _status("VmHWM") or run_peak()


def cpu_seconds() -> float:
    """CPU seconds (user + system) this process has used so far, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
