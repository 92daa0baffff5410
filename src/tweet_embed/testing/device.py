"""Capacity simulation: TEI's admission permits and one accelerator working through a FIFO queue.

Why: a real GPU behind TEI has a fixed throughput and a bounded queue; clients, planners and benchmarks must
be measured against that shape (throughput that does not grow with concurrency, latency that grows with the
queue, 429 once the queue is full), not against a server that answers as fast as the CPU allows.

* :class:`Permits` is TEI 1.9.3's ``limit_concurrent_requests`` semaphore (core/src/infer.rs): one permit per
  *input* (a batch of n takes n, each ``try_acquire``\\d in turn, so a batch that does not fit gets 429 and
  keeps none), held until that input's answer is ready.  ``max_concurrent_requests`` is therefore the number
  of inputs accepted and not yet answered — queued or being computed — and a request of n inputs gets
  ``429 Model is overloaded`` when ``held + n > max_concurrent_requests``.
* :class:`Device` works inputs one request at a time in arrival order at ``capacity`` inputs per second: a
  request of n inputs arriving at t finishes at ``max(t, previous finish) + n / capacity``.  A virtual clock
  (no worker task): the handler sleeps until its finish time, so timing does not drift with event-loop load.
  TEI batches concurrent requests together on the device; with a throughput that is linear in inputs the
  total time is the same, only which request finishes first within a batch differs.
"""

from __future__ import annotations

import threading

__all__ = ["Device", "Permits"]


class Permits:
    """Admission by inputs; thread-safe (the server's control calls come from other threads)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self.max_held = 0
        self._lock = threading.Lock()

    def try_acquire(self, n: int) -> bool:
        with self._lock:
            if self.held + n > self.limit:
                return False
            self.held += n
            self.max_held = max(self.max_held, self.held)
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self.held -= n


class Device:
    """One simulated accelerator: ``capacity`` inputs per second, FIFO."""

    def __init__(self, capacity: float):
        if not capacity > 0:
            raise ValueError(f"capacity must be > 0 docs/s, not {capacity!r}")
        self.capacity = float(capacity)
        self.free_at = 0.0  # clock time at which the last booked work ends
        self.busy_seconds = 0.0
        self._lock = threading.Lock()

    def book(self, n: int, now: float) -> float:
        """Queue ``n`` inputs arriving at ``now``; returns the clock time their answer is ready."""
        work = n / self.capacity
        with self._lock:
            start = max(now, self.free_at)
            self.free_at = start + work
            self.busy_seconds += work
            return self.free_at
