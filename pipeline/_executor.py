"""The executor seam: what runs the shards, apart from what decides which shard runs when.

The driver plans the shards and owns their retries (one attempt budget, ``run.max_attempts``);
an executor starts workers, takes shards while it has room (``free``), and reports each shard
that ended as an :class:`Outcome`. Two executors: :class:`LocalExecutor` here (the
``ShardWorker`` s in threads of this process, no Ray: for small jobs and tests) and
``pipeline._ray_executor.RayExecutor`` (Ray actors, on a laptop or a cluster).

Each worker has a lane per shard it runs at once; the driver's queue gives every lane a run of
consecutive shards of its own (:class:`~pipeline._scheduling.ShardQueue`). Lane ``l`` is worker
``l // per_worker``'s, and the next shard goes to a free lane of the least loaded worker:

>>> slots = Slots(workers=2, per_worker=2)
>>> [slots.take() for _ in range(slots.free)]
[0, 2, 1, 3]
>>> slots.release(3); slots.lose(0)
True
>>> slots.free, slots.next, slots.worker(slots.take())
(1, 3, 1)
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any, Protocol

from ._records import LayerSpec, ShardRecord
from ._scheduling import local_devices
from ._shards import Shard
from .config import Config, RunSpec

log = logging.getLogger(__name__)

#: Shards each worker works on at once (in threads; one forward at a time holds its device), so
#: the loading of one overlaps the forward and the writing of the other.
IN_FLIGHT = 2


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What every worker is built from: the run's config, the weights digest the driver's model
    has (a worker whose model differs refuses to start), each layer's shape when shapes are
    fixed (every batch must keep it), and the label columns where the source types them from
    its items (``label_types``: the driver's, so that every worker writes the same columns).
    The layers' layouts go with them too: every worker reduces a layer's maps alike."""

    config: Config
    digest: str
    layers: Mapping[str, LayerSpec]
    frozen_source: bool = False
    label_types: Mapping[str, Any] | None = None

    def arguments(self, decode_threads: int = 1, shards_at_once: int = IN_FLIGHT) -> dict[str, Any]:
        """The ``ShardWorker`` arguments (plain data, to ship to another process), for a worker
        with ``decode_threads`` threads that decode images and ``shards_at_once`` shards at work."""
        shapes = ({layer: list(spec.shape) for layer, spec in self.layers.items()}
                  if self.config.shapes_fixed() else None)
        layouts = {layer: spec.layout for layer, spec in self.layers.items() if spec.layout is not None}
        return {"config": self.config.to_dict(), "expected_digest": self.digest, "layer_shapes": shapes,
                "frozen_source": self.frozen_source, "decode_threads": decode_threads,
                "shards_at_once": shards_at_once, "label_types": self.label_types, "layer_layouts": layouts}


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one try at a shard ended: its record, or the error; ``lost_worker`` when the worker
    running it died (its other shards in flight end the same way); not ``started`` when the
    worker it was given to was found dead before it got it (the try does not count)."""

    shard: Shard
    record: ShardRecord | None = None
    error: BaseException | None = None
    lost_worker: bool = False
    started: bool = True


class Executor(Protocol):
    """Runs shards on workers it starts and stops."""

    #: how many workers came up (``start`` starts them; on a Ray cluster some may come up later)
    workers: int
    #: whether ``connect`` waits long enough (seconds: a local Ray starts its processes) to be
    #: worth overlapping with the driver's trial sample
    slow_to_connect: bool

    def connect(self) -> None:
        """Reach the cluster the workers will run on (a local Ray starts here, in seconds);
        ``check`` and ``start`` connect if this was not called. The driver calls it while its
        trial sample runs."""

    def check(self, config: Config, shards: int) -> None:
        """Check, starting nothing, that the workers ``config`` asks for can run for ``shards``
        shards (a Ray cluster that can never hold them: :class:`~pipeline.errors.ConfigError`)."""

    def start(self, workers: WorkerSpec, shards: int) -> None:
        """Start the workers (never more than there are ``shards``); raises if none can start."""

    @property
    def pending(self) -> int:
        """Workers asked for that have not come up yet (a cluster still scaling up)."""

    @property
    def lanes(self) -> int:
        """Places for a shard at once, over all the workers it started (or is starting)."""

    @property
    def free(self) -> int:
        """How many more shards it takes now."""

    @property
    def lane(self) -> int:
        """The lane the next :meth:`submit` fills (only while ``free``)."""

    @property
    def busy(self) -> bool:
        """Whether a shard is in flight, or a worker on its way back (so ``wait`` will report)."""

    def submit(self, shard: Shard) -> None:
        """Start ``shard`` in :attr:`lane`, on the least loaded worker (only while ``free``)."""

    def wait(self, timeout: float) -> list[Outcome]:
        """The shards that ended since the last call, waiting up to ``timeout`` s for one."""

    def in_flight(self, finished: Mapping[int, Any]) -> int:
        """Samples done so far of the shards still running (not in ``finished``), as last heard."""

    def close(self) -> set[int]:
        """Stop the workers; shards still in flight are given up (rerun to redo them), their files
        dropped. Returns the shards that may still be writing (a worker killed with them, or out
        of reach): their temporary files are not to be deleted yet."""


class Slots:
    """Which lane takes the next shard: a free lane of the least loaded of the workers alive,
    each with ``per_worker`` lanes (shards at once)."""

    def __init__(self, workers: int, per_worker: int = IN_FLIGHT):
        self.per_worker = per_worker
        self.lanes = workers * per_worker
        self.alive = set(range(workers))
        self._free = [list(range(w * per_worker, (w + 1) * per_worker)) for w in range(workers)]

    def worker(self, lane: int) -> int:
        return lane // self.per_worker

    @property
    def free(self) -> int:
        return sum(len(self._free[worker]) for worker in self.alive)

    @property
    def next(self) -> int:
        """The lane :meth:`take` fills next (``free`` must be positive)."""
        return self._free[max(sorted(self.alive), key=lambda worker: len(self._free[worker]))][0]

    def take(self) -> int:
        lane = self.next
        self._free[self.worker(lane)].remove(lane)
        return lane

    def release(self, lane: int) -> None:
        bisect.insort(self._free[self.worker(lane)], lane)

    def lose(self, worker: int) -> bool:
        """Take no more shards to ``worker``; whether it was alive until now."""
        alive = worker in self.alive
        self.alive.discard(worker)
        return alive

    def revive(self, worker: int) -> None:
        self.alive.add(worker)


class SlottedLanes:
    """An executor's lanes, as its :class:`Slots` (``self._slots``) deal them out."""

    _slots: Slots

    @property
    def lanes(self) -> int:
        return self._slots.lanes

    @property
    def free(self) -> int:
        return self._slots.free

    @property
    def lane(self) -> int:
        return self._slots.next


class LocalExecutor(SlottedLanes):
    """Workers in threads of this process, each running up to :data:`IN_FLIGHT` shards at once:
    ``run.actors`` of them, on this machine's GPUs as ``run.gpus_per_actor`` asks (worker ``i``
    on GPU ``i``, or several on one GPU for a fraction: :func:`~pipeline._scheduling.local_devices`),
    or on its CPU. ``auto`` workers: one per GPU, one on the CPU.

    No Ray is started or imported: a small job skips Ray's start-up, and tests run in
    milliseconds. A worker cannot die without the process, so every error is the shard's.

    Args:
        visible_gpus: the GPUs to place workers on (default: those torch sees).
    """

    def __init__(self, visible_gpus: int | None = None):
        self.visible_gpus = visible_gpus
        self.workers = 0
        self._devices: list[str] | None = None
        self._workers: list = []
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._slots = Slots(0)
        self._pending: dict[concurrent.futures.Future, tuple[int, Shard]] = {}

    slow_to_connect = False

    def connect(self) -> None:
        pass  # the workers are threads of this process

    def check(self, config: Config, shards: int) -> None:
        """Place the workers on devices; GPUs asked for that this machine does not have are a
        :class:`~pipeline.errors.ConfigError` (threads of this process always start)."""
        if self.visible_gpus is None:
            import torch

            self.visible_gpus = torch.cuda.device_count()
        self._devices = local_devices(config.run, self.visible_gpus, shards)

    @property
    def pending(self) -> int:
        return 0

    def start(self, workers: WorkerSpec, shards: int) -> None:
        from ._worker import ShardWorker

        run = workers.config.run
        if self._devices is None:
            self.check(workers.config, shards)
        count = len(self._devices)
        cores, on_cpu = os.cpu_count() or 1, self._devices.count("cpu")
        if on_cpu > cores:
            log.warning("%s: %d workers on the CPU of a machine of %d cores: each holds a copy of the model in this "
                        "process, and they share the cores; %d do as much", RunSpec.key("actors"), on_cpu, cores, cores)
        # this machine's cores shared by the workers, unless the config says how many each has
        cpus = run.cpus_per_actor if run.cpus_per_actor != "auto" else (os.cpu_count() or 1) / count
        for device in self._devices:
            self._workers.append(ShardWorker(**workers.arguments(decode_threads=max(1, int(cpus))), device=device))
        self.workers = count
        self._slots = Slots(count)
        self._threads = concurrent.futures.ThreadPoolExecutor(count * IN_FLIGHT, thread_name_prefix="actmap-shard")
        log.info("started %d local worker(s) on %s", count, ", ".join(self._devices))

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    def submit(self, shard: Shard) -> None:
        lane = self._slots.take()
        worker = self._workers[self._slots.worker(lane)]
        self._pending[self._threads.submit(worker.run_shard, shard)] = (lane, shard)

    def wait(self, timeout: float) -> list[Outcome]:
        done, _ = concurrent.futures.wait(self._pending, timeout, concurrent.futures.FIRST_COMPLETED)
        outcomes = []
        for future in done:
            lane, shard = self._pending.pop(future)
            self._slots.release(lane)
            error = future.exception()
            outcomes.append(Outcome(shard, None if error else future.result(), error))
        return outcomes

    def in_flight(self, finished: Mapping[int, Any]) -> int:
        return sum(samples for worker in self._workers for shard, samples in worker.progress().items()
                   if shard not in finished)

    def close(self) -> set[int]:
        for worker in self._workers:
            worker.stop()  # shards in flight end at their next batch, their files dropped
        if self._threads is not None:
            self._threads.shutdown(wait=True)
        for worker in self._workers:
            worker.close()
        self._pending.clear()
        return set()
