"""The driver's progress line and closing summary, on stderr.

>>> p = Progress(total=1000, stream=None, now=lambda: 10.0)
>>> p.start = 0.0
>>> p.update(rows=250, nbytes=50_000_000)
>>> p.line()
'[#####...............]    250/1,000 samples  25.0 samples/s  5.0 MB/s  ETA 0:30'
>>> p.in_flight(50)  # samples done of shards still running count too
>>> p.line()
'[######..............]    300/1,000 samples  30.0 samples/s  5.0 MB/s  ETA 0:23'
>>> p.in_flight(50, pending=2)  # workers asked for that are not up yet
>>> p.line()
'[######..............]    300/1,000 samples  30.0 samples/s  5.0 MB/s  ETA 0:23  (2 actors pending)'
>>> p.in_flight(50); p.waiting(1, 12.3)  # failed shards waiting for their next try
>>> p.line()
'[######..............]    300/1,000 samples  30.0 samples/s  5.0 MB/s  ETA 0:23  (1 shard to retry in 12 s)'
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def duration_text(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Samples done of ``total``, samples/s, MB/s and the time left, redrawn in place on a
    terminal and logged every ``every`` seconds elsewhere.

    :meth:`update` adds a finished shard; :meth:`in_flight` sets the samples done so far of the
    shards still running (reported by the actors per batch), so the line moves with every batch.
    """

    def __init__(self, total: int, stream: TextIO | None = sys.stderr, every: float = 10.0,
                 now: Callable[[], float] = time.monotonic):
        self.total, self.stream, self.every, self.now = total, stream, every, now
        self.start = now()
        self.samples = 0
        self.partial = 0
        self.bytes = 0
        self.pending = 0
        self.retries: tuple[int, float] = (0, 0.0)  # shards waiting for their next try, and when the first is due
        self._last_print = -1e9
        self._ended = False
        self._tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())

    def update(self, rows: int, nbytes: int) -> None:
        self.samples += rows
        self.bytes += nbytes
        self._draw()

    def in_flight(self, samples: int, pending: int = 0) -> None:
        """Set the samples done so far of the shards still running, and the workers not up yet;
        redraw if either changed."""
        if (samples, pending) != (self.partial, self.pending):
            self.partial, self.pending = samples, pending
            self._draw()

    def waiting(self, shards: int, seconds: float) -> None:
        """Set the failed shards that wait for their next try, the first in ``seconds``; redraw
        (on a terminal, every call: the seconds count down; elsewhere, every ``every`` seconds)."""
        self.retries = (shards, seconds)
        if shards:
            self._draw()

    def _draw(self) -> None:
        if self.stream is None:
            return
        if self._tty:
            self.stream.write("\r" + self.line())
            self.stream.flush()
        elif self.now() - self._last_print >= self.every or (self.samples >= self.total and not self._ended):
            self.stream.write(self.line() + "\n")
            self._last_print = self.now()
            self._ended = self.samples >= self.total  # the closing line once, not per late redraw

    def line(self) -> str:
        elapsed = max(self.now() - self.start, 1e-9)
        done = min(self.samples + self.partial, self.total)
        rate = done / elapsed
        width = 20
        filled = int(width * done / self.total) if self.total else width
        eta = duration_text((self.total - done) / rate) if rate > 0 else "?"
        pending = f"  ({self.pending} actor{'s' if self.pending > 1 else ''} pending)" if self.pending else ""
        shards, seconds = self.retries
        if shards:
            pending += f"  ({shards} shard{'s' if shards > 1 else ''} to retry in {seconds:.0f} s)"
        return (f"[{'#' * filled}{'.' * (width - filled)}] {done:>6,}/{self.total:,} samples  "
                f"{rate:.1f} samples/s  {self.bytes / elapsed / 1e6:.1f} MB/s  ETA {eta}{pending}")

    def close(self) -> None:
        if self.stream is not None and self._tty:
            self.stream.write("\n")
            self.stream.flush()
