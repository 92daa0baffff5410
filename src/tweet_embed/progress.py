"""Progress: the original 5-second speed line, an ETA, a live bar on a terminal, the final summary.

The line keeps the original design's format (people grep logs for it):
``Inst. speed: 2927.19 docs/s | Avg speed: 1758.32 docs/s | Total processed: 19104 | ETA: 0:12:03``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TextIO

log = logging.getLogger("tweet_embed")


def fmt_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    return str(timedelta(seconds=int(seconds)))


@dataclass
class Progress:
    """Counts rows as chunks finish; a background thread prints the speed line every ``interval`` s."""

    total_rows: int  # rows (lines) still to do when the run started, for the ETA
    interval: float = 5.0
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    processed: int = 0
    chunks: int = 0
    # A sentence appended to the line when something needs saying (e.g. "waiting for servers: ..."); the
    # line's own fields keep the original format, so greps on it still match.
    note: Callable[[], str | None] | None = None

    def __post_init__(self) -> None:
        self.start = time.monotonic()
        self._last_t = self.start
        self._last_n = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def add(self, rows: int, lines: int | None = None) -> None:
        with self._lock:
            self.processed += rows
            self.chunks += 1
            self._lines_done = getattr(self, "_lines_done", 0) + (lines if lines is not None else rows)

    def line(self) -> str:
        now = time.monotonic()
        with self._lock:
            n = self.processed
            lines_done = getattr(self, "_lines_done", 0)
        dt = now - self._last_t
        inst = (n - self._last_n) / dt if dt > 0 else 0.0
        self._last_t, self._last_n = now, n
        elapsed = now - self.start
        avg = n / elapsed if elapsed > 0 else 0.0
        remaining = max(0, self.total_rows - lines_done)
        eta = remaining / avg if avg > 0 else None
        text = (
            f"Inst. speed: {inst:.2f} docs/s | Avg speed: {avg:.2f} docs/s | Total processed: {n}"
            f" | ETA: {fmt_eta(eta)}"
        )
        note = self.note() if self.note is not None else None
        return f"{text} | {note}" if note else text

    @property
    def lines_done(self) -> int:
        with self._lock:
            return getattr(self, "_lines_done", 0)

    def _bar(self) -> str:
        with self._lock:
            done = getattr(self, "_lines_done", 0)
        frac = done / self.total_rows if self.total_rows else 1.0
        width = 30
        filled = int(frac * width)
        return f"\r[{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}% {self.processed} rows"

    def _loop(self) -> None:
        next_log = time.monotonic() + self.interval
        while not self._stop.wait(0.5 if self._tty else max(0.05, next_log - time.monotonic())):
            if self._tty:
                self.stream.write(self._bar())
                self.stream.flush()
            if time.monotonic() >= next_log:
                if self._tty:
                    self.stream.write("\r" + " " * 60 + "\r")
                log.info(self.line())
                next_log += self.interval

    def __enter__(self) -> Progress:
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._tty:
            self.stream.write("\r" + " " * 60 + "\r")
            self.stream.flush()
