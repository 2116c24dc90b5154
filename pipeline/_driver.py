"""The driver: check, plan the shards, run them on an executor, summarise.

The driver never touches image data: it checks the config (one trial sample on its CPU; for
a new dump the executor reaches its cluster meanwhile, since a local Ray takes seconds to
start), writes the manifest, hands shards to the executor's workers as they free up (faster
workers take more; each of a worker's places for a shard at once takes a run of consecutive
shards: :class:`~pipeline._scheduling.ShardQueue`), retries the shards that fail or lose their worker (``run.max_attempts``
tries per shard in all, counted here and nowhere else), and collects the small records the
workers return. ``run.executor`` picks Ray actors (the default) or workers in this process.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TextIO

from ._executor import Executor, LocalExecutor, WorkerSpec
from ._layout import MANIFEST_PATH, SOURCE_INDEX_PATH
from ._lock import OutputLock
from ._manifest import assess_output, commit_output, new_manifest, open_output, remove_temporaries
from ._progress import Progress
from ._records import ShardRecord
from ._report import Summary
from ._scheduling import ShardQueue
from ._secrets import shown
from ._shards import MAX_SHARDS, Shard, ShardPlan
from ._sources import IndexFile, MemoryIndex, describe_error, write_index
from ._store import OutputStore
from ._worker import ShardWorker
from .config import Config, ExecutorKind, ModelSpec, RunSpec, SourceKind, comparable_location
from .errors import BadSampleError, ConfigError, ShardFailedError, repeats

log = logging.getLogger(__name__)


def make_executor(kind: ExecutorKind, address: str | None = None) -> Executor:
    """The executor ``run.executor`` names (``address``: the Ray cluster's, for ``ray``)."""
    if kind is ExecutorKind.LOCAL:
        if address:
            log.warning("the Ray address %r is not used: %s is local", address, RunSpec.key("executor"))
        return LocalExecutor()
    from ._ray_executor import RayExecutor

    return RayExecutor(address)


def execute(executor: Executor, plan: Sequence[Shard], run: RunSpec, progress: Progress,
            records: dict[int, ShardRecord], lock: OutputLock | None = None) -> None:
    """Run the shards of ``plan`` not in ``records`` on the started ``executor`` until every one
    is done, adding each record to ``records``; raises when a shard fails ``run.max_attempts``
    times, when every worker is gone, at the first bad sample in strict mode, or when another run
    took over the output's ``lock``. A failed shard is tried again after ``run.retry_delay``
    seconds (doubled at each failure), the others going on meanwhile."""
    queue = ShardQueue(plan, executor.lanes, done=records, max_attempts=run.max_attempts,
                       retry_delay=run.retry_delay)
    while not queue.idle:
        if lock is not None:
            lock.check()
        while executor.free and (shard := queue.take(executor.lane)) is not None:
            executor.submit(shard)
        if not executor.busy and not executor.free:
            raise ShardFailedError("every worker has died; the shards done so far are kept, rerun "
                                   "the same command to finish")
        # a worker free: no longer than the next retry's wait (none is due now: take took it)
        due = queue.retry_due() if executor.free else None
        timeout = 0.5 if due is None else min(0.5, max(0.0, due - time.monotonic()))
        if executor.busy:
            outcomes = executor.wait(timeout=timeout)
        else:  # workers free, none busy: the shards left wait to be retried
            time.sleep(timeout)
            outcomes = []
        for outcome in outcomes:
            if not outcome.started:  # its worker was found dead before it got the shard
                queue.returned(outcome.shard)
            elif outcome.record is not None:
                queue.finished(outcome.shard)
                records[outcome.shard.id] = outcome.record
                progress.update(len(outcome.shard), outcome.record.total_bytes)
            elif isinstance(outcome.error, BadSampleError):
                raise outcome.error
            else:
                reason = _last_line(outcome.error)
                delay = queue.failed(outcome.shard, reason, outcome.error,
                                     wait=not outcome.lost_worker and not repeats(outcome.error))
                log.warning("shard %d %s: %s; %s (try %d of %d)", outcome.shard.id,
                            "lost its worker" if outcome.lost_worker else "failed", reason,
                            f"trying it again in {delay:g} s" if delay else "trying it again",
                            queue.attempts[outcome.shard.id] + 1, run.max_attempts)
        # the batches of the shards still running, and the workers still on their way (asking
        # also finds a worker that died while idle: the Ray executor sends it no retry)
        progress.in_flight(executor.in_flight(records), executor.pending)
        due = queue.retry_due()
        progress.waiting(queue.waiting, 0.0 if due is None else max(0.0, due - time.monotonic()))


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _check_ids(source, strict: bool) -> None:
    """Sample ids that repeat (a Parquet id column, WebDataset keys): a warning, or with
    ``run.strict`` a refusal before any work."""
    repeated = getattr(source, "repeated_ids", None)
    if not repeated or not repeated["count"]:
        return
    examples = ", ".join(repr(v) for v in repeated["examples"])
    message = (f"{repeated['count']:,} sample ids appear more than once (e.g. {examples}); the rows "
               "keep their distinct index, but joins on sample_id will match several")
    if repeated.get("hint"):
        message += f"; {repeated['hint']}"
    if strict:
        raise ConfigError(Config.key("source"), f"{message} ({RunSpec.key('strict')} is set; unset it to go on)")
    log.warning("%s", message)


#: The first characters of the names a source passes over (hidden files; Parquet's also ``_``).
_PASSED_OVER = {SourceKind.FOLDER: (".",), SourceKind.PARQUET: (".", "_")}


def _refuse_output_in_source(config: Config) -> None:
    """An output inside the folder a folder or Parquet source reads: the dump's own files would
    join the source, and the rerun that resumes it would find the source changed (but for a
    folder the source passes over, a hidden one)."""
    path = getattr(config.source, "path", None)
    if config.source.kind not in _PASSED_OVER or not isinstance(path, str):
        return
    output, source = (comparable_location(p).partition("?")[0] for p in (config.run.output, path))
    spellings = [(output.rstrip("/") or "/", source.rstrip("/") or "/")]
    if "://" not in output and "://" not in source:  # local: also as the links on the way resolve
        spellings.append((os.path.realpath(output), os.path.realpath(source)))
    for output, source in spellings:
        below = [] if output == source else _below(output, source)
        if below is not None and not any(part.startswith(_PASSED_OVER[config.source.kind]) for part in below):
            raise ConfigError(RunSpec.key("output"), f"{shown(config.run.output)!r} lies inside the folder the source "
                              f"reads ({config.source.key('path')}: {shown(path)!r}): the dump's files would become "
                              "part of the source, and a rerun would find it changed; put the output outside it")


def _below(path: str, folder: str) -> list[str] | None:
    """The names on the way from ``folder`` down to ``path``; ``None`` where it is not below it.

    >>> _below("/data/images/out/x", "/data/images"), _below("/data/img", "/data/images"), _below("/x", "/")
    (['out', 'x'], None, ['x'])
    """
    prefix = folder if folder.endswith("/") else folder + "/"
    return path[len(prefix):].split("/") if path.startswith(prefix) else None


def _warn_row_groups(source, shard_size: int) -> None:
    """Parquet row groups much larger than a shard: a shard that starts inside one reads it
    from where the worker's last shard in it stopped, or else from its start (Parquet cannot
    seek to a row inside a group), so a group is read from its start again by each run of
    shards that begins inside it."""
    rows = getattr(source, "largest_row_group", 0)
    if rows > 4 * shard_size:
        log.warning("the source's row groups hold up to %d rows, %s is %d: a shard that starts inside a "
                    "row group reads it from where this worker's last shard in it stopped, else from its "
                    "start; a shard size of a row group (or a multiple) reads each group once", rows,
                    RunSpec.key("shard_size"), shard_size)


def _freeze_source(store: OutputStore, source) -> bool:
    """Keep the source's index (what the driver listed) in the dump, for the workers to number
    the samples by; whether there is one. A resumed run keeps the index it started with."""
    index = getattr(source, "index", None)
    if not isinstance(index, MemoryIndex):
        return False
    if store.exists(SOURCE_INDEX_PATH):
        try:
            kept = IndexFile(store.fs, store.path(SOURCE_INDEX_PATH))
            rows = len(kept)
            kept.close()
        except Exception as exc:  # damaged: the workers could not open it
            rows = f"unreadable ({type(exc).__name__}: {exc})"
        if rows == len(index):
            return True
        # the manifest's check found the source unchanged: its index is the one the run began with
        log.warning("%s holds %s rows, the source %d: written again from the source", store.path(SOURCE_INDEX_PATH),
                    rows, len(index))
    write_index(store.fs, store.path(SOURCE_INDEX_PATH), index)
    return True


def _warn_large_seed(model: ModelSpec) -> None:
    if model.seed >= 2**32 and model.weights is None:
        log.warning("%s %d: torch's generator uses the low 32 bits of a seed, so the weights are those of seed %d",
                    ModelSpec.key("seed"), model.seed, model.seed % 2**32)


def _warn_small_shards(run: RunSpec) -> None:
    if run.shard_size < 4 * run.batch_size:
        log.warning("%s %d is under 4 batches of %d: every shard costs a file per layer, a record and a "
                    "round trip to the driver, so small shards mean many small files and idle gaps; a few "
                    "batches or more per shard is better", RunSpec.key("shard_size"), run.shard_size,
                    run.batch_size)


def _trial(probe: ShardWorker, run: RunSpec, executor: Executor | None) -> dict:
    """The probe's checks and trial sample (the layers' shapes); when ``executor`` is slow to
    connect (a local Ray starts its processes), they run on a thread of their own while it
    connects in this one (Ray sets its signal handlers from the main thread alone).

    The checks' own errors come first: a config error the trial finds is raised even when the
    connection fails too. An interrupt (Ctrl-C, SIGTERM) stops the wait at once; the thread is
    a daemon, so a trial still reading its samples holds nothing up.
    """
    def checks() -> dict:
        _check_ids(probe.source, run.strict)
        _warn_row_groups(probe.source, run.shard_size)
        return probe.probe()

    if executor is None or not executor.slow_to_connect:
        return checks()
    trial: Future = Future()

    def in_thread() -> None:
        trial.set_running_or_notify_cancel()
        try:
            trial.set_result(checks())
        except BaseException as exc:  # handed to the driver's thread, raised there
            trial.set_exception(exc)

    threading.Thread(target=in_thread, name="actmap-trial", daemon=True).start()
    try:
        executor.connect()
    except Exception as connect_error:
        if isinstance(trial.exception(), (ConfigError, BadSampleError)):  # the config's fault: said first
            raise trial.exception() from connect_error
        raise
    return trial.result()


def _plan(samples: int, shard_size: int) -> ShardPlan:
    """The run's shard plan; a plan of more than :data:`MAX_SHARDS` shards is refused."""
    plan = ShardPlan(samples, shard_size)
    if len(plan) > MAX_SHARDS:
        key = RunSpec.key("shard_size")
        raise ConfigError(key, f"{samples:,} samples in shards of {shard_size:,} make {len(plan):,} shards, more "
                          f"than the {MAX_SHARDS:,} a run takes (each is a file per layer, a record and a round "
                          f"trip to the driver); set {key} to at least "
                          f"{-(-samples // MAX_SHARDS):,}, or dump a part of the source at a time")
    return plan


def _stop(executor: Executor | None, store: OutputStore, layers: Sequence[str], lock: OutputLock) -> None:
    """Stop the workers while the run holds the output's lock, then delete the temporary files
    of the writes that never finished (shards given up, or whose worker died), but those of the
    shards a worker may still be writing (killed with them, or out of reach: the next run's).
    Nothing is deleted once another run has taken the lock over."""
    writing = executor.close() if executor is not None else set()
    try:
        ours = lock.lost is None and lock.renew()
    except OSError as exc:
        log.warning("the lock of %s could not be renewed (%s): the temporary files are left", store.location, exc)
        return
    if ours:
        remove_temporaries(store, layers, keep=writing)


def _quietly(error: BaseException, stop: Callable[..., object], *args: object) -> None:
    """``stop(*args)`` after the run failed with ``error``, which stands whatever happens here (a
    cluster out of reach, a storage error, a second Ctrl-C while the workers stop): that is logged."""
    try:
        stop(*args)
    except BaseException as exc:  # noqa: BLE001 - the run's own error is the one to raise
        cause = "interrupted again" if isinstance(exc, KeyboardInterrupt) else describe_error(exc)
        log.warning("while stopping after %s: %s; temporary files may be left for the next run",
                    type(error).__name__, cause)


def run(config: Config, *, address: str | None = None, overwrite: bool = False,
        stream: TextIO | None = sys.stderr) -> Summary:
    """Dump ``config``'s layers over its source into ``config.run.output``.

    Everything is checked before anything is written (model, layers, source, output folder,
    one trial sample, the cluster's room for the workers); a rerun of the same config resumes;
    ``overwrite`` replaces the dump (only what actmap wrote). One run at a time holds the output
    folder. ``address`` names the Ray cluster for the ``ray`` executor.
    """
    started = time.monotonic()
    _warn_small_shards(config.run)
    _warn_large_seed(config.model)
    _refuse_output_in_source(config)
    store = open_output(config.run.output)
    # a new dump will need its workers: the executor reaches its cluster (a local Ray takes
    # seconds to start) while the trial sample runs; a rerun may have nothing left to do
    executor = make_executor(config.run.executor, address) if not store.exists(MANIFEST_PATH) else None
    workers = 0
    try:
        with ShardWorker(config.to_dict(), device="cpu", decode_threads=1) as probe:
            layers = _trial(probe, config.run, executor)
            samples = len(probe.source)
            plan = _plan(samples, config.run.shard_size)
            # with what the model saw: `actmap show` redraws it
            label_types = probe.source.label_types() if hasattr(probe.source, "label_types") else None
            manifest = new_manifest(config, probe.identity, probe.source.identity(), samples, layers, probe.inputs,
                                    label_types)
            digest = probe.digest
        with OutputLock(store) as lock:
            index = getattr(probe.source, "index", None)
            state = assess_output(store, manifest, overwrite, index if isinstance(index, MemoryIndex) else None)
            if state.labels is not None:  # as the dump began: its files keep one schema
                label_types = state.labels
            records = dict(state.done)
            shards_left = len(plan) - len(records)
            new_samples = samples - sum(len(plan[i]) for i in records)
            if executor is None and shards_left:
                executor = make_executor(config.run.executor, address)
            if executor is not None and shards_left:
                executor.check(config, shards_left)  # a cluster that can never run the workers: nothing written
            commit_output(store, manifest, state)
            frozen = _freeze_source(store, probe.source)
            del probe  # the source's index is on disk now: the driver keeps O(shards), not O(samples)
            try:
                if executor is not None and shards_left:
                    progress = Progress(new_samples, stream)
                    try:
                        executor.start(WorkerSpec(config, digest, layers, frozen_source=frozen,
                                                  label_types=label_types), shards_left)
                        execute(executor, plan, config.run, progress, records, lock)
                    finally:
                        workers = executor.workers
                        progress.close()
            except BaseException as error:
                stopping, executor = executor, None
                _quietly(error, _stop, stopping, store, config.model.layers, lock)
                raise
            stopping, executor = executor, None
            _stop(stopping, store, config.model.layers, lock)
    except BaseException as error:
        if executor is not None:
            _quietly(error, executor.close)
        raise
    written = sum(records[i].total_bytes for i in records if i not in state.done)
    return Summary.from_records(records, output=store.location, layers=layers, samples=samples,
                                resumed=len(state.done), actors=workers, seconds=time.monotonic() - started,
                                new_samples=new_samples, written=written)
