"""Pure scheduling logic: how many actors of what size, and which shard goes where next.

>>> plan_actors(RunSpec(), {"CPU": 16.0, "GPU": 4.0}, shards=100)
ActorPlan(count=4, cpus=4.0, gpus=1.0)
>>> plan_actors(RunSpec(), {"CPU": 2.0}, shards=100)
ActorPlan(count=2, cpus=1.0, gpus=0.0)
>>> plan_actors(RunSpec(cpus_per_actor=2), {"CPU": 8.0}, shards=100)
ActorPlan(count=4, cpus=2.0, gpus=0.0)
>>> plan_actors(RunSpec(actors=3, gpus_per_actor=0.5), {"CPU": 8.0, "GPU": 2.0}, shards=2)
ActorPlan(count=2, cpus=2.0, gpus=0.5)
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from ._shards import Shard
from .config import RunSpec
from .errors import ConfigError, ShardFailedError


@dataclasses.dataclass(frozen=True)
class ActorPlan:
    """``count`` actors, each with ``cpus`` CPUs and ``gpus`` GPUs."""

    count: int
    cpus: float
    gpus: float

    @property
    def shards_per_actor(self) -> int:
        """Shards an actor works on at once (in threads; one forward at a time holds its device):
        two overlap one shard's loading with another's forward and writing; an actor with many
        CPUs takes four, so that more files are encoded and written side by side.

        >>> ActorPlan(1, 1.0, 0.0).shards_per_actor, ActorPlan(1, 16.0, 1.0).shards_per_actor
        (2, 4)
        """
        return 4 if self.cpus >= 8 else 2


def _cpus_per_gpu(cluster: Mapping[str, float], nodes: Sequence[Mapping[str, float]] | None) -> float:
    """The CPUs that go with one GPU: the fewest of any GPU node (the whole cluster's ratio when
    the nodes are not known)."""
    gpu_nodes = [n for n in nodes or () if n.get("GPU", 0) > 0]
    if gpu_nodes:
        return min(n.get("CPU", 0) / n["GPU"] for n in gpu_nodes)
    return float(cluster.get("CPU", 0)) / max(float(cluster.get("GPU", 0)), 1e-9)


def plan_actors(run: RunSpec, cluster: Mapping[str, float], shards: int,
                nodes: Sequence[Mapping[str, float]] | None = None) -> ActorPlan:
    """The actor pool for ``run`` on a cluster with ``cluster`` resources (``ray.cluster_resources()``).

    ``auto`` actors means one actor per GPU when the cluster has GPUs, else as many actors of
    ``cpus_per_actor`` CPUs as the CPUs allow; never more actors than shards. ``auto`` CPUs give
    a GPU actor its share of its node's CPUs (they decode the images and encode the outputs, at
    the GPU's pace), and a CPU actor one. ``nodes`` are the alive nodes' resources.
    """
    total_gpus, total_cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 0))
    gpus = (1.0 if total_gpus >= 1 else 0.0) if run.gpus_per_actor == "auto" else float(run.gpus_per_actor)
    if gpus > total_gpus and run.actors == "auto":
        raise ConfigError("run.gpus_per_actor", f"{gpus} GPUs per actor, but the cluster has "
                          f"{total_gpus:g}; use 0 to run on the CPU")
    if run.cpus_per_actor != "auto":
        cpus = float(run.cpus_per_actor)
    elif gpus > 0:
        cpus = max(1.0, float(int(_cpus_per_gpu(cluster, nodes) * gpus)))
    else:
        cpus = 1.0
    if run.actors != "auto":
        count = int(run.actors)
    elif gpus > 0:
        count = int(total_gpus // gpus)
    else:
        count = int(total_cpus // cpus) if cpus else 1
    return ActorPlan(max(1, min(count, shards)), cpus, gpus)


class ShardQueue:
    """The shards still to do, handed out in order; a failed shard goes back to the front.

    >>> q = ShardQueue([Shard(0, 0, 2), Shard(1, 2, 4)], max_attempts=2)
    >>> a = q.take(); q.failed(a, "actor died"); q.take() == a
    True
    >>> q.failed(a, "actor died again")
    Traceback (most recent call last):
    ...
    pipeline.errors.ShardFailedError: shard 0 (samples 0-2) failed 2 times; last error: actor died again
    """

    def __init__(self, shards: Iterable[Shard], max_attempts: int = 3):
        self._todo = collections.deque(shards)
        self._running: set[int] = set()
        self.max_attempts = max_attempts
        self.attempts: collections.Counter[int] = collections.Counter()
        self.done: list[int] = []

    def take(self) -> Shard | None:
        """The next shard to start, or ``None`` when nothing waits."""
        if not self._todo:
            return None
        shard = self._todo.popleft()
        self._running.add(shard.id)
        self.attempts[shard.id] += 1
        return shard

    def finished(self, shard: Shard) -> None:
        self._running.discard(shard.id)
        self.done.append(shard.id)

    def failed(self, shard: Shard, error: object) -> None:
        """Put ``shard`` back to retry; ``ShardFailedError`` once it has failed ``max_attempts`` times."""
        self._running.discard(shard.id)
        if self.attempts[shard.id] >= self.max_attempts:
            raise ShardFailedError(f"shard {shard.id} (samples {shard.start}-{shard.stop}) failed "
                                   f"{self.attempts[shard.id]} times; last error: {error}")
        self._todo.appendleft(shard)

    @property
    def idle(self) -> bool:
        """Whether every shard is done."""
        return not self._todo and not self._running
