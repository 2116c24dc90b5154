"""The driver: validate, plan the shards, run them on a pool of Ray actors, summarise.

The driver never touches image data: it checks the config (one trial sample on its CPU),
writes the manifest, hands shards to the actors as they free up (faster actors take more),
retries the shards of an actor that died, and collects the small records the actors return.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import TextIO

from .config import Config
from .errors import BadSampleError, ShardFailedError
from .manifest import new_manifest, prepare_output
from ._records import BadSample, LayerSpec, ShardRecord
from ._report import bad_sample_lines, layer_lines, sorted_bad
from .progress import Progress, _duration
from .scheduling import ActorPlan, ShardQueue, plan_actors
from .shards import Shard, plan_shards
from .store import OutputStore
from .worker import ShardWorker

log = logging.getLogger(__name__)

#: Shards each actor works on at once (in threads; one forward at a time holds its device), so
#: the loading of one overlaps the forward and the writing of the other.
IN_FLIGHT = 2


@dataclasses.dataclass
class Summary:
    """What a run did: rows and bytes per layer, bad samples, time.

    ``layers`` holds each layer's stored ``{"shape", "dtype"}`` (``shape`` is ``None`` when
    every row has its own), ``bad`` one dict per bad sample (its index, id and reason, as
    ``BadSample.to_dict`` gives them).
    """

    output: str
    layers: dict[str, dict]
    samples: int
    rows: dict[str, int]
    bytes: dict[str, int]
    bad: list[dict]
    shards: int
    resumed: int
    actors: int
    seconds: float
    new_samples: int

    @classmethod
    def from_records(cls, records: Mapping[int, ShardRecord], *, output: str, layers: Mapping[str, LayerSpec],
                     samples: int, resumed: int, actors: int, seconds: float, new_samples: int) -> Summary:
        rows = {layer: sum(r.rows.get(layer, 0) for r in records.values()) for layer in layers}
        nbytes = {layer: sum(r.bytes.get(layer, 0) for r in records.values()) for layer in layers}
        bad = [b.to_dict() for b in sorted_bad(r.bad for r in records.values())]
        return cls(output, {k: v.to_dict() for k, v in layers.items()}, samples, rows, nbytes, bad,
                   len(records), resumed, actors, seconds, new_samples)

    def format(self) -> str:
        total = sum(self.bytes.values())
        rate = self.new_samples / self.seconds if self.seconds else 0.0
        lines = [f"actmap: {self.samples:,} samples, {len(self.layers)} layer(s) in {self.output}"]
        layers = {layer: LayerSpec.from_dict(info) for layer, info in self.layers.items()}
        lines += layer_lines(layers, self.rows, self.bytes, indent="  ")
        lines.append(f"  {self.shards} shards ({self.resumed} already done) on {self.actors} actor(s); "
                     f"{_duration(self.seconds)} wall, {rate:,.1f} samples/s, "
                     f"{total / max(self.seconds, 1e-9) / 1e6:,.1f} MB/s written")
        lines.append(f"  bad samples: {len(self.bad)}")
        lines += bad_sample_lines([BadSample.from_dict(b) for b in self.bad], limit=10, indent="    ",
                                  more=f"... `actmap inspect {self.output}` lists all {{all}}")
        first = next(iter(self.layers))
        lines.append(f"Read it back: pipeline.read_layer({self.output!r}, {first!r}) -> numpy array; "
                     f"`actmap inspect {self.output}` describes the dump")
        return "\n".join(lines)


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """Use the Ray that is already up (a Ray job, a test), or connect to ``address`` /
    ``RAY_ADDRESS``, or start a local Ray; shut down only what was started here."""
    import ray

    if ray.is_initialized():
        yield
        return
    kwargs: dict = {"logging_level": logging.WARNING}
    if not address and not os.environ.get("RAY_ADDRESS"):
        # a Ray of our own ("local": not whatever cluster `ray start` left running here); its
        # workers can import modules from the current folder, as the driver can
        address = "local"
        path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
        kwargs.update(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    ray.init(address=address, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def _start_actors(config: Config, plan: ActorPlan, digest: str, layers: dict[str, LayerSpec]) -> list:
    import ray

    remote = ray.remote(ShardWorker).options(
        num_cpus=plan.cpus, num_gpus=plan.gpus, scheduling_strategy="SPREAD", max_concurrency=IN_FLIGHT,
        # a dead actor restarts (building its model again) and Ray reruns its shards there;
        # a rerun shard overwrites its own files, so the output stays exactly-once
        max_restarts=config.run.max_attempts, max_task_retries=config.run.max_attempts)
    shapes = {layer: spec.shape for layer, spec in layers.items()} if config.shapes_fixed() else None
    actors = [remote.remote(config.to_dict(), digest, layer_shapes=shapes) for _ in range(plan.count)]
    log.info("starting %d actor(s) with %g CPU and %g GPU each", plan.count, plan.cpus, plan.gpus)
    # surface a failing start (a model that does not build there) as itself
    for info in ray.get([a.info.remote() for a in actors]):
        log.info("actor on %s (%s)", info["host"], info["device"])
    return actors


def _is_actor_death(exc: BaseException) -> bool:
    import ray.exceptions as rex

    return isinstance(exc, (rex.RayActorError, rex.ActorUnavailableError, rex.WorkerCrashedError,
                            rex.NodeDiedError, rex.ObjectLostError))


def _execute(actors: list, todo: list[Shard], config: Config, progress: Progress,
             records: dict[int, ShardRecord]) -> None:
    """Run ``todo`` on ``actors`` until every shard is done; raises when one cannot be."""
    import ray

    queue = ShardQueue(todo, config.run.max_attempts)
    pending: dict = {}  # object ref -> (actor index, shard)
    load = [0] * len(actors)
    alive = set(range(len(actors)))
    try:
        while not queue.idle:
            for a in sorted(alive, key=lambda i: load[i]):
                while load[a] < IN_FLIGHT and (shard := queue.take()) is not None:
                    ref = actors[a].run_shard.remote(dataclasses.asdict(shard))
                    pending[ref] = (a, shard)
                    load[a] += 1
            if not pending:
                raise ShardFailedError("every actor has died; the shards done so far are kept, "
                                       "rerun the same command to finish")
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
            for ref in ready:
                a, shard = pending.pop(ref)
                load[a] -= 1
                try:
                    record = ray.get(ref)
                except BadSampleError:
                    raise
                except Exception as exc:
                    if _is_actor_death(exc):
                        # Ray has used up the actor's restarts: the others take its shards
                        log.warning("actor %d is gone (%s); its shards go to the others", a,
                                    type(exc).__name__)
                        alive.discard(a)
                    else:
                        log.warning("shard %d failed: %s", shard.id, _last_line(exc))
                    queue.failed(shard, _last_line(exc))
                else:
                    queue.finished(shard)
                    records[shard.id] = record
                    progress.update(len(shard), record.total_bytes)
    finally:
        for ref in pending:  # best effort: the actors are killed right after
            with contextlib.suppress(Exception):
                ray.cancel(ref)


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def run(config: Config, *, address: str | None = None, overwrite: bool = False,
        stream: TextIO | None = sys.stderr) -> Summary:
    """Dump ``config``'s layers over its source into ``config.run.output``.

    Everything is checked before any work starts (model, layers, source, output folder, one
    trial sample); a rerun of the same config resumes; ``overwrite`` starts afresh.
    """
    started = time.monotonic()
    if config.run.shard_size < 4 * config.run.batch_size:
        log.warning("run.shard_size %d is under 4 batches of %d: every shard costs a file per layer, a "
                    "record and a round trip to the driver, so small shards mean many small files and "
                    "idle gaps; a few batches or more per shard is better", config.run.shard_size,
                    config.run.batch_size)
    probe = ShardWorker(config.to_dict(), device="cpu")
    try:
        layers = probe.probe()
        samples = len(probe.source)
        manifest = new_manifest(config, probe.identity, probe.source.identity(), samples)
    finally:
        probe.close()
    manifest["layer_info"] = {layer: spec.to_dict() for layer, spec in layers.items()}
    store = OutputStore(config.run.output)
    records = prepare_output(store, manifest, overwrite)
    resumed = len(records)
    todo = [s for s in plan_shards(samples, config.run.shard_size) if s.id not in records]
    new_samples = sum(len(s) for s in todo)
    actor_count = 0
    if todo:
        with ray_session(address):
            import ray

            plan = plan_actors(config.run, ray.cluster_resources(), len(todo))
            actor_count = plan.count
            if config.run.gpus_per_actor == "auto" and not plan.gpus and (address or os.environ.get("RAY_ADDRESS")):
                log.warning("the cluster has no GPU now, so the actors run on CPUs; on an autoscaling "
                            "cluster set run.gpus_per_actor and run.actors to have GPU nodes started")
            progress = Progress(new_samples, stream)
            actors = _start_actors(config, plan, probe.digest, layers)
            try:
                _execute(actors, todo, config, progress, records)
            finally:
                progress.close()
                for actor in actors:
                    ray.kill(actor)
    summary = Summary.from_records(records, output=store.location, layers=layers, samples=samples,
                                   resumed=resumed, actors=actor_count,
                                   seconds=time.monotonic() - started, new_samples=new_samples)
    return summary
