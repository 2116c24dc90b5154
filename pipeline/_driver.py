"""The driver: check, plan the shards, run them on an executor, summarise.

The driver never touches image data: it checks the config (one trial sample on its CPU),
writes the manifest, hands shards to the executor's workers as they free up (faster workers
take more), retries the shards that fail or lose their worker (``run.max_attempts`` tries per
shard in all, counted here and nowhere else), and collects the small records the workers
return. ``run.executor`` picks Ray actors (the default) or workers in this process.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from ._executor import Executor, LocalExecutor, WorkerSpec
from ._layout import SOURCE_INDEX_PATH
from ._manifest import new_manifest, prepare_output
from ._progress import Progress
from ._records import ShardRecord
from ._report import Summary
from ._scheduling import ShardQueue
from ._shards import Shard, plan_shards
from ._sources import MemoryIndex, write_index
from ._store import OutputStore
from ._worker import ShardWorker
from .config import Config, ExecutorKind, RunSpec
from .errors import BadSampleError, ConfigError, ShardFailedError

log = logging.getLogger(__name__)


def make_executor(kind: ExecutorKind, address: str | None = None) -> Executor:
    """The executor ``run.executor`` names (``address``: the Ray cluster's, for ``ray``)."""
    if kind is ExecutorKind.LOCAL:
        if address:
            log.warning("the Ray address %r is not used: run.executor is local", address)
        return LocalExecutor()
    from ._ray_executor import RayExecutor

    return RayExecutor(address)


def execute(executor: Executor, todo: Sequence[Shard], max_attempts: int, progress: Progress,
            records: dict[int, ShardRecord]) -> None:
    """Run ``todo`` on the started ``executor`` until every shard is done, adding each record to
    ``records``; raises when a shard fails ``max_attempts`` times, when every worker is gone, or
    at the first bad sample in strict mode."""
    queue = ShardQueue(todo, max_attempts)
    while not queue.idle:
        while executor.free and (shard := queue.take()) is not None:
            executor.submit(shard)
        if not executor.busy:
            raise ShardFailedError("every worker has died; the shards done so far are kept, rerun "
                                   "the same command to finish")
        for outcome in executor.wait(timeout=0.5):
            if outcome.record is not None:
                queue.finished(outcome.shard)
                records[outcome.shard.id] = outcome.record
                progress.update(len(outcome.shard), outcome.record.total_bytes)
            elif isinstance(outcome.error, BadSampleError):
                raise outcome.error
            else:
                reason = _last_line(outcome.error)
                log.warning("shard %d %s: %s", outcome.shard.id,
                            "lost its worker" if outcome.lost_worker else "failed", reason)
                queue.failed(outcome.shard, reason)
        progress.in_flight(executor.in_flight(records))  # the batches of the shards still running


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
    if strict:
        raise ConfigError("source", message + " (run.strict is set; unset it to go on)")
    log.warning("%s", message)


def _warn_row_groups(source, shard_size: int) -> None:
    """Parquet row groups much larger than a shard: each shard reads its group from the start
    (Parquet cannot seek to a row inside one) to its last row."""
    rows = getattr(source, "largest_row_group", 0)
    if rows > 4 * shard_size:
        log.warning("the source's row groups hold up to %d rows, run.shard_size is %d: each shard reads "
                    "its row group from the start up to its own last row, on average %.0fx the rows it "
                    "uses; a shard size of a row group (or a multiple) reads each group once", rows,
                    shard_size, rows / shard_size / 2)


def _freeze_source(store: OutputStore, source) -> bool:
    """Keep the source's index (what the driver listed) in the dump, for the workers to number
    the samples by; whether there is one. A resumed run keeps the index it started with."""
    index = getattr(source, "index", None)
    if not isinstance(index, MemoryIndex):
        return False
    if not store.exists(SOURCE_INDEX_PATH):
        write_index(store.fs, store.path(SOURCE_INDEX_PATH), index)
    return True


def _warn_small_shards(run: RunSpec) -> None:
    if run.shard_size < 4 * run.batch_size:
        log.warning("run.shard_size %d is under 4 batches of %d: every shard costs a file per layer, a "
                    "record and a round trip to the driver, so small shards mean many small files and "
                    "idle gaps; a few batches or more per shard is better", run.shard_size, run.batch_size)


def run(config: Config, *, address: str | None = None, overwrite: bool = False,
        stream: TextIO | None = sys.stderr) -> Summary:
    """Dump ``config``'s layers over its source into ``config.run.output``.

    Everything is checked before any work starts (model, layers, source, output folder, one
    trial sample); a rerun of the same config resumes; ``overwrite`` starts afresh. ``address``
    names the Ray cluster for the ``ray`` executor.
    """
    started = time.monotonic()
    _warn_small_shards(config.run)
    with ShardWorker(config.to_dict(), device="cpu", decode_threads=1) as probe:
        _check_ids(probe.source, config.run.strict)
        _warn_row_groups(probe.source, config.run.shard_size)
        layers = probe.probe()
        samples = len(probe.source)
        manifest = new_manifest(config, probe.identity, probe.source.identity(), samples)
        manifest["layer_info"] = {layer: spec.to_dict() for layer, spec in layers.items()}
        manifest["input"] = probe.inputs.to_dict()  # what the model saw: `actmap show` redraws it
        digest = probe.digest
        store = OutputStore(config.run.output)
        records = prepare_output(store, manifest, overwrite)
        frozen = _freeze_source(store, probe.source)
    del probe  # the source's index is on disk now: the driver keeps O(shards), not O(samples)
    resumed = len(records)
    todo = [s for s in plan_shards(samples, config.run.shard_size) if s.id not in records]
    new_samples = sum(len(s) for s in todo)
    workers = 0
    if todo:
        executor = make_executor(config.run.executor, address)
        progress = Progress(new_samples, stream)
        try:
            executor.start(WorkerSpec(config, digest, layers, frozen_source=frozen), len(todo))
            workers = executor.workers
            execute(executor, todo, config.run.max_attempts, progress, records)
        finally:
            progress.close()
            executor.close()
    return Summary.from_records(records, output=store.location, layers=layers, samples=samples,
                                resumed=resumed, actors=workers, seconds=time.monotonic() - started,
                                new_samples=new_samples)
