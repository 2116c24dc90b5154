"""The Ray executor: one Ray actor per worker, each holding its model on its own GPU (or CPUs).

Retries are the driver's alone: Ray reruns no task (``max_task_retries=0``), so a shard is
tried exactly as often as the driver's queue says. An actor that dies is restarted by Ray (at
most ``run.max_attempts`` times, building its model again); the shards it had in flight come
back as lost and go back to the queue, and the actor takes shards again once it answers a ping.
An actor that dies between shards is found by the progress questions the driver asks every
live actor twice a second, and an idle actor is asked once more before it is handed a shard: a
retry waiting its turn goes to an actor that answers (or, with none left, back to the queue,
its try not counted).

A pool the cluster can never hold is refused before anything starts, naming what the cluster
has. The work starts when every actor is up, or, when some are not up a while after the first
(a cluster busy with other work, or an autoscaler adding nodes), on those that are: the others
join as they come up, and the progress line counts them as pending. A run whose actors none
comes up within ``run.start_timeout`` seconds stops, saying why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

from ._executor import Outcome, Slots, WorkerSpec, SlottedLanes
from ._metrics import InFlightPoller
from ._scheduling import ActorPlan, plan_actors, unmet
from ._shards import Shard
from .config import Config, RunSpec
from .errors import ConfigError, WorkersUnavailableError

log = logging.getLogger(__name__)

#: Seconds the other actors get to come up after the first one did, beyond the time it took.
STRAGGLERS = 5.0

#: Seconds an idle actor is given to answer before it is handed a shard (a live one answers in
#: milliseconds; one Ray is restarting fails a shard sent to it, so it gets none until it answers).
IDLE_PING_WAIT = 0.5


def local_ray_environment() -> dict[str, str]:
    """What the processes of a local Ray started here inherit: one malloc arena per CPU this
    process may use, at least two.

    glibc's malloc gives each thread that allocates an arena of its own (up to 8 per core), and
    each arena keeps the most it ever held, so an actor's peak memory grew with the shards it had
    run; with fewer arenas it grows less (bench/README.md, "malloc arenas"). glibc reads the
    variable when a process starts (setting it in a running actor does nothing), so a cluster's
    nodes set it where Ray starts (cluster.yaml).
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"MALLOC_ARENA_MAX": str(max(2, cpus or 2))}


@contextlib.contextmanager
def inherited(environment: dict[str, str]) -> Iterator[None]:
    """Adds to ``os.environ``, for the block, the variables of ``environment`` that it lacks
    (processes started in the block inherit them); removes them after.

    >>> with inherited({"ACTMAP_EXAMPLE": "1"}):
    ...     os.environ["ACTMAP_EXAMPLE"]
    '1'
    >>> "ACTMAP_EXAMPLE" in os.environ
    False
    """
    added = [name for name in environment if name not in os.environ]
    os.environ.update({name: environment[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[bool]:
    """Use the Ray that is already up (a Ray job, a test), or connect to ``address`` /
    ``RAY_ADDRESS``, or start a local Ray; shut down only what was started here. Yields whether
    the Ray was started here (a local one, which no autoscaler grows)."""
    import ray

    if ray.is_initialized():
        yield False
        return
    kwargs: dict = {"logging_level": logging.WARNING}
    named_by = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    _check_answers(address, named_by)
    if address == "local":
        # a Ray of our own ("local": not whatever cluster `ray start` left running here). Its
        # workers import modules from the current folder, as the driver does (Ray puts it on
        # their path), and from PYTHONPATH (they inherit this process's environment). No
        # runtime_env: one kept the workers Ray starts ahead from serving the actors, whose
        # start took 0.6-0.9 s longer on 2 cores.
        kwargs.update(include_dashboard=False)
    # ray.init puts a SIGTERM handler of its own in the driver: one the caller set (the CLI's,
    # which stops a run as Ctrl-C does) is put back
    before = signal.getsignal(signal.SIGTERM)
    # in this whole process's environment for the seconds ray.init takes (the trial sample may
    # run meanwhile, on another thread), as the variables ray.init itself sets are
    try:
        with inherited(local_ray_environment() if address == "local" else {}):
            ray.init(address=address, **kwargs)
    finally:
        if callable(before) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, before)
    try:
        yield address == "local"
    finally:
        ray.shutdown()


#: How long a Ray address has to answer a connection.
CONNECT_TIMEOUT = 10.0


def _check_answers(address: str, named_by: str) -> None:
    """A Ray cluster address (``host:port``, ``ray://host:port``) at which nothing answers a
    connection within :data:`CONNECT_TIMEOUT`: a :class:`ConfigError` naming it, before any
    work (``ray.init`` would retry for minutes with only Ray's own log lines). Other forms
    (``local``, ``auto``) are Ray's to judge.

    >>> _check_answers("127.0.0.1:1", "--address")
    Traceback (most recent call last):
    ...
    pipeline.errors.ConfigError: --address: nothing answers at '127.0.0.1:1' (ConnectionRefusedError: [Errno 111] Connection refused); give the head node's address, host:6379 (the port `ray start --head` printed), or ray://host:10001 for Ray Client, or leave it out for a local Ray
    """
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if "://" in host or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        why = "no answer within %g s" % CONNECT_TIMEOUT if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        raise ConfigError(named_by, f"nothing answers at {address!r} ({why}); give the head node's address, host:6379 "
                                    "(the port `ray start --head` printed), or ray://host:10001 for Ray Client, or "
                                    "leave it out for a local Ray") from None


def autoscaling() -> bool:
    """Whether an autoscaler may add nodes to the cluster Ray is connected to.

    Ray's monitor runs a read-only autoscaler on a cluster started without an autoscaling
    config: it reports each node as an anonymous node type of its own. A cluster whose report
    says so cannot grow; any other (a launcher's config, autoscaler v2, no report yet) may.
    """
    try:
        from ray.autoscaler._private.util import format_readonly_node_type
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        from ray.experimental.internal_kv import _internal_kv_get

        if is_autoscaler_v2(fetch_from_server=True):
            return True
        status = _internal_kv_get("__autoscaling_status")  # ray_constants.DEBUG_AUTOSCALING_STATUS
        mapping = json.loads(status)["autoscaler_report"]["node_type_mapping"] if status else None
    except Exception:  # an older or newer Ray that reports otherwise: assume it may grow
        log.debug("no autoscaler status", exc_info=True)
        return True
    return not (isinstance(mapping, dict) and mapping
                and all(v == format_readonly_node_type(k) for k, v in mapping.items()))


def _is_actor_death(exc: BaseException) -> bool:
    import ray.exceptions as rex

    return isinstance(exc, (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError))


class RayExecutor(SlottedLanes):
    """Ray actors planned from the cluster's resources (``run.actors``, ``run.gpus_per_actor``,
    ``run.cpus_per_actor``), spread over its nodes."""

    slow_to_connect = True

    def __init__(self, address: str | None = None):
        self.address = address
        self.workers = 0  # actors that came up (at least once)
        self._session = contextlib.ExitStack()
        self._started_here = False
        self._plan: ActorPlan | None = None
        self._actors: list = []
        self._slots = Slots(0)
        self._pending: dict = {}  # object ref -> (lane, shard)
        self._returned: list[Outcome] = []  # shards whose actor was found dead before they were sent
        self._pings: dict = {}  # object ref -> actor not up yet, or dead and expected back
        # shard -> its actor, out of reach when it ran it: the shard may still be writing until the
        # actor is back (Ray restarts an actor once its process is gone)
        self._unreachable: dict[int, int] = {}
        self._starting: set[int] = set()  # actors that never came up yet
        self._timeout = 0.0
        self._grace = RunSpec.stop_grace  # the default, until ``start`` reads the run's
        self._none_since: float | None = None  # since when no actor is up (all pending, or dead)
        self._poller: InFlightPoller | None = None

    def connect(self) -> None:
        if not self._session._exit_callbacks:
            self._started_here = self._session.enter_context(ray_session(self.address))

    def check(self, config: Config, shards: int) -> None:
        """Connect to Ray and plan the actors; a pool the cluster can never hold (and no
        autoscaler can grow it) is a :class:`~pipeline.errors.ConfigError` naming what it has."""
        import ray

        self.connect()
        run = config.run
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        plan = plan_actors(run, ray.cluster_resources(), shards, nodes)
        if run.gpus_per_actor == "auto" and not plan.gpus and (self.address or os.environ.get("RAY_ADDRESS")):
            log.warning("the cluster has no GPU now, so the actors run on CPUs; on an autoscaling cluster set "
                        "%s and %s to have GPU nodes started", RunSpec.key("gpus_per_actor"), RunSpec.key("actors"))
        error = unmet(plan, nodes)
        if error is not None:
            if self._started_here or not autoscaling():
                raise error
            log.warning("%s; the autoscaler may add nodes: the work starts on the actors that come up", error)
        self._plan = plan

    def start(self, workers: WorkerSpec, shards: int) -> None:
        import ray

        from ._worker import ShardWorker

        run = workers.config.run
        if self._plan is None:
            self.check(workers.config, shards)
        plan = self._plan
        remote = ray.remote(ShardWorker).options(
            # one more thread than shards at work answers the driver's progress questions
            num_cpus=plan.cpus, num_gpus=plan.gpus, scheduling_strategy="SPREAD",
            max_concurrency=plan.shards_per_actor + 1,
            # Ray reruns no task: the driver's queue counts every try. Each death costs the shards in
            # flight an attempt, so more restarts than attempts would only rebuild models for nothing
            max_restarts=run.max_attempts, max_task_retries=0)
        arguments = workers.arguments(decode_threads=max(1, int(plan.cpus)), shards_at_once=plan.shards_per_actor)
        # each actor has its process to itself: its heap is settled once it is built
        self._actors = [remote.remote(**arguments, own_process=True) for _ in range(plan.count)]
        self._slots = Slots(plan.count, per_worker=plan.shards_per_actor)
        self._poller = InFlightPoller(self._actors)
        log.info("starting %d actor(s) with %g CPU and %g GPU each", plan.count, plan.cpus, plan.gpus)
        for actor in range(plan.count):  # none takes shards before it answers
            self._slots.lose(actor)
            self._starting.add(actor)
            self._pings[self._actors[actor].info.remote()] = actor
        self._timeout = run.start_timeout
        self._grace = run.stop_grace
        began = time.monotonic()
        deadline = began + run.start_timeout
        while self._starting:
            ready, _ = ray.wait(list(self._pings), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready and not self._slots.alive:
                raise WorkersUnavailableError(self._none_up(plan, run.start_timeout))
            if ready:
                first = not self._slots.alive
                self._answered(ready[0], first=first)
                if first and self._slots.alive:  # the others get as long again (they build the same model)
                    deadline = min(deadline, time.monotonic() + STRAGGLERS + (time.monotonic() - began))
            if time.monotonic() >= deadline:  # the rest wait for room, or for nodes: they join when up
                log.warning("%d of %d actors are up; the work starts, the others join as they come up",
                            plan.count - len(self._starting), plan.count)
                break

    def _none_up(self, plan: ActorPlan, timeout: float) -> str:
        import ray

        free, total = ray.available_resources(), ray.cluster_resources()
        has = ", ".join(f"{free.get(k, 0.0):g} of {total.get(k, 0.0):g} {k}s" for k in ("CPU", "GPU"))
        return (f"no actor came up within {timeout:g} s ({RunSpec.key('start_timeout')}): each needs "
                f"{plan.cpus:g} CPU and {plan.gpus:g} GPU, and the cluster has {has} free now"
                + (", and its autoscaler added no node that fits" if not self._started_here and autoscaling() else ""))

    @property
    def pending(self) -> int:
        return len(self._starting)

    @property
    def busy(self) -> bool:
        return bool(self._pending or self._pings or self._returned)

    def submit(self, shard: Shard) -> None:
        while self._slots.free:
            lane = self._slots.take()
            actor = self._slots.worker(lane)
            if self._answers(actor):
                self._pending[self._actors[actor].run_shard.remote(dataclasses.asdict(shard))] = (lane, shard)
                return
            self._slots.release(lane)  # (its actor takes none until it answers its ping)
        # no actor left to take it: back to the driver's queue, its try not counted
        self._returned.append(Outcome(shard, error=RuntimeError("no actor answered"), lost_worker=True,
                                      started=False))

    def _answers(self, actor: int) -> bool:
        """Whether ``actor`` may be handed a shard: it has shards in flight, or, idle, it answers
        a ping now (it may have died since the last progress question it answered: a retry after
        its wait). One that died, or that does not answer within :data:`IDLE_PING_WAIT` (Ray
        restarting it: a shard sent now would fail), takes none until its ping is answered."""
        import ray

        if self._has_shards(actor):
            return True
        ref = self._actors[actor].info.remote()
        if not ray.wait([ref], timeout=IDLE_PING_WAIT)[0]:
            if self._slots.lose(actor):
                log.info("actor %d does not answer; it takes shards again once it does", actor)
                self._pings[ref] = actor
            return False
        try:
            ray.get(ref)
        except Exception as exc:
            if not _is_actor_death(exc):
                raise
            self._lose(actor, exc, idle=True)
            return False
        return True

    def wait(self, timeout: float) -> list[Outcome]:
        import ray

        if self._slots.alive or self._pending:
            self._none_since = None
        elif self._none_since is None:
            self._none_since = time.monotonic()
        elif time.monotonic() - self._none_since > self._timeout:
            raise WorkersUnavailableError(self._none_up(self._plan, self._timeout))
        outcomes, self._returned = self._returned, []
        refs = [*self._pending, *self._pings]
        ready = ray.wait(refs, num_returns=1, timeout=0 if outcomes else timeout)[0] if refs else []
        for ref in ready:
            if ref in self._pings:
                self._answered(ref)
                continue
            lane, shard = self._pending.pop(ref)
            self._slots.release(lane)
            actor = self._slots.worker(lane)
            try:
                outcomes.append(Outcome(shard, ray.get(ref)))
            except Exception as exc:
                lost = _is_actor_death(exc)
                if isinstance(exc, ray.exceptions.ActorUnavailableError):
                    self._unreachable[shard.id] = actor
                if lost:
                    self._lose(actor, exc)
                outcomes.append(Outcome(shard, error=exc, lost_worker=lost))
        return outcomes

    def _lose(self, actor: int, exc: BaseException, idle: bool = False) -> None:
        """``actor`` died: it takes no shard until it answers a ping (Ray restarts it while it
        has restarts left; one dead for good fails the ping and stays out)."""
        if self._slots.lose(actor):  # (a process killed is first out of reach: ActorUnavailableError)
            log.warning("actor %d died%s (%s); waiting for it to come back", actor, " while idle" if idle else "",
                        type(exc).__name__)
            self._pings[self._actors[actor].info.remote()] = actor

    def _answered(self, ref, first: bool = False) -> None:
        """An actor answered its ping: it takes shards again (or for the first time). An actor
        that cannot start raises its error while none is up yet (``first``), else it is left out."""
        import ray
        import ray.exceptions as rex

        actor = self._pings.pop(ref)
        try:
            info = ray.get(ref)
        except rex.ActorUnavailableError:  # still on its way back: ask again
            log.debug("actor %d is not back yet", actor)
            self._pings[self._actors[actor].info.remote()] = actor
            return
        except Exception as exc:
            self._starting.discard(actor)
            if first:  # every actor builds the same model: the first that cannot is the run's error
                raise
            log.warning("actor %d is gone for good (%s); the others take its shards", actor, type(exc).__name__)
            return
        if actor in self._starting:
            self._starting.discard(actor)
            self.workers += 1
            log.info("actor %d is up on %s (%s)", actor, info["host"], info["device"])
        else:
            log.info("actor %d is back", actor)
            self._unreachable = {shard: a for shard, a in self._unreachable.items() if a != actor}
        self._slots.revive(actor)

    def in_flight(self, finished) -> int:
        """Also finds the actors that died between shards (their progress question failed):
        a retry waiting its turn is not sent to an actor Ray will not bring back."""
        if self._poller is None:
            return 0
        samples = self._poller.poll(self._slots.alive, finished)
        for actor, exc in list(self._poller.failed.items()):
            del self._poller.failed[actor]
            if _is_actor_death(exc):
                self._lose(actor, exc, idle=not self._has_shards(actor))
        return samples

    def _has_shards(self, actor: int) -> bool:
        """Whether ``actor`` has shards in flight."""
        return any(self._slots.worker(lane) == actor for lane, _ in self._pending.values())

    def close(self) -> set[int]:
        import ray

        writing = {shard.id for _, shard in self._pending.values()} | set(self._unreachable)
        try:
            if self._poller is not None:
                with contextlib.suppress(Exception):  # a cluster out of reach: the actors are killed below
                    self._poller.close()
            if self._pending:
                writing = self._give_up(self._grace) | set(self._unreachable)
        finally:
            for actor in self._actors:  # also when a second Ctrl-C cut the wait short
                with contextlib.suppress(Exception):
                    ray.kill(actor)
            self._pending.clear()
            self._pings.clear()
            self._session.close()
        return writing

    def _give_up(self, grace: float) -> set[int]:
        """Have the actors give up their shards in flight at their next batch (dropping their
        files); the shards that had not ended within ``grace`` seconds."""
        import ray

        log.info("stopping the actors: their %d shard(s) in flight end at their next batch (Ctrl-C to kill "
                 "them now)", len(self._pending))
        try:
            for actor in self._actors:  # a dead one's call fails, and its shards have ended already
                actor.stop.remote()
            _, left = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=grace)
        except Exception as exc:  # the cluster is out of reach: the actors are killed as they are
            log.warning("could not stop the actors (%s); they are killed with their shards in flight", exc)
            return {shard.id for _, shard in self._pending.values()}
        if left:
            log.warning("%d shard(s) still in flight after %g s (%s) are killed with their actors; their "
                        "temporary files go when the dump is resumed", len(left), grace, RunSpec.key("stop_grace"))
        return {self._pending[ref][1].id for ref in left}

