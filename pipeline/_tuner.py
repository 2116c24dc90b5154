"""How many of an actor's decoding threads to use: the count that decodes fastest, found by trial.

Threads pay when an image's decoding is long and releases the GIL (a photo costs milliseconds in
C). For small images the Python around each one holds the GIL, and more threads only queue on
it: on a 16-core host, 16 threads decoded 2 KB JPEG files at half the rate of one. The images of
a dataset say which case holds, so the decoder tries each count in turn (1, 2, 4, ... up to its
threads, one batch each), keeps the fastest, and tries again every ``period`` batches, since
the images may change along a dataset. A trial is one batch, and one batch's time is noisy on a
shared machine: a count with more threads is kept when it comes within ``margin`` of the
fastest, since too few threads cost far more than a few too many (on 2 cores, one noisy trial
that kept 1 thread for 64 batches cost a fifth of a Parquet source's rate). For the same reason
a pick of fewer threads than before is held only ``period // 8`` batches before the counts are
tried again, and for a whole period once the next trials confirm it. Only a batch decoded
alone is a trial (one that shares the threads with another batch is timed too slow): the
batches of shards decoded at once take the fastest count so far, and count towards the period
untimed. Pure logic: the caller times its batches.

>>> def run(tuner, rates, batches):  # rates: images/s of each count
...     picked = []
...     for _ in range(batches):
...         threads = tuner.pick()
...         picked.append(threads)
...         tuner.record(threads, images=256, seconds=256 / rates[threads])
...     return picked
>>> tuner = ThreadTuner(threads=4, period=16)
>>> tuner.candidates
(1, 2, 4)
>>> run(tuner, {1: 900.0, 2: 1500.0, 4: 1200.0}, 1 + 3 + 2 + 3 + 16)  # doctest: +NORMALIZE_WHITESPACE
[4,  1, 2, 4,  2, 2,  1, 2, 4,  2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]
>>> tuner.pick()  # the warm-up, the trials, 2 threads held 2 batches, confirmed, held 16: trials again
1
>>> close = ThreadTuner(threads=2, period=3)  # 2 threads within the margin of 1: 2 are kept
>>> for threads, rate in [(2, 0.0), (1, 1000.0), (2, 900.0)]:
...     close.record(threads, images=256, seconds=256 / rate if rate else 1.0)
>>> close.pick()
2
"""

from __future__ import annotations

import threading


class ThreadTuner:
    """Picks the thread count for each batch from the rates its trials gave (see the module
    docstring).

    Args:
        threads: the most threads there are.
        period: batches at the fastest count before the counts are tried again.
        margin: a count with more threads is kept if its rate is at least ``1 - margin`` of
            the fastest count's.
    """

    def __init__(self, threads: int, period: int = 64, margin: float = 0.15):
        threads = max(1, int(threads))
        self.candidates = tuple(sorted({min(threads, 1 << k) for k in range(threads.bit_length())} | {threads}))
        self.period = max(1, int(period))
        self.margin = float(margin)
        self._lock = threading.Lock()  # the shards an actor runs at once decode from their own threads
        self._warm = False  # the first batch pays for imports and first calls: it is not timed
        self._trials: list[int] = []
        self._rates: dict[int, float] = {}
        self._best = threads
        self._left = 0
        self._start_trials()

    def _start_trials(self) -> None:
        self._trials, self._rates = list(self.candidates), {}

    def pick(self, trial: bool = True) -> int:
        """The thread count for the next batch: while trials are under way, the next trial's
        for a batch that will be timed (``trial``), the fastest so far for the others."""
        with self._lock:
            if trial and self._warm and self._trials:
                return self._trials[0]
            return self._best

    def record(self, threads: int, images: int, seconds: float | None) -> None:
        """Report a batch of ``images`` decoded by ``threads`` threads in ``seconds``;
        ``None``: a batch not timed (it shared the threads), which counts towards the period."""
        with self._lock:
            if seconds is None:
                if self._warm and not self._trials:
                    self._count_down()
                return
            if not self._warm:
                self._warm = True
                return
            if self._trials:
                if threads == self._trials[0] and images > 0 and seconds > 0:
                    self._trials.pop(0)
                    self._rates[threads] = images / seconds
                    if not self._trials:
                        fastest = max(self._rates.values())
                        best = max(t for t, rate in self._rates.items() if rate >= (1 - self.margin) * fastest)
                        confirmed = best >= self._best  # fewer threads than before: held a while, tried again
                        self._best = best
                        self._left = self.period if confirmed else max(1, self.period // 8)
                return
            self._count_down()

    def _count_down(self) -> None:
        self._left -= 1
        if self._left <= 0:
            self._start_trials()


__all__ = ["ThreadTuner"]
