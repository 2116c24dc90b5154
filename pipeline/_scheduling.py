"""Pure scheduling logic: how many actors of what size (or local workers on which device), and
which shard goes where next.

>>> plan_actors(RunSpec(), {"CPU": 16.0, "GPU": 4.0}, shards=100)
ActorPlan(count=4, cpus=4.0, gpus=1.0)
>>> plan_actors(RunSpec(), {"CPU": 16.0, "GPU": 1.0}, shards=100)
ActorPlan(count=2, cpus=8.0, gpus=0.5)
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
import heapq
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence

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
        CPUs takes four, so that more files are encoded and written side by side. An actor of
        one CPU takes two as well: on local files a second shard costs nothing measurable, and
        on object storage it works while the other's reads wait on the store
        (``bench/bench_remote.py``, two actors of one CPU on two cores: two shards at once gave
        0.94x to 1.07x the rows/s of one on local Parquet files, 1.13x to 1.46x on S3 answering
        30 ms late).

        >>> [ActorPlan(1, cpus, gpus).shards_per_actor for cpus, gpus in [(1.0, 0.0), (2.0, 0.0), (1.0, 1.0), (16.0, 1.0)]]
        [2, 2, 2, 4]
        """
        return 4 if self.cpus >= 8 else 2


def _cpus_per_gpu(cluster: Mapping[str, float], nodes: Sequence[Mapping[str, float]] | None) -> float:
    """The CPUs that go with one GPU: the fewest of any GPU node (the whole cluster's ratio when
    the nodes are not known, one when there is no GPU)."""
    gpu_nodes = [n for n in nodes or () if n.get("GPU", 0) > 0]
    if gpu_nodes:
        return min(n.get("CPU", 0) / n["GPU"] for n in gpu_nodes)
    if float(cluster.get("GPU", 0)) <= 0:  # no GPU node (yet): one CPU
        return 1.0
    return float(cluster.get("CPU", 0)) / float(cluster["GPU"])


SHARE_GPU_CPUS = 16
"""CPUs per GPU from which two actors share each GPU (when the run's ``gpus_per_actor`` is ``auto``)."""


def actors_per_gpu(cpus_per_gpu: float) -> int:
    """The actors that share one GPU under ``run.gpus_per_actor: auto``: two where a GPU comes
    with at least :data:`SHARE_GPU_CPUS` CPUs, else one.

    A GPU actor's Python (its loaders, reading threads, forward launches and writers) shares
    one interpreter lock, and on a fast GPU that lock, not the device, sets the pace: on one
    H100 with 16 host cores, a folder of 500x375 JPEG files through ResNet-50 layer3 + layer4
    (pooled) ran at 2,891 images/s with one actor of 16 CPUs and 4,300 with two of 8 CPUs and
    half the GPU each (``bench/gpu_check.sh`` step 7). Each actor holds its own copy of the
    model on the GPU; set ``run.gpus_per_actor: 1`` where two would not fit.

    >>> actors_per_gpu(8.0), actors_per_gpu(16.0), actors_per_gpu(24.0)
    (1, 2, 2)
    """
    return 2 if cpus_per_gpu >= SHARE_GPU_CPUS else 1


def plan_actors(run: RunSpec, cluster: Mapping[str, float], shards: int,
                nodes: Sequence[Mapping[str, float]] | None = None) -> ActorPlan:
    """The actor pool for ``run`` on a cluster with ``cluster`` resources (``ray.cluster_resources()``).

    ``auto`` GPUs are a GPU's share (:func:`actors_per_gpu`) when the cluster has GPUs (a whole
    one when ``actors`` or ``cpus_per_actor`` is a number, or when there are too few shards to
    give every share one), else none. ``auto`` actors fill the
    GPUs with such shares, or, without GPUs, are as many actors of ``cpus_per_actor`` CPUs as
    the CPUs allow, but never more than there are CPUs (each actor holds its own copy of the
    model: a ``cpus_per_actor`` of 0.001 would otherwise start one per shard); never more actors
    than shards. ``auto`` CPUs give a GPU actor its share of its node's CPUs (they decode the
    images and encode the outputs, at the GPU's pace), and a CPU actor one. ``nodes`` are the
    alive nodes' resources.

    >>> plan_actors(RunSpec(cpus_per_actor=0.5), {"CPU": 2.0}, shards=500)
    ActorPlan(count=2, cpus=0.5, gpus=0.0)
    """
    total_gpus, total_cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 0))
    if run.gpus_per_actor != "auto":
        gpus = float(run.gpus_per_actor)
    elif total_gpus >= 1:
        per_gpu = actors_per_gpu(_cpus_per_gpu(cluster, nodes))
        # shares only where the shards fill them all: Ray packs fractions onto the fullest GPU
        shared = run.actors == "auto" and run.cpus_per_actor == "auto" and shards >= per_gpu * total_gpus
        gpus = 1.0 / per_gpu if shared else 1.0
    else:
        gpus = 0.0
    if gpus > total_gpus and run.actors == "auto":
        raise ConfigError(RunSpec.key("gpus_per_actor"), f"{gpus} GPUs per actor, but the cluster has "
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
        count = min(int(total_cpus // cpus), int(total_cpus))
    return ActorPlan(max(1, min(count, shards)), cpus, gpus)


def local_devices(run: RunSpec, visible_gpus: int, shards: int) -> list[str]:
    """The device of each worker of the local executor, on a machine where torch sees
    ``visible_gpus`` GPUs: the GPUs are handed out as Ray hands them to actors.

    ``gpus_per_actor`` ``auto`` is one GPU per worker when there is one, else the CPU; ``auto``
    workers are one per GPU share (one on the CPU). A fraction packs workers onto a GPU (0.5:
    two each); several GPUs give a worker the first of its own. More GPUs than the machine has,
    or GPUs on a machine without, are a :class:`ConfigError` naming the key, as on a Ray cluster.

    >>> local_devices(RunSpec(), visible_gpus=0, shards=10), local_devices(RunSpec(), visible_gpus=2, shards=10)
    (['cpu'], ['cuda:0', 'cuda:1'])
    >>> local_devices(RunSpec(actors=3, gpus_per_actor=0.5), visible_gpus=2, shards=10)
    ['cuda:0', 'cuda:0', 'cuda:1']
    >>> local_devices(RunSpec(gpus_per_actor=2), visible_gpus=4, shards=10)
    ['cuda:0', 'cuda:2']
    >>> local_devices(RunSpec(actors=3, gpus_per_actor=1), visible_gpus=2, shards=10)
    Traceback (most recent call last):
    ...
    pipeline.errors.ConfigError: run.actors: 3 workers of 1 GPU each, but this machine has 2 GPUs, room for 2 of them; set run.actors to at most 2 (or auto), or give each worker less
    """
    gpus = (1.0 if visible_gpus else 0.0) if run.gpus_per_actor == "auto" else float(run.gpus_per_actor)
    actors = None if run.actors == "auto" else int(run.actors)
    if gpus <= 0:
        return ["cpu"] * max(1, min(actors or 1, shards))
    key = RunSpec.key("gpus_per_actor")
    if gpus > 1 and not gpus.is_integer():
        raise ConfigError(key, f"{gpus:g} GPUs per worker: above 1, a worker takes whole GPUs; use "
                          f"{math.floor(gpus)} or {math.ceil(gpus)}, or a fraction below 1 to share a GPU")
    if gpus > visible_gpus:
        has = f"{visible_gpus}" if visible_gpus else "none that torch can use (torch.cuda.device_count() is 0)"
        raise ConfigError(key, f"{gpus:g} GPUs per worker, but this machine has {has}; use 0 to run on the CPU"
                          + (f", or at most {visible_gpus}" if visible_gpus else ""))
    per_gpu = math.floor(1 / gpus + 1e-9) if gpus < 1 else 0  # workers that share one GPU
    fits = visible_gpus * per_gpu if per_gpu else int(visible_gpus // gpus)
    count = max(1, min(actors or fits, shards))
    if count > fits:
        actors_key = RunSpec.key("actors")
        raise ConfigError(actors_key, f"{count} workers of {gpus:g} GPU each, but this machine has {visible_gpus} "
                          f"GPUs, room for {fits} of them; set {actors_key} to at most {fits} (or auto), or give "
                          "each worker less")
    return [f"cuda:{i // per_gpu if per_gpu else i * int(gpus)}" for i in range(count)]


def room(plan: ActorPlan, nodes: Sequence[Mapping[str, float]]) -> int:
    """How many actors of ``plan``'s size the ``nodes`` (their total resources) hold at most.

    >>> room(ActorPlan(3, 1.0, 0.0), [{"CPU": 2.0}])
    2
    >>> room(ActorPlan(4, 4.0, 1.0), [{"CPU": 16.0, "GPU": 2.0}, {"CPU": 2.0, "GPU": 1.0}, {"CPU": 64.0}])
    2
    """
    if plan.cpus <= 0 and plan.gpus <= 0:
        return plan.count
    fits = 0
    for node in nodes:
        per_resource = [node.get(kind, 0.0) / need for kind, need in (("CPU", plan.cpus), ("GPU", plan.gpus)) if need > 0]
        fits += math.floor(min(per_resource) + 1e-9)
    return fits


def unmet(plan: ActorPlan, nodes: Sequence[Mapping[str, float]]) -> ConfigError | None:
    """The error for a pool the ``nodes`` can never hold all of (``None``: they can), naming
    what the cluster has.

    >>> print(unmet(ActorPlan(3, 1.0, 0.0), [{"CPU": 2.0}]))
    run.actors: 3 actors of 1 CPU and 0 GPU each, but the cluster has 2 CPUs and 0 GPUs on 1 node(s), room for 2 of them; set run.actors to at most 2 (or auto), or give each actor less
    """
    fits = room(plan, nodes)
    if fits >= plan.count:
        return None
    cpus, gpus = (sum(n.get(kind, 0.0) for n in nodes) for kind in ("CPU", "GPU"))
    has = (f"{plan.count} actors of {plan.cpus:g} CPU and {plan.gpus:g} GPU each, but the cluster has "
           f"{cpus:g} CPUs and {gpus:g} GPUs on {len(nodes)} node(s)")
    if fits:
        key = RunSpec.key("actors")
        return ConfigError(key, f"{has}, room for {fits} of them; set {key} to at most {fits} (or auto), or give "
                           "each actor less")
    short = RunSpec.key("gpus_per_actor" if plan.gpus and all(n.get("GPU", 0.0) < plan.gpus for n in nodes)
                        else "cpus_per_actor")
    return ConfigError(short, f"{has}: no node holds one actor; lower {short}")


#: The longest a failed shard waits before it is tried again, in seconds.
MAX_RETRY_DELAY = 300.0


class ShardQueue:
    """The shards still to do, dealt out in lanes (a worker's places for a shard at once).

    The plan is cut into as many runs of consecutive shards as there are lanes, and each lane
    takes its own run's shards in order; a lane whose run is done takes the second half of the
    longest run left. A worker reading a shard that ends inside a Parquet row group keeps the
    read for the next shard, which is then the next one in its lane: dealt out in plain order,
    a worker's next shard lay about as many shards further on as there are lanes, and each
    read that many shards' rows to reach its start. A failed shard goes back to the front, for
    any lane, after ``retry_delay`` seconds, twice as long after each further failure (at most
    :data:`MAX_RETRY_DELAY`): storage that is away a while fails the shards in flight, which
    would use up their tries at once. Other shards are dealt out meanwhile. A shard that lost
    its worker, or whose error would come back as it was, is retried at once. Shards in ``done``
    (a resumed run's) are passed over.

    >>> from pipeline._shards import plan_shards
    >>> q = ShardQueue(plan_shards(8, 1), lanes=2)
    >>> [q.take(0).id, q.take(0).id, q.take(1).id, q.take(1).id, q.take(1).id, q.take(1).id]
    [0, 1, 4, 5, 6, 7]
    >>> [q.take(1).id, q.take(0).id, q.take(1)]  # lane 1 takes the second half of what lane 0 has left
    [3, 2, None]
    >>> q = ShardQueue([Shard(0, 0, 2), Shard(1, 2, 4)], max_attempts=2)
    >>> a = q.take(); q.failed(a, "actor died")  # the seconds it waits: none by default
    0.0
    >>> q.take() == a
    True
    >>> q.failed(a, "actor died again")
    Traceback (most recent call last):
    ...
    pipeline.errors.ShardFailedError: shard 0 (samples 0-2) failed 2 times; last error: actor died again

    With a delay, a failed shard waits while the others go on (``clock``: the time, in seconds):

    >>> now = [0.0]
    >>> q = ShardQueue([Shard(0, 0, 2), Shard(1, 2, 4)], retry_delay=10, clock=lambda: now[0])
    >>> a = q.take(); q.failed(a, "storage away")
    10.0
    >>> q.take().id, q.take(), q.retry_due()
    (1, None, 10.0)
    >>> now[0] = 10.0; q.take().id
    0
    """

    def __init__(self, plan: Sequence[Shard], lanes: int = 1, done: Collection[int] = frozenset(),
                 max_attempts: int = 3, retry_delay: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self._plan = plan
        self._done = done
        # lane i takes shards self._next[i] up to self._stop[i] (ids in the plan): O(lanes)
        # numbers, whatever the plan's size
        bounds = _cut(len(plan), max(1, lanes), done)
        self._next, self._stop = bounds[:-1], bounds[1:]
        # failed shards: (when due, the order they failed in, the shard), soonest first
        self._retry: list[tuple[float, int, Shard]] = []
        self._failures = 0
        self._running: set[int] = set()
        self.max_attempts = max_attempts
        self.retry_delay, self._clock = retry_delay, clock
        self.attempts: collections.Counter[int] = collections.Counter()
        self.done: list[int] = []

    def _skip_done(self, lane: int) -> bool:
        """Pass over the done shards at the head of ``lane``'s run; whether a shard is left in it."""
        while self._next[lane] < self._stop[lane] and self._next[lane] in self._done:
            self._next[lane] += 1
        return self._next[lane] < self._stop[lane]

    def _steal(self, lane: int) -> bool:
        """Give ``lane`` the second half of the longest run left; whether there was one."""
        longest = max(range(len(self._next)), key=lambda i: self._stop[i] - self._next[i])
        left = self._stop[longest] - self._next[longest]
        if left <= 0:
            return False
        middle = self._next[longest] + left // 2
        self._next[lane], self._stop[lane] = middle, self._stop[longest]
        self._stop[longest] = middle
        return True

    def take(self, lane: int = 0) -> Shard | None:
        """The next shard for ``lane`` to start, or ``None`` when nothing waits."""
        if self._retry and self._retry[0][0] <= self._clock():
            shard = heapq.heappop(self._retry)[2]
        else:
            while not self._skip_done(lane):
                if not self._steal(lane):
                    return None
            shard = self._plan[self._next[lane]]
            self._next[lane] += 1
        self._running.add(shard.id)
        self.attempts[shard.id] += 1
        return shard

    def finished(self, shard: Shard) -> None:
        self._running.discard(shard.id)
        self.done.append(shard.id)

    def failed(self, shard: Shard, error: object, cause: BaseException | None = None, wait: bool = True) -> float:
        """Put ``shard`` back to retry; the seconds before it is due again (none without
        ``wait``: it lost its worker, or its error comes back as it was at every try).
        ``ShardFailedError`` once it has failed ``max_attempts`` times (``cause``: the error it
        failed with)."""
        self._running.discard(shard.id)
        tries = self.attempts[shard.id]
        if tries >= self.max_attempts:
            raise ShardFailedError(f"shard {shard.id} (samples {shard.start}-{shard.stop}) failed "
                                   f"{tries} time{'s' if tries > 1 else ''}; last error: {error}", cause)
        delay = min(MAX_RETRY_DELAY, self.retry_delay * 2.0 ** min(tries - 1, 32)) if wait else 0.0
        self._failures += 1
        # the shards due at once go in the order they failed, the latest first
        heapq.heappush(self._retry, (self._clock() + delay, -self._failures, shard))
        return delay

    def returned(self, shard: Shard) -> None:
        """``shard`` never reached a worker (the one it was given to was dead): it is due again
        at once, and its try does not count.

        >>> q = ShardQueue([Shard(0, 0, 2)], max_attempts=1)
        >>> a = q.take(); q.returned(a); q.take() == a, q.attempts[0]
        (True, 1)
        """
        self._running.discard(shard.id)
        self.attempts[shard.id] -= 1
        self._failures += 1
        heapq.heappush(self._retry, (self._clock(), -self._failures, shard))

    @property
    def waiting(self) -> int:
        """How many failed shards wait for their next try."""
        return len(self._retry)

    def retry_due(self) -> float | None:
        """When the first shard waiting to be retried is due (``clock``'s time), or ``None``."""
        return self._retry[0][0] if self._retry else None

    @property
    def idle(self) -> bool:
        """Whether every shard is done."""
        return (not self._retry and not self._running
                and not any(self._skip_done(lane) for lane in range(len(self._next))))


def _cut(count: int, lanes: int, done: Collection[int]) -> list[int]:
    """Where ``lanes`` runs of about as many shards still to do each start, in a plan of
    ``count`` shards (``done``: those to pass over), and where the last one stops.

    >>> _cut(10, 3, ()), _cut(10, 3, {0, 1, 2, 3}), _cut(2, 4, ())
    ([0, 3, 6, 10], [0, 6, 8, 10], [0, 0, 1, 1, 2])
    """
    if not done:
        return [count * k // lanes for k in range(lanes + 1)]
    todo = count - sum(1 for i in done if 0 <= i < count)
    bounds, seen = [0], 0
    for i in range(count):
        while len(bounds) < lanes and seen >= todo * len(bounds) // lanes:
            bounds.append(i)
        seen += i not in done
    return bounds + [count] * (lanes + 1 - len(bounds))
