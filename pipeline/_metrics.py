"""Live numbers of a dump: Ray metrics from the actors, and the rows of the shards in flight.

Each actor counts, per batch, the rows it has computed and the bad samples it met, and per
finished shard the bytes it wrote per layer and the shard's seconds. Inside Ray these go to
``ray.util.metrics`` (so the Ray dashboard, or the Prometheus and Grafana set-up that ships with
Ray, shows a dump's progress per actor), tagged with the dump's output and the actor:

- ``actmap_rows`` (counter): rows computed, each batch as it leaves the device (a retried
  shard counts again);
- ``actmap_bad_samples`` (counter): samples that could not be read;
- ``actmap_bytes`` (counter, also tagged ``layer``): bytes of the files of finished shards;
- ``actmap_shards`` (counter): shards finished;
- ``actmap_shard_seconds`` (histogram): the time of each finished shard.

Ray exports them with a ``ray_`` prefix (counters also get ``_total``). The driver asks the actors
for :meth:`ActorMetrics.in_flight` between shard results, so its progress line moves with every
batch, not only with every shard.

>>> m = ActorMetrics("out")  # outside Ray: no metrics are exported, the counting still works
>>> m.batch(shard=3, rows=32, bad=1)
>>> m.batch(shard=3, rows=32, bad=0)
>>> m.in_flight()
{3: 65}
>>> m.shard_done(3, {"bytes": {"layer3": 1000}, "seconds": {"total": 2.5}})
>>> m.in_flight()
{}
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

#: Bounds of the shard-seconds histogram.
SHARD_SECONDS = [0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800]


def _ray_worker() -> Any:
    """The ``ray`` module when this process is a Ray worker (an actor), else None."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    if ray.get_runtime_context().get_actor_id() is None:
        return None  # the driver (the trial sample): it exports nothing
    return ray


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB.

    Read from ``VmHWM`` where Linux gives it, not from ``getrusage``'s ``ru_maxrss``: a process
    started by fork (or vfork) and exec keeps in ``ru_maxrss`` the peak its parent had when it
    forked, so a small driver started by a large process would report the parent's peak.

    >>> 0 < peak_rss_mb() < 1e6
    True
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS gives bytes, Linux KiB
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)


class ActorMetrics:
    """What one actor has done, for Ray's metrics and for the driver's progress line.

    Args:
        output: the dump's output location (a tag, to tell dumps apart).
    """

    def __init__(self, output: str):
        self._lock = threading.Lock()
        self._in_flight: dict[int, int] = {}  # shard -> rows and bad samples so far
        self._metrics: dict[str, Any] | None = None
        ray = _ray_worker()
        if ray is not None:
            from ray.util import metrics

            tags = {"output": output, "actor": ray.get_runtime_context().get_actor_id()[:12]}
            keys = tuple(tags)
            self._metrics = {
                "rows": metrics.Counter("actmap_rows", "rows computed by the actor", tag_keys=keys),
                "bad": metrics.Counter("actmap_bad_samples", "samples the actor could not read", tag_keys=keys),
                "bytes": metrics.Counter("actmap_bytes", "bytes of the files of finished shards",
                                         tag_keys=keys + ("layer",)),
                "shards": metrics.Counter("actmap_shards", "shards finished", tag_keys=keys),
                "seconds": metrics.Histogram("actmap_shard_seconds", "seconds per finished shard",
                                             boundaries=SHARD_SECONDS, tag_keys=keys),
            }
            for metric in self._metrics.values():
                metric.set_default_tags(tags)

    def batch(self, shard: int, rows: int, bad: int) -> None:
        """A batch of ``shard`` is done: ``rows`` computed, ``bad`` samples unreadable."""
        with self._lock:
            self._in_flight[shard] = self._in_flight.get(shard, 0) + rows + bad
        if self._metrics is not None:
            if rows:
                self._metrics["rows"].inc(rows)
            if bad:
                self._metrics["bad"].inc(bad)

    def shard_done(self, shard: int, record: Mapping[str, Any]) -> None:
        """``shard`` is finished; ``record`` is its shard record (bytes per layer, seconds)."""
        self.shard_failed(shard)
        if self._metrics is not None:
            for layer, size in record["bytes"].items():
                self._metrics["bytes"].inc(size, tags={"layer": layer})
            self._metrics["shards"].inc()
            self._metrics["seconds"].observe(record["seconds"]["total"])

    def shard_failed(self, shard: int) -> None:
        """``shard`` stopped without a record: its rows are no longer in flight."""
        with self._lock:
            self._in_flight.pop(shard, None)

    def in_flight(self) -> dict[int, int]:
        """The samples done so far (rows and bad samples) of each shard still running."""
        with self._lock:
            return dict(self._in_flight)


class InFlightPoller:
    """The driver's side: asks the actors for their shards in flight without ever waiting.

    Each :meth:`poll` collects the answers that have arrived and, at most once per ``every``
    seconds, sends a new question to every live actor that has none outstanding; it returns the
    samples done of shards in flight. (The driver polls each time a shard ends, a dozen times a
    second on small shards: each question is a call the actor serves, on the cores that dump.)
    A question that failed leaves its actor and error in :attr:`failed` (an actor that died
    idle has no shard to say so), until the caller takes them.
    """

    def __init__(self, actors: Sequence[Any], every: float = 0.5):
        self.actors = actors
        self.every = every
        self._asked: dict[Any, int] = {}  # object ref -> actor index
        self._answers: dict[int, dict[int, int]] = {}  # actor index -> shard -> samples
        self._last_asked = -math.inf
        self.failed: dict[int, BaseException] = {}  # actor index -> why its last question failed

    def poll(self, alive: set[int], finished: Mapping[int, Any]) -> int:
        """Samples done of the shards that are neither finished nor on a dead actor."""
        import ray

        if self._asked:
            ready, _ = ray.wait(list(self._asked), num_returns=len(self._asked), timeout=0)
            for ref in ready:
                actor = self._asked.pop(ref)
                try:
                    self._answers[actor] = ray.get(ref)
                except Exception as exc:  # a dead actor: its shards go elsewhere
                    self._answers.pop(actor, None)
                    self.failed[actor] = exc
        now = time.monotonic()
        if now - self._last_asked >= self.every:
            self._last_asked = now
            waiting = set(self._asked.values())
            for actor in alive - waiting:
                # a question is not worth a retry: the next poll asks again
                self._asked[self.actors[actor].progress.options(max_task_retries=0).remote()] = actor
        return sum(samples for actor, shards in self._answers.items() if actor in alive
                   for shard, samples in shards.items() if shard not in finished)

    def close(self, timeout: float = 2.0) -> None:
        """Let the questions still out be answered (quickly: the actors only read a counter), so
        that the actors, killed next, are not killed in the middle of one."""
        import ray

        if self._asked:
            ray.wait(list(self._asked), num_returns=len(self._asked), timeout=timeout)
        self._asked.clear()
