"""Resident memory of this process: the whole-run peak, and the peak over a window (Linux).

``getrusage`` gives the peak since the process started, which includes one-off costs of start-up (imports,
planning). To see what the conversion itself holds, ``reset_peak()`` clears the kernel's high-water mark
(``/proc/self/clear_refs`` ``5``) and ``window_peak()`` reads it back (``VmHWM``). Where that is not
possible, both fall back to the whole-run peak.
"""

from __future__ import annotations

import resource
import sys


def run_peak() -> int:
    """Peak RSS of this process since it started, in bytes."""
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
