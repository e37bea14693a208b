"""The memory budget: bytes held by chunks in flight, plus free buffers kept for reuse, never over a limit.

Fresh buffers are expensive: the kernel zero-fills every page on first touch (on a VM, often slower than
the disk), and a freed buffer that malloc keeps grows RSS beyond what is in flight. So chunk buffers
come from a cache of exact-size ``uint8`` tensors that are reused (chunks of the same tensor kind in
every layer have the same sizes), and the cache's bytes count against the same limit as the chunks in
flight: the least recently used sizes are freed when a new chunk needs room. A buffer handed out has
exactly its own storage, so ``torch.save`` of it never drags a larger base storage along.
"""

from __future__ import annotations

import collections
import threading


class Memory:
    """``used`` (accounted to chunks) + ``cached`` (free buffers) <= ``limit``, thread-safe."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.cached = 0
        self.peak = 0  # most of used + cached ever held
        self._free: collections.OrderedDict[int, list[torch.Tensor]] = collections.OrderedDict()
        self._cond = threading.Condition()

    def try_acquire(self, n: int) -> bool:
        """Account ``n`` more bytes if they fit (freeing cached buffers as needed)."""
        with self._cond:
            if self.used + n > self.limit:
                return False
            self._evict(self.used + self.cached + n - self.limit)
            self.used += n
            self.peak = max(self.peak, self.used + self.cached)
            return True

    def acquire(self, n: int, check=lambda: None) -> None:
        """Wait until ``n`` bytes fit; ``check()`` runs between waits (it raises to give up)."""
        while not self.try_acquire(n):
            check()
            with self._cond:
                if self.used + n > self.limit:
                    self._cond.wait(0.2)

    def take(self, nbytes: int) -> torch.Tensor:
        """A ``uint8`` buffer of ``nbytes`` (reused if one is free); its bytes must already be acquired."""
        with self._cond:
            free = self._free.get(nbytes)
            if free:
                self.cached -= nbytes
                t = free.pop()
                if not free:
                    del self._free[nbytes]
                return t
        import torch

        return torch.empty(nbytes, dtype=torch.uint8)

    def release(self, n: int, keep=()) -> None:
        """Give back ``n`` accounted bytes; the buffers in ``keep`` (taken under them) stay cached."""
        kept = sum(t.numel() for t in keep)
        if kept > n:
            raise ValueError(f"cannot keep {kept} bytes of buffers under {n} released bytes")
        with self._cond:
            for t in keep:
                size = t.numel()
                self._free.setdefault(size, []).append(t)
                self._free.move_to_end(size)
            self.cached += kept
            self.used -= n
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._free.clear()
            self.cached = 0

    def _evict(self, excess: int) -> None:
        while excess > 0 and self._free:
            size, free = next(iter(self._free.items()))  # least recently used size
            free.pop()
            if not free:
                del self._free[size]
            self.cached -= size
            excess -= size
