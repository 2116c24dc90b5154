"""The Ray executor: one Ray actor per worker, each holding its model on its own GPU (or CPUs).

Retries are the driver's alone: Ray reruns no task (``max_task_retries=0``), so a shard is
tried exactly as often as the driver's queue says. An actor that dies is restarted by Ray (at
most ``run.max_attempts`` times, building its model again); the shards it had in flight come
back as lost and go back to the queue, and the actor takes shards again once it answers a ping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator

from ._executor import Outcome, Slots, WorkerSpec
from ._metrics import InFlightPoller
from ._scheduling import plan_actors
from ._shards import Shard

log = logging.getLogger(__name__)


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


def _is_actor_death(exc: BaseException) -> bool:
    import ray.exceptions as rex

    return isinstance(exc, (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError))


class RayExecutor:
    """Ray actors planned from the cluster's resources (``run.actors``, ``run.gpus_per_actor``,
    ``run.cpus_per_actor``), spread over its nodes."""

    def __init__(self, address: str | None = None):
        self.address = address
        self.workers = 0
        self._session = contextlib.ExitStack()
        self._actors: list = []
        self._slots = Slots(0)
        self._pending: dict = {}  # object ref -> (actor, shard)
        self._pings: dict = {}  # object ref -> actor that died and is expected back
        self._poller: InFlightPoller | None = None

    def start(self, workers: WorkerSpec, shards: int) -> None:
        self._session.enter_context(ray_session(self.address))
        import ray

        from ._worker import ShardWorker

        run = workers.config.run
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        plan = plan_actors(run, ray.cluster_resources(), shards, nodes)
        if run.gpus_per_actor == "auto" and not plan.gpus and (self.address or os.environ.get("RAY_ADDRESS")):
            log.warning("the cluster has no GPU now, so the actors run on CPUs; on an autoscaling "
                        "cluster set run.gpus_per_actor and run.actors to have GPU nodes started")
        remote = ray.remote(ShardWorker).options(
            # one more thread than shards at work answers the driver's progress questions
            num_cpus=plan.cpus, num_gpus=plan.gpus, scheduling_strategy="SPREAD",
            max_concurrency=plan.shards_per_actor + 1,
            # Ray reruns no task: the driver's queue counts every try. Each death costs the shards in
            # flight an attempt, so more restarts than attempts would only rebuild models for nothing
            max_restarts=run.max_attempts, max_task_retries=0)
        arguments = workers.arguments(decode_threads=max(1, int(plan.cpus)), shards_at_once=plan.shards_per_actor)
        self._actors = [remote.remote(**arguments) for _ in range(plan.count)]
        self.workers = plan.count
        self._slots = Slots(plan.count, per_worker=plan.shards_per_actor)
        self._poller = InFlightPoller(self._actors)
        log.info("starting %d actor(s) with %g CPU and %g GPU each", plan.count, plan.cpus, plan.gpus)
        # surface a failing start (a model that does not build there) as itself
        for info in ray.get([a.info.remote() for a in self._actors]):
            log.info("actor on %s (%s)", info["host"], info["device"])

    @property
    def free(self) -> int:
        return self._slots.free

    @property
    def busy(self) -> bool:
        return bool(self._pending or self._pings)

    def submit(self, shard: Shard) -> None:
        actor = self._slots.take()
        self._pending[self._actors[actor].run_shard.remote(dataclasses.asdict(shard))] = (actor, shard)

    def wait(self, timeout: float) -> list[Outcome]:
        import ray

        ready, _ = ray.wait([*self._pending, *self._pings], num_returns=1, timeout=timeout)
        outcomes = []
        for ref in ready:
            if ref in self._pings:
                self._answered(ref)
                continue
            actor, shard = self._pending.pop(ref)
            self._slots.release(actor)
            try:
                outcomes.append(Outcome(shard, ray.get(ref)))
            except Exception as exc:
                lost = _is_actor_death(exc)
                if lost and self._slots.lose(actor):
                    # Ray restarts it while it has restarts left: it takes shards again once it answers
                    log.warning("actor %d died (%s); waiting for it to come back", actor, type(exc).__name__)
                    self._pings[self._actors[actor].info.remote()] = actor
                outcomes.append(Outcome(shard, error=exc, lost_worker=lost))
        return outcomes

    def _answered(self, ref) -> None:
        import ray
        import ray.exceptions as rex

        actor = self._pings.pop(ref)
        try:
            ray.get(ref)
        except rex.ActorUnavailableError:  # still on its way back: ask again
            log.debug("actor %d is not back yet", actor)
            self._pings[self._actors[actor].info.remote()] = actor
        except Exception as exc:
            log.warning("actor %d is gone for good (%s); the others take its shards", actor, type(exc).__name__)
        else:
            log.info("actor %d is back", actor)
            self._slots.revive(actor)

    def in_flight(self, finished) -> int:
        return self._poller.poll(self._slots.alive, finished) if self._poller is not None else 0

    def close(self) -> None:
        import ray

        try:
            if self._poller is not None:
                self._poller.close()
            for ref in self._pending:  # best effort: the actors are killed right after
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
            for actor in self._actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
        finally:
            self._pending.clear()
            self._pings.clear()
            self._session.close()

