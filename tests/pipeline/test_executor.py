"""The executor seam without Ray: the local executor, and the driver's loop on a scripted one."""

from __future__ import annotations

import io
import time
import types

import pytest

from pipeline._driver import execute
from pipeline._executor import LocalExecutor, Outcome, WorkerSpec
from pipeline._progress import Progress
from pipeline._shards import Shard, plan_shards
from pipeline._worker import ShardWorker
from pipeline.config import Config, RunSpec
from pipeline.errors import ShapeChangedError, ShardFailedError


class Lossy:
    """An executor with one worker that loses every shard it is given; with ``comes_back`` the
    worker returns after each loss, else it is gone."""

    def __init__(self, comes_back: bool):
        self.comes_back, self.alive, self.workers = comes_back, True, 1
        self.shards: list[Shard] = []
        self.pending = 0
        self.tries: dict[int, int] = {}

    lanes, lane = 1, 0

    @property
    def free(self) -> int:
        return int(self.alive and not self.shards)

    @property
    def busy(self) -> bool:
        return bool(self.shards)

    def submit(self, shard: Shard) -> None:
        self.shards.append(shard)
        self.tries[shard.id] = self.tries.get(shard.id, 0) + 1

    def wait(self, timeout: float) -> list[Outcome]:
        lost = [Outcome(s, error=RuntimeError("the worker died"), lost_worker=True) for s in self.shards]
        self.shards, self.alive = [], self.comes_back
        return lost

    def in_flight(self, finished) -> int:
        return 0


def test_a_lost_try_counts_against_the_attempt_budget():
    executor = Lossy(comes_back=True)
    with pytest.raises(ShardFailedError, match=r"shard 0 \(samples 0-4\) failed 3 times; last error: the worker died"):
        execute(executor, plan_shards(8, 4), RunSpec(max_attempts=3), Progress(8, None), {})
    assert executor.tries == {0: 3}


def test_a_run_whose_workers_are_all_gone_ends():
    with pytest.raises(ShardFailedError, match="every worker has died; the shards done so far are kept"):
        execute(Lossy(comes_back=False), plan_shards(8, 4), RunSpec(max_attempts=3), Progress(8, None), {})


class Flaky(Lossy):
    """An executor with one worker whose shards each fail their first ``fails`` tries (storage
    that is away a while) and then finish; ``submitted`` keeps when each try began."""

    def __init__(self, fails: int, error: Exception | None = None):
        super().__init__(comes_back=True)
        self.fails, self.submitted = fails, []
        self.error = error or OSError("storage is away")

    def submit(self, shard: Shard) -> None:
        super().submit(shard)
        self.submitted.append((shard.id, time.monotonic()))

    def wait(self, timeout: float) -> list[Outcome]:
        shard = self.shards.pop()
        if self.tries[shard.id] <= self.fails:
            return [Outcome(shard, error=self.error)]
        return [Outcome(shard, record=types.SimpleNamespace(total_bytes=0))]


def test_a_failed_shard_waits_before_its_next_try_while_the_others_go_on():
    executor, records = Flaky(fails=1), {}
    execute(executor, plan_shards(4, 2), RunSpec(max_attempts=3, retry_delay=0.3), Progress(4, None), records)
    assert sorted(records) == [0, 1] and executor.tries == {0: 2, 1: 2}
    order = [shard for shard, _ in executor.submitted]
    assert order == [0, 1, 0, 1], order  # shard 1 started while shard 0 waited
    began = dict(reversed(executor.submitted))  # each shard's first try
    retried = {shard: t for shard, t in executor.submitted[2:]}
    assert all(retried[s] - began[s] >= 0.3 for s in (0, 1)), executor.submitted


def test_the_wait_doubles_at_each_failure_and_only_waiting_shards_are_no_dead_workers(caplog):
    executor, records = Flaky(fails=2), {}
    with caplog.at_level("WARNING"):
        execute(executor, plan_shards(2, 2), RunSpec(max_attempts=3, retry_delay=0.2), Progress(2, None), records)
    assert list(records) == [0]
    times = [t for _, t in executor.submitted]
    assert times[1] - times[0] >= 0.2 and times[2] - times[1] >= 0.4, times
    assert [r.getMessage() for r in caplog.records] == [
        "shard 0 failed: storage is away; trying it again in 0.2 s (try 2 of 3)",
        "shard 0 failed: storage is away; trying it again in 0.4 s (try 3 of 3)"]


def test_a_shard_whose_error_comes_back_at_every_try_is_retried_at_once():
    executor = Flaky(fails=2, error=ShapeChangedError("layer 'conv2' gave (2, 8, 8), before (2, 6, 6)"))
    began = time.monotonic()
    execute(executor, plan_shards(2, 2), RunSpec(max_attempts=3, retry_delay=60), Progress(2, None), {})
    assert executor.tries == {0: 3} and time.monotonic() - began < 30


def test_a_shard_that_lost_its_worker_is_retried_at_once():
    executor = Lossy(comes_back=True)
    began = time.monotonic()
    with pytest.raises(ShardFailedError, match="failed 3 times"):
        execute(executor, plan_shards(8, 4), RunSpec(max_attempts=3, retry_delay=60), Progress(8, None), {})
    assert time.monotonic() - began < 30


def _local(tmp_path, **run):
    config = Config.from_dict({"model": {"name": "support.models:tiny", "layers": ["conv2"]},
                               "source": {"kind": "dataset", "target": "support.datasets:Slow",
                                          "kwargs": {"n": 40, "size": 8, "delay": 0.05},
                                          "preprocess": {"normalize": "none"}},
                               "run": {"output": str(tmp_path / "out"), "executor": "local", "batch_size": 2,
                                       **run}})
    with ShardWorker(config.to_dict(), device="cpu") as probe:
        spec = WorkerSpec(config, probe.digest, probe.probe())
    return config, spec


def test_the_local_executor_runs_shards_on_its_workers(tmp_path):
    config, spec = _local(tmp_path, actors=2)
    executor = LocalExecutor()
    try:
        executor.start(spec, shards=1)
        assert executor.workers == 1, "never more workers than shards"
        assert executor.free == 2
        executor.submit(Shard(0, 0, 4))
        executor.submit(Shard(1, 4, 8))
        assert executor.free == 0 and executor.busy
        outcomes = []
        deadline = time.monotonic() + 60
        while executor.busy and time.monotonic() < deadline:
            outcomes += executor.wait(timeout=5.0)
    finally:
        executor.close()
    assert sorted(o.shard.id for o in outcomes) == [0, 1]
    assert all(o.error is None and o.record.rows == {"conv2": 4} for o in outcomes)
    assert executor.free == 2 and not executor.busy


def test_more_local_workers_on_the_cpu_than_cores_are_told_of(tmp_path, monkeypatch, caplog):
    config, spec = _local(tmp_path, actors=3)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    executor = LocalExecutor()
    try:
        with caplog.at_level("WARNING"):
            executor.start(spec, shards=4)
    finally:
        executor.close()
    assert executor.workers == 3
    assert "run.actors: 3 workers on the CPU of a machine of 2 cores: each holds a copy of the model in this " \
           "process, and they share the cores; 2 do as much" in caplog.text


def test_closing_the_local_executor_gives_up_the_shards_in_flight(tmp_path):
    """Each shard takes 20 reads of 0.05 s; closing right after the start drops both, rather than
    waiting for them: no file and no record is left."""
    config, spec = _local(tmp_path, actors=1)
    executor = LocalExecutor()
    executor.start(spec, shards=2)
    executor.submit(Shard(0, 0, 20))
    executor.submit(Shard(1, 20, 40))
    time.sleep(0.2)
    executor.close()
    out = tmp_path / "out"
    assert not list(out.rglob("*.parquet")) and not list(out.rglob("*.json")) and not list(out.rglob(".*"))


def test_the_progress_line_says_a_shard_waits_for_its_next_try():
    lines = io.StringIO()
    execute(Flaky(fails=1), plan_shards(2, 2), RunSpec(max_attempts=2, retry_delay=0.3),
            Progress(2, lines, every=0.0), {})
    said = [line for line in lines.getvalue().splitlines() if "(1 shard to retry in " in line]
    assert said, lines.getvalue()  # the driver ticks while it only waits, instead of going quiet
