"""End to end: the dump equals a direct forward, exactly once, and survives interruptions, failed
shards, dead actors and reruns.

Resume, retry, strict mode and bad samples are the driver's logic: they run on the local
executor (no Ray). What Ray itself does (actors that die and restart, the retry budget there,
errors that come back through Ray) runs on the session's local Ray.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch

from pipeline import inspect_dump, read_layer, read_table, run
from pipeline._layout import LOCK_PATH, MANIFEST_PATH, SHARDS_DIR, layer_file, shard_record_path
from pipeline._models import build_model
from pipeline._sources import open_source
from pipeline.config import Config
from pipeline.errors import BadSampleError, ConfigError, OutputConflictError, ShardFailedError
from support.samples import pixels
from support.storage import Outage

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "dump-0.1.0"


def _config(out, executor="local", **sections):
    data = {"model": {"name": "support.models:tiny", "layers": ["relu1", "conv2"]},
            "source": {"count": 40, "image_size": 16},
            "run": {"output": str(out), "batch_size": 4, "shard_size": 8, "actors": 2, "executor": executor}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return Config.from_dict(data)


def _dataset(target, **kwargs):
    return {"kind": "dataset", "target": f"support.datasets:{target}", "kwargs": kwargs,
            "preprocess": {"normalize": "none"}}


def _direct_input(config):
    """The model's input for every sample of ``config``'s source, preprocessed as a run does."""
    samples = open_source(config.source).read(range(len(open_source(config.source))))
    x = torch.stack([pixels(s) for s in samples])
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    if config.source.preprocess.mean_std() is not None:
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in config.source.preprocess.mean_std())
        x = (x - mean) / std
    return x


def _direct(config):
    model = build_model(config.model)
    x = _direct_input(config)
    with torch.no_grad():
        relu1 = model.relu1(model.conv1(x))
        return {"relu1": relu1, "conv2": model.conv2(relu1)}


def _assert_complete(config, expected):
    for layer, values in expected.items():
        table = read_table(config.run.output, layer)
        assert table.column("index").to_pylist() == list(range(len(values)))
        assert len(set(table.column("sample_id").to_pylist())) == len(values)
        np.testing.assert_allclose(read_layer(config.run.output, layer), values.numpy(), rtol=1e-3, atol=1e-3)


def _records(out):
    return sorted(p.name for p in (Path(out) / SHARDS_DIR).glob("*.json"))


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_dump_equals_a_direct_forward_exactly_once(tmp_path, executor, request):
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    config = _config(tmp_path / "out", executor)
    summary = run(config, stream=None)
    assert summary.rows == {"relu1": 40, "conv2": 40}
    assert summary.shards == 5 and summary.resumed == 0 and summary.actors == 2 and summary.bad == []
    _assert_complete(config, _direct(config))
    assert len(_records(tmp_path / "out")) == 5
    assert "40 samples, 2 layer(s)" in summary.format()
    assert not list((tmp_path / "out").rglob(".*.tmp"))


def test_rerun_resumes_and_equals_an_uninterrupted_run(tmp_path):
    out = tmp_path / "out"
    config = _config(out)
    run(config, stream=None)
    before = {layer: read_layer(str(out), layer) for layer in ("relu1", "conv2")}
    # an interruption: two shards never finished (no record; one left a temporary file)
    for shard in (1, 3):
        (out / shard_record_path(shard)).unlink()
        (out / layer_file("conv2", shard)).unlink()
    (out / "layer=conv2/.part-00003.parquet.deadbeef.tmp").write_bytes(b"half")
    stamp = (out / layer_file("relu1", 0)).stat().st_mtime_ns
    summary = run(_config(out, run={"actors": 1, "batch_size": 3}), stream=None)
    assert summary.resumed == 3 and summary.new_samples == 16
    assert (out / layer_file("relu1", 0)).stat().st_mtime_ns == stamp
    for layer, values in before.items():
        assert np.array_equal(read_layer(str(out), layer), values)
    assert not list(out.rglob(".*.tmp")), "the interrupted write's temporary file is cleared"
    assert run(config, stream=None).new_samples == 0


def test_a_resumed_dump_keeps_the_label_types_it_began_with(tmp_path):
    # a rerun typed a dataset's labels afresh: its files then held other column types, and the
    # dump no longer read back ("Float value 8.5 was truncated converting to int64")
    out, floats = tmp_path / "out", tmp_path / "floats"
    config = _config(out, source=_dataset("Drifting", n=16, floats=str(floats)))
    run(config, stream=None)
    (out / shard_record_path(1)).unlink()
    floats.write_text("")  # the items now type the tag a float
    summary = run(config, stream=None)
    assert summary.new_samples == 8 and [b["index"] for b in summary.bad] == list(range(8, 16))
    assert "its column holds int64" in summary.bad[0]["reason"]
    table = read_table(str(out), "conv2")
    assert table.schema.field("tag").type == pa.int64() and table.column("tag").to_pylist() == list(range(8))


def test_other_config_is_refused_and_overwrite_replaces(tmp_path):
    out = tmp_path / "out"
    run(_config(out, source={"count": 16}), stream=None)
    other = _config(out, source={"count": 16}, model={"layers": ["conv1"]})
    with pytest.raises(OutputConflictError, match=r'model.layers: \["relu1", "conv2"\] -> \["conv1"\]'):
        run(other, stream=None)
    assert read_table(str(out), "relu1").num_rows == 16
    summary = run(other, overwrite=True, stream=None)
    assert summary.rows == {"conv1": 16}
    assert not (out / "layer=relu1").exists()


def test_a_key_the_source_kind_does_not_use_does_not_refuse_a_resume(tmp_path):
    shutil.copytree(FIXTURE / "images", tmp_path / "images")
    out = tmp_path / "out"
    source = {"kind": "folder", "path": str(tmp_path / "images")}
    first = run(_config(out, source=source, run={"shard_size": 4}), stream=None)
    assert first.rows == {"relu1": 5, "conv2": 5} and len(first.bad) == 1
    again = run(_config(out, source={**source, "count": 7, "image_size": 32}, run={"shard_size": 4}), stream=None)
    assert again.resumed == 2 and again.new_samples == 0
    (tmp_path / "images" / "6.png").write_bytes((tmp_path / "images" / "0.png").read_bytes())
    with pytest.raises(OutputConflictError, match=r"source: files: 6 -> 7"):
        run(_config(out, source=source, run={"shard_size": 4}), stream=None)


def test_a_dump_of_release_0_1_0_is_resumed(tmp_path):
    """The fixture's config, rerun by this version: nothing to redo, and a shard made to be
    missing is redone equal to what 0.1.0 wrote."""
    out = tmp_path / "generated"
    shutil.copytree(FIXTURE / "generated", out)
    manifest = json.loads((out / "_actmap" / "manifest.json").read_text())
    config = Config.from_dict({**manifest["config"], "run": {**manifest["config"]["run"], "output": str(out),
                                                             "executor": "local"}})
    summary = run(config, stream=None)
    assert summary.resumed == 4 and summary.new_samples == 0
    before = read_layer(str(out), "conv2")
    (out / shard_record_path(2)).unlink()
    summary = run(config, stream=None)
    assert summary.resumed == 3 and summary.new_samples == 8
    np.testing.assert_array_equal(read_layer(str(out), "conv2"), before)


def test_a_failed_shard_is_retried(tmp_path, caplog):
    log = tmp_path / "reads"
    config = _config(tmp_path / "out", source=_dataset("Fails", n=24, size=8, at=13, log=str(log), times=1),
                     dump={"shapes": "fixed"}, run={"retry_delay": 0})
    summary = run(config, stream=None)
    assert summary.rows == {"relu1": 24, "conv2": 24} and summary.bad == []
    assert len(log.read_text().splitlines()) == 2, "tried twice: failed, then done"
    assert any("shard 1 failed" in r.getMessage() and "shape" in r.getMessage() for r in caplog.records)
    assert read_table(config.run.output, "conv2").column("index").to_pylist() == list(range(24))


@pytest.mark.parametrize("attempts", [1, 3])
def test_a_shard_is_tried_max_attempts_times_in_all(tmp_path, attempts):
    log = tmp_path / "reads"
    config = _config(tmp_path / "out", source=_dataset("Fails", n=24, size=8, at=13, log=str(log), times=99),
                     dump={"shapes": "fixed"},
                     run={"max_attempts": attempts, "actors": 1, "retry_delay": 0})
    with pytest.raises(ShardFailedError, match=rf"shard 1 \(samples 8-16\) failed {attempts} times?; last error: "):
        run(config, stream=None)
    assert len(log.read_text().splitlines()) == attempts


def test_bad_samples_are_reported_and_strict_mode_fails_fast(tmp_path):
    source = _dataset("Squares", n=24, size=8, bad=17)
    summary = run(_config(tmp_path / "lenient", source=source), stream=None)
    assert summary.bad == [{"index": 17, "sample_id": "17", "reason": "ValueError: item 17 is corrupt"}]
    assert summary.rows["conv2"] == 23
    assert "17 (index 17): ValueError: item 17 is corrupt" in summary.format()
    strict = _config(tmp_path / "strict", source=source, run={"strict": True, "actors": 1})
    with pytest.raises(BadSampleError, match="item 17 is corrupt"):
        run(strict, stream=None)
    # the shards done before the bad one are kept: the actor runs two at once, and the bad one
    # (shard 2) starts when the first of shards 0 and 1 ends, whichever that is
    done = _records(tmp_path / "strict")
    assert "00002.json" not in done and {"00000.json", "00001.json"} & set(done)
    assert not list((tmp_path / "strict").rglob(".*.tmp"))


def test_a_bad_first_item_is_recorded_in_a_lenient_run(tmp_path):
    summary = run(_config(tmp_path / "out", source=_dataset("Squares", n=12, size=8, bad=0)), stream=None)
    assert summary.bad == [{"index": 0, "sample_id": "0", "reason": "ValueError: item 0 is corrupt"}]
    assert read_table(str(tmp_path / "out"), "conv2").column("label").to_pylist() == [i % 3 for i in range(1, 12)]


#: ``actmap`` (its CLI), and then whether Ray was imported: the local executor needs none.
CLI = ("import sys; from pipeline.cli import main; code = main(sys.argv[1:]); "
       "print('ray imported:', 'ray' in sys.modules); sys.exit(code)")


def test_killed_driver_is_resumed_by_the_same_command(tmp_path):
    out = tmp_path / "out"
    # 8 shards of 8 samples that take 0.05 s each to read: about 3 s of work to interrupt
    source = _dataset("Slow", n=64, size=16, delay=0.05)
    args = [sys.executable, "-c", CLI, "run", "--quiet", "--set", "run.executor=local",
            "--set", "model.name=support.models:tiny", "--set", "model.layers=[relu1]",
            "--set", f"source={json.dumps(source)}", "--set", "run.shard_size=8",
            "--set", "run.actors=1", "--set", "run.batch_size=2", "--set", f"run.output={out}"]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(args, start_new_session=True, stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_records(out)) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(_records(out))
    assert 3 <= finished < 8, "the driver should have been killed mid-run"
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"8 shards ({finished} already done) on 1 actor(s)" in done.stderr
    assert done.stdout.strip() == "ray imported: False"
    config = _config(out, source=_dataset("Squares", n=64, size=16), model={"layers": ["relu1"]})
    _assert_complete(config, {"relu1": _direct(config)["relu1"]})
    assert not list(out.rglob(".*.tmp"))


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_strict_failure_with_shards_in_flight_names_the_bad_sample(tmp_path, capsys, executor, request):
    from pipeline.cli import main

    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    # two shards at once: the second fails at its first batch, while the first, slow, has written
    # some of its batches and has more than a second of reads to go
    source = _dataset("Slow", n=32, size=8, delay=0.1, bad=17)
    code = main(["run", "--quiet", "--set", "model.name=support.models:tiny", "--set", "model.layers=[conv2]",
                 "--set", f"source={json.dumps(source)}", "--set", "run.strict=true", "--set", "run.actors=1",
                 "--set", f"run.executor={executor}", "--set", "run.shard_size=16", "--set", "run.batch_size=2",
                 "--set", f"run.output={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 1
    assert "BadSampleError: sample '17' (index 17): ValueError: item 17 is corrupt" in err
    assert "rerun the same command to resume" in err
    out = tmp_path / "out"
    assert not (out / shard_record_path(0)).exists(), "the shard beside was given up, not run to its end"
    assert not list(out.rglob(".*.tmp")), "the shards given up leave no temporary file"
    assert not (out / LOCK_PATH).exists()


def test_a_run_whose_lock_was_taken_over_deletes_none_of_the_new_runs_files(tmp_path, monkeypatch):
    from pipeline._lock import OutputLock
    from pipeline.errors import LockLostError

    out, checks, check = tmp_path / "out", [], OutputLock.check
    theirs = out / "layer=conv2" / ".part-00004.parquet.0123456789ab.tmp"

    def taken_over(lock):  # as the lock's renewer finds it: another run holds the folder, and writes
        checks.append(1)
        if len(checks) == 3:
            theirs.parent.mkdir(parents=True, exist_ok=True)
            theirs.write_bytes(b"the other run's write in flight")
            lock.lost = lock.owner
        check(lock)

    monkeypatch.setattr(OutputLock, "check", taken_over)
    with pytest.raises(LockLostError):
        run(_config(out, run={"actors": 1}), stream=None)
    assert theirs.exists()


def test_an_error_while_stopping_leaves_the_runs_own_error(tmp_path, monkeypatch, caplog):
    from pipeline._executor import LocalExecutor

    close = LocalExecutor.close

    def interrupted(executor):  # a second Ctrl-C while the workers stop
        close(executor)
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalExecutor, "close", interrupted)
    for bad in (3, 12):  # found by the driver's trial of the first samples, then by a worker
        config = _config(tmp_path / f"out{bad}", source=_dataset("Squares", n=16, size=8, bad=bad), run={"strict": True})
        with pytest.raises(BadSampleError, match=f"sample '{bad}'"):
            run(config, stream=None)
        assert any("while stopping after BadSampleError: interrupted again" in r.getMessage() for r in caplog.records)
        caplog.clear()


# -- what Ray itself does ----------------------------------------------------------------------------


def test_shards_that_do_not_stop_in_time_are_killed_and_their_files_go_on_the_rerun(tmp_path, ray_cluster, caplog):
    out = tmp_path / "out"
    # two shards, one on each actor (no lock between their forwards, which take 1 s each): item
    # 13, the third batch of shard 1, is read from 1 s on and fails 1.5 s into its read, so its
    # shard stops at 2.5 s, in the middle of shard 0's third forward (two batches written), which
    # the grace (shorter than a forward) does not wait for. (With one actor the shards' forwards
    # took turns as its device lock let them, and shard 0 was at times in its first forward.)
    strict = _config(out, "ray", model={"name": "support.models:slow", "kwargs": {"delay": 1.0}, "layers": ["conv2"]},
                     source=_dataset("LateBad", n=16, size=8, bad=13, delay=1.5),
                     run={"actors": 2, "batch_size": 2, "shard_size": 8, "strict": True, "stop_grace": 0.2})
    with pytest.raises(BadSampleError, match="sample '13'"):
        run(strict, stream=None)
    assert any("after 0.2 s (run.stop_grace) are killed with their actors" in r.getMessage() for r in caplog.records)
    assert list(out.rglob(".*.tmp")), "a shard killed mid-way leaves its temporary file"
    assert not (out / LOCK_PATH).exists()
    lenient = Config.from_dict({**strict.to_dict(), "run": {**strict.to_dict()["run"], "strict": False}})
    summary = run(lenient, stream=None)
    assert summary.rows == {"conv2": 15} and [b["index"] for b in summary.bad] == [13]
    assert not list(out.rglob(".*.tmp")), "the rerun clears it"
    assert read_table(str(out), "conv2").column("index").to_pylist() == [i for i in range(16) if i != 13]


def test_dead_actor_loses_nothing(tmp_path, ray_cluster):
    log = tmp_path / "reads"
    # it dies reading the last batch of shard 1: the batches before are in its temporary files
    config = _config(tmp_path / "out", "ray", run={"actors": 1, "batch_size": 2},
                     source=_dataset("Dies", n=24, size=8, at=15, log=str(log), times=1))
    summary = run(config, stream=None)
    assert len(log.read_text().splitlines()) == 2, "the actor should have died once, then read it again"
    assert summary.rows == {"relu1": 24, "conv2": 24} and summary.bad == []
    table = read_table(config.run.output, "conv2")
    assert table.column("index").to_pylist() == list(range(24))
    assert table.column("label").to_pylist() == [i % 3 for i in range(24)]
    assert not list(Path(config.run.output).rglob(".*.tmp")), "the dead actor's temporary files are cleared"


def test_actors_that_die_in_turn_lose_nothing(tmp_path, ray_cluster, caplog):
    log = tmp_path / "reads"
    # item 15 kills the actor that reads it, twice: the shard's third try, on an actor Ray
    # brought back, reads it
    config = _config(tmp_path / "out", "ray", run={"actors": 2, "batch_size": 2},
                     source=_dataset("Dies", n=24, size=8, at=15, log=str(log), times=2))
    summary = run(config, stream=None)
    assert len(log.read_text().splitlines()) == 3
    deaths = [r.getMessage() for r in caplog.records if "died" in r.getMessage()]
    assert len(deaths) == 2, deaths
    assert summary.rows == {"relu1": 24, "conv2": 24} and summary.bad == []
    assert read_table(config.run.output, "conv2").column("index").to_pylist() == list(range(24))


def test_an_actor_that_died_idle_gets_no_retry(tmp_path, ray_cluster, monkeypatch, caplog):
    import ray

    from pipeline._ray_executor import RayExecutor
    from pipeline._scheduling import ShardQueue

    executors, start, failed = [], RayExecutor.start, ShardQueue.failed

    def kept(executor, *args, **kwargs):
        executors.append(executor)
        return start(executor, *args, **kwargs)

    def its_actor_dies(queue, shard, *args, **kwargs):
        # shard 0 ran on actor 0 (the first of the least loaded), which dies for good, idle,
        # while the shard waits; both actors idle at the retry, actor 0 would come first
        ray.kill(executors[0]._actors[0], no_restart=True)
        return failed(queue, shard, *args, **kwargs)

    monkeypatch.setattr(RayExecutor, "start", kept)
    monkeypatch.setattr(ShardQueue, "failed", its_actor_dies)
    log = tmp_path / "reads"
    # item 9 is in shard 0, after the items the driver types the labels from
    config = _config(tmp_path / "out", "ray", run={"actors": 2, "batch_size": 4, "shard_size": 16, "max_attempts": 2,
                                                   "retry_delay": 2},
                     source=_dataset("Away", n=32, size=8, at=9, log=str(log), times=1))
    with caplog.at_level("WARNING"):
        summary = run(config, stream=None)
    assert summary.rows == {"relu1": 32, "conv2": 32} and summary.bad == []
    assert len(log.read_text().splitlines()) == 2, "one failed read of item 9, one on the retry"
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("actor 0 died while idle (ActorDiedError)") for m in messages), messages
    assert not any("lost its worker" in m for m in messages), messages
    assert read_table(config.run.output, "conv2").column("index").to_pylist() == list(range(32))


@pytest.mark.parametrize("actors", [2, 1])
def test_an_actor_that_died_just_before_its_retry_costs_no_try(tmp_path, ray_cluster, monkeypatch, caplog, actors):
    """Actor 0 dies for good as shard 0's retry is handed to it, after the last progress
    question it answered: the retry goes to the other actor, or, with none left, the run ends
    with every worker gone, not with the shard out of tries."""
    import ray

    from pipeline._ray_executor import RayExecutor

    submit, submitted = RayExecutor.submit, []

    def dies_first(executor, shard):
        submitted.append(shard.id)
        if submitted.count(0) == 2:  # the retry
            actor = executor._actors[0]
            ray.kill(actor, no_restart=True)
            # (the kill is asynchronous: a call made at once may still be served, on a busy host)
            deadline = time.monotonic() + 30
            while True:
                try:
                    ray.get(actor.info.remote(), timeout=30)
                except ray.exceptions.RayActorError:
                    break
                assert time.monotonic() < deadline, "the actor still answers 30 s after ray.kill"
                time.sleep(0.1)
        return submit(executor, shard)

    monkeypatch.setattr(RayExecutor, "submit", dies_first)
    log = tmp_path / "reads"
    config = _config(tmp_path / "out", "ray", run={"actors": actors, "batch_size": 4, "shard_size": 16,
                                                   "max_attempts": 2, "retry_delay": 1},
                     source=_dataset("Away", n=16 * actors, size=8, at=9, log=str(log), times=1))
    with caplog.at_level("WARNING"):
        if actors == 1:
            with pytest.raises(ShardFailedError, match="every worker has died"):
                run(config, stream=None)
            return
        summary = run(config, stream=None)
    assert summary.rows == {"relu1": 32, "conv2": 32}
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("actor 0 died while idle (ActorDiedError)") for m in messages), messages
    assert len(log.read_text().splitlines()) == 2


def test_an_actor_that_ray_restarts_as_its_retry_is_handed_to_it_costs_no_try(tmp_path, ray_cluster, monkeypatch):
    """Its process is killed (as by the OOM killer); Ray builds it again, for 3 s, while it
    does not answer: the retry waits for it, instead of failing on an actor being restarted."""
    import os
    import signal

    import ray

    from pipeline._ray_executor import RayExecutor

    mark = tmp_path / "rebuilds"
    submit, submitted = RayExecutor.submit, []

    def killed_first(executor, shard):
        submitted.append(shard.id)
        if submitted.count(0) == 2:  # the retry
            pid = ray.get(executor._actors[0].info.remote())["pid"]
            mark.touch()
            os.kill(pid, signal.SIGKILL)
        return submit(executor, shard)

    monkeypatch.setattr(RayExecutor, "submit", killed_first)
    log = tmp_path / "reads"
    config = _config(tmp_path / "out", "ray", model={"name": "support.models:slow_rebuild", "kwargs": {"mark": str(mark)},
                                                    "layers": ["relu1", "conv2"]},
                     run={"actors": 1, "batch_size": 4, "shard_size": 16, "max_attempts": 2, "retry_delay": 1},
                     source=_dataset("Away", n=16, size=8, at=9, log=str(log), times=1))
    assert run(config, stream=None).rows == {"relu1": 16, "conv2": 16}
    assert submitted.count(0) >= 2 and len(log.read_text().splitlines()) == 2


def test_an_actor_whose_device_broke_ends_its_process_and_its_shard_runs_on_the_new_one(tmp_path, ray_cluster,
                                                                                       caplog):
    """A CUDA error that stays in the process (a device-side assert) would fail every later
    shard of the actor: the shard fails with it, the process ends at the driver's next call,
    Ray starts it anew, and the shard's retry works there. (Kept alive, the one actor failed
    the shard's every try.)"""
    mark = tmp_path / "break"
    mark.touch()
    config = _config(tmp_path / "out", "ray", model={"name": "support.models:device_breaker",
                                                    "kwargs": {"mark": str(mark), "driver": os.getpid()}},
                     source={"count": 16}, run={"actors": 1, "shard_size": 8, "max_attempts": 2, "retry_delay": 0.5})
    summary = run(config, stream=None)
    assert summary.rows == {"relu1": 16, "conv2": 16} and not mark.exists()
    broken = int((tmp_path / "break.pid").read_text())
    pids = {json.loads(p.read_text())["worker"]["pid"] for p in (tmp_path / "out" / SHARDS_DIR).glob("*.json")}
    assert pids and broken not in pids
    _assert_complete(config, _direct(config))
    assert "failed: torch.AcceleratorError: CUDA error: device-side assert triggered" in caplog.text


def test_ray_reruns_no_shard_behind_the_drivers_back(tmp_path, ray_cluster):
    """One attempt: the actor dies on the shard and restarts, and the shard is not tried again
    (Ray's own task retries would have rerun it on the restarted actor)."""
    log = tmp_path / "reads"
    config = _config(tmp_path / "out", "ray", run={"actors": 1, "max_attempts": 1},
                     source=_dataset("Dies", n=24, size=8, at=13, log=str(log), times=99))
    with pytest.raises(ShardFailedError, match=r"failed 1 time; last error: "):
        run(config, stream=None)
    assert len(log.read_text().splitlines()) == 1


def test_repeated_ids_are_reported_or_refused_in_strict_mode(tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline._driver import _check_ids
    from pipeline.errors import ConfigError
    from pipeline._sources import ParquetSource

    pq.write_table(pa.table({"image": [b"x"] * 5, "key": ["a", "b", "a", "c", "b"]}), tmp_path / "t.parquet")
    source = ParquetSource(str(tmp_path / "t.parquet"), id_column="key")
    with pytest.raises(ConfigError, match="2 sample ids appear more than once \\(e.g. 'a', 'b'\\)"):
        _check_ids(source, strict=True)
    _check_ids(source, strict=False)
    assert "2 sample ids appear more than once" in caplog.text


def test_a_dump_begun_when_binary_ids_were_literals_is_not_resumed_with_their_text(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, format="PNG")
    keys = pa.array([f"k{i}".encode() for i in range(12)], pa.binary())
    pq.write_table(pa.table({"image": [buf.getvalue()] * 12, "key": keys}), tmp_path / "t.parquet")
    out = tmp_path / "out"
    config = _config(out, source={"kind": "parquet", "path": str(tmp_path / "t.parquet"), "id_column": "key"},
                     run={"shard_size": 4})
    assert run(config, stream=None).new_samples == 12
    assert read_table(str(out), "relu1").column("sample_id").to_pylist() == [f"k{i}" for i in range(12)]
    assert run(config, stream=None).resumed == 3, "a dump of this version resumes"
    # a dump begun by a version that wrote b'k0': its manifest's source says nothing of the ids
    manifest = json.loads((out / MANIFEST_PATH).read_text())
    del manifest["source"]["sample_ids"]
    (out / MANIFEST_PATH).write_text(json.dumps(manifest))
    (out / shard_record_path(2)).unlink()
    with pytest.raises(OutputConflictError, match=r"begun by an earlier version of actmap, which wrote the ids of "
                                                  r"'key' \(stored as binary\) as Python literals"):
        run(config, stream=None)
    assert len(list((out / SHARDS_DIR).glob("*.json"))) == 2, "nothing of the dump is lost"


def test_a_dump_whose_layers_the_model_now_gives_in_other_shapes_is_not_resumed(tmp_path):
    # a model (or a reduction) whose code changed since the dump began: resumed, the new shards'
    # files disagreed with the manifest, every read failed, and every rerun redid them again
    out = tmp_path / "out"
    config = _config(out, dump={"shapes": "fixed"}, run={"actors": 1})
    run(config, stream=None)
    manifest = json.loads((out / MANIFEST_PATH).read_text())
    assert manifest["layer_info"]["conv2"]["shape"] == [16, 8, 8]
    manifest["layer_info"]["conv2"]["shape"] = [16, 1, 1]  # as the dump's first shards hold it
    (out / MANIFEST_PATH).write_text(json.dumps(manifest))
    (out / shard_record_path(2)).unlink()
    with pytest.raises(OutputConflictError, match=r"(?s)holds a dump of this config, but the model as it is built "
                                                  r"now gives its layers in other shapes .*Finish it with what "
                                                  r"began it, or rerun with --overwrite.*layers: conv2: 16x1x1 "
                                                  r"float16 -> 16x8x8 float16"):
        run(config, stream=None)
    assert len(list((out / SHARDS_DIR).glob("*.json"))) == 4, "nothing of the dump is lost"
    # a difference of the config that changes the layers is said once, as the config's
    with pytest.raises(OutputConflictError) as info:
        run(_config(out, dump={"shapes": "fixed", "dtype": "float32"}, run={"actors": 1}), stream=None)
    assert 'config: dump.dtype: "float16" -> "float32"' in str(info.value) and "layers:" not in str(info.value)


def test_a_dump_whose_maps_the_model_now_lays_out_otherwise_is_not_resumed(tmp_path):
    # a pooled dump of (height, width, channels) maps, resumed by a version that tells them
    # otherwise, would mix two meanings under one shape; one begun before layouts were recorded
    # resumes as it did
    out = tmp_path / "out"
    config = _config(out, dump={"reduce": "pool"}, run={"actors": 1})
    run(config, stream=None)
    manifest = json.loads((out / MANIFEST_PATH).read_text())
    assert {k: v["layout"] for k, v in manifest["layer_info"].items()} == {"relu1": "channels_first",
                                                                           "conv2": "channels_first"}
    assert manifest["format"] == "actmap.manifest/1"  # (what every version resumes)
    manifest["layer_info"]["relu1"]["layout"] = "channels_last"
    (out / MANIFEST_PATH).write_text(json.dumps(manifest))
    (out / shard_record_path(2)).unlink()
    with pytest.raises(OutputConflictError, match=r"(?s)gives its layers in other shapes .*layers: relu1: 8x1x1 "
                                                  r"float16 \(of channels-last maps\) -> 8x1x1 float16$"):
        run(config, stream=None)
    for spec in manifest["layer_info"].values():
        del spec["layout"]
    (out / MANIFEST_PATH).write_text(json.dumps(manifest))
    assert run(config, stream=None).resumed == 4
    # maps pooled now as channels-last: how an earlier version pooled them is not known
    out = tmp_path / "swin"
    config = _config(out, model={"name": "support.models:tv_swin", "layers": ["features.1"]},
                     source={"count": 8, "image_size": 32}, dump={"reduce": "pool"}, run={"actors": 1})
    run(config, stream=None)
    assert "8 rows of 16x1x1 float16 (of channels-last maps)" in inspect_dump(str(out)).format()
    manifest = json.loads((out / MANIFEST_PATH).read_text())
    # a format the versions before layouts were recorded refuse to resume (they know /1 alone)
    assert manifest["format"] == "actmap.manifest/2"
    (out / shard_record_path(0)).unlink()
    assert run(config, stream=None).new_samples == 8  # (resumed: its one shard redone)
    # begun by a version that recorded layouts in the first format: resumed, and given the second
    (out / MANIFEST_PATH).write_text(json.dumps(dict(manifest, format="actmap.manifest/1")))
    (out / shard_record_path(0)).unlink()
    assert run(config, stream=None).new_samples == 8
    assert json.loads((out / MANIFEST_PATH).read_text()) == manifest
    del manifest["layer_info"]["features.1"]["layout"]
    (out / MANIFEST_PATH).write_text(json.dumps(manifest))
    (out / shard_record_path(0)).unlink()
    with pytest.raises(OutputConflictError, match=r"layers: features.1: 16x1x1 float16 \(of maps whose layout an "
                                                  r"earlier version of actmap did not record\) -> 16x1x1 float16 "
                                                  r"\(of channels-last maps\)$"):
        run(config, stream=None)


class _Recording:
    """A local executor that notes whether it connected at all."""

    def __init__(self, connecting):
        from pipeline._executor import LocalExecutor

        self.inner, self.connecting = LocalExecutor(), connecting

    slow_to_connect = True  # as a Ray executor: the trial runs on a thread while it connects
    closed = False

    def connect(self):
        self.connecting.set()

    def close(self):
        self.closed = True
        self.inner.close()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_new_dump_connects_while_its_trial_sample_runs_and_a_finished_one_never(tmp_path, monkeypatch):
    from pipeline import _driver
    from pipeline._worker import ShardWorker

    connecting, seen = threading.Event(), []
    probe = ShardWorker.probe

    def noted_probe(self):  # run one after the other, the first trial would wait here in vain
        seen.append(connecting.wait(timeout=5) if not seen else None)
        return probe(self)

    made = []

    def make(kind, address=None):
        made.append(_Recording(connecting))
        return made[-1]

    monkeypatch.setattr(ShardWorker, "probe", noted_probe)
    monkeypatch.setattr(_driver, "make_executor", make)
    config = _config(tmp_path / "out")
    assert run(config, stream=None).rows == {"relu1": 40, "conv2": 40}
    assert seen == [True], "the executor connected while the trial sample ran"
    assert run(config, stream=None).new_samples == 0
    assert len(made) == 1, "a rerun with nothing left to do made no executor"


class _Unreachable(_Recording):
    def connect(self):
        raise ConnectionError("no cluster at ray://nowhere:10001")


def _with_executor(monkeypatch, executor):
    from pipeline import _driver

    monkeypatch.setattr(_driver, "make_executor", lambda kind, address=None: executor)


def _failing_trial(monkeypatch, error, threads):
    from pipeline._worker import ShardWorker

    def probe(self):
        threads.append(threading.current_thread().name)
        raise error

    monkeypatch.setattr(ShardWorker, "probe", probe)


def test_a_config_error_of_the_trial_comes_before_a_connection_that_fails_too(tmp_path, monkeypatch):
    threads = []
    executor = _Unreachable(threading.Event())
    _with_executor(monkeypatch, executor)
    _failing_trial(monkeypatch, ConfigError("model.layers", "no layer 'conv9'"), threads)
    with pytest.raises(ConfigError, match="conv9") as caught:
        run(_config(tmp_path / "out"), stream=None)
    assert isinstance(caught.value.__cause__, ConnectionError)
    assert threads == ["actmap-trial"] and executor.closed
    assert not (tmp_path / "out" / MANIFEST_PATH).exists(), "nothing written"


def test_a_connection_error_stands_when_the_trial_passes_and_a_trial_error_when_it_connects(tmp_path, monkeypatch):
    _with_executor(monkeypatch, _Unreachable(threading.Event()))
    with pytest.raises(ConnectionError, match="nowhere"):
        run(_config(tmp_path / "out"), stream=None)
    threads = []
    executor = _Recording(threading.Event())
    _with_executor(monkeypatch, executor)
    _failing_trial(monkeypatch, RuntimeError("the model failed"), threads)
    with pytest.raises(RuntimeError, match="the model failed"):
        run(_config(tmp_path / "out2"), stream=None)
    assert threads == ["actmap-trial"] and executor.closed, "the executor it connected is closed"


def test_with_a_local_executor_the_trial_runs_in_the_drivers_own_thread(tmp_path, monkeypatch):
    from pipeline._worker import ShardWorker

    threads, probe = [], ShardWorker.probe

    def noted(self):
        threads.append(threading.current_thread())
        return probe(self)

    monkeypatch.setattr(ShardWorker, "probe", noted)
    assert run(_config(tmp_path / "out"), stream=None).rows == {"relu1": 40, "conv2": 40}
    assert threads == [threading.main_thread()]  # nothing to overlap: Ctrl-C stops it as any code


class _Interrupted(_Recording):
    def connect(self):
        raise KeyboardInterrupt  # Ctrl-C while Ray starts


def test_an_interrupt_while_connecting_does_not_wait_for_the_trial(tmp_path, monkeypatch):
    from pipeline._worker import ShardWorker

    stuck = threading.Event()  # a trial whose read hangs (a store that does not answer)
    monkeypatch.setattr(ShardWorker, "probe", lambda self: stuck.wait(timeout=60) and {})
    executor = _Interrupted(threading.Event())
    _with_executor(monkeypatch, executor)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            run(_config(tmp_path / "out"), stream=None)
        assert time.monotonic() - started < 30, "the interrupt waited for the trial"
        assert executor.closed
    finally:
        stuck.set()


def test_row_groups_much_larger_than_a_shard_are_warned_of(caplog):
    import types

    from pipeline._driver import _warn_row_groups

    _warn_row_groups(types.SimpleNamespace(largest_row_group=10_000), 256)
    assert "row groups hold up to 10000 rows, run.shard_size is 256: a shard that starts inside" in caplog.text
    caplog.clear()
    _warn_row_groups(types.SimpleNamespace(largest_row_group=1_000), 256)  # within 4 shards: nothing to say
    _warn_row_groups(object(), 256)  # a source without row groups
    assert not caplog.text


def test_a_seed_of_32_bits_or_more_is_said_to_give_the_weights_of_its_low_bits(tmp_path, caplog):
    """torch's generator uses a seed's low 32 bits: seed 2**32 + 5 builds the weights of seed 5."""
    config = _config(tmp_path / "big", model={"seed": 2**32 + 5}, source={"count": 8})
    run(config, stream=None)
    assert "model.seed 4294967301: torch's generator uses the low 32 bits of a seed, so the weights are those of " \
           "seed 5" in caplog.text
    run(_config(tmp_path / "small", model={"seed": 5}, source={"count": 8}), stream=None)
    assert np.array_equal(read_layer(str(tmp_path / "big"), "conv2"), read_layer(str(tmp_path / "small"), "conv2"))


def test_storage_that_goes_away_fails_a_shard_that_waits_and_then_finishes(tmp_path, s3, caplog):
    endpoint = s3.split("&")[0].rsplit(":", 1)[1]
    with Outage(int(endpoint)) as relay, caplog.at_level("WARNING"):
        out = f"s3://bucket/out?{s3.replace(endpoint, str(relay.port), 1)}"
        config = _config(out, source=_dataset("Slow", n=200, size=8, delay=0.02),
                         run={"actors": 1, "shard_size": 4, "retry_delay": 2})

        def failures() -> list[str]:
            return [r.getMessage() for r in list(caplog.records) if "failed:" in r.getMessage()]

        def away():  # from the first shard done until a shard has failed (and waits), no storage
            fs, _ = pafs.FileSystem.from_uri(out)
            while not fs.get_file_info(pafs.FileSelector("bucket/out/_actmap/shards", allow_not_found=True)):
                time.sleep(0.05)
            relay.down()
            deadline = time.monotonic() + 120
            while not failures() and time.monotonic() < deadline:
                time.sleep(0.05)
            relay.up()

        outage = threading.Thread(target=away)
        outage.start()
        try:
            summary = run(config, stream=None)
        finally:
            outage.join()
        assert read_table(out, "conv2").column("index").to_pylist() == list(range(200))
    assert failures() and all("trying it again in 2 s (try 2 of 3)" in m for m in failures()), failures()
    assert summary.rows == {"relu1": 200, "conv2": 200} and summary.bad == []


@pytest.mark.parametrize("model, kept", [({"layers": ["relu"]}, 1), ({"layers": ["relu"], "stop_early": False}, 2),
                                         ({"layers": ["relu", "conv2"]}, 1), ({"layers": ["relu", "out"]}, 2),
                                         ({"layers": ["relu"], "mode": "stump"}, 1)])
def test_a_layer_that_runs_twice_in_a_forward_is_said_with_the_call_stored(tmp_path, caplog, model, kept):
    config = _config(tmp_path / "out", model={"name": "support.models:twice", **model}, dump={"dtype": "float32"})
    run(config, stream=None)
    said = [r.getMessage() for r in caplog.records if "runs 2 times in a forward" in r.getMessage()]
    assert said == [f"layer 'relu' runs 2 times in a forward of the model, and this run stores the output of its "
                    f"call {kept} of 2; which call is stored changes with model.mode, model.stop_early and the other "
                    "layers dumped: dump a layer that runs once to be sure which output it is (`actmap layers MODEL "
                    "--input-size ...` counts the calls)"]
    x, m = _direct_input(config), build_model(config.model)
    with torch.no_grad():
        first = m.relu(m.conv1(x))
        expected = first if kept == 1 else m.relu(m.conv2(first))
    np.testing.assert_allclose(read_layer(config.run.output, "relu"), expected.numpy(), atol=1e-5)


def test_a_model_whose_later_part_fails_on_the_input_is_dumped_up_to_a_layer_before_it(tmp_path, caplog):
    """The trial's count of each wanted layer's calls runs the whole forward; a head that cannot
    take the input may fail it, as long as the layers dumped come first."""
    config = _config(tmp_path / "out", model={"name": "support.models:fixed_head", "layers": ["relu"]},
                     source={"count": 8, "image_size": 8}, dump={"dtype": "float32"})
    summary = run(config, stream=None)
    assert summary.rows == {"relu": 8}
    x, m = _direct_input(config), build_model(config.model)
    with torch.no_grad():
        np.testing.assert_allclose(read_layer(config.run.output, "relu"), m.relu(m.conv(x)).numpy(), atol=1e-6)
