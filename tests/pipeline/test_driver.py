"""End to end on a local Ray: the dump equals a direct forward, exactly once, and survives
interruptions, dead actors and reruns."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pipeline import read_layer, read_table, run
from pipeline.config import Config
from pipeline.errors import BadSampleError, OutputConflictError
from pipeline._layout import SHARDS_DIR
from pipeline.models import build_model
from pipeline.sources import open_source

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _config(out, **sections):
    data = {"model": {"name": "support.models:tiny", "layers": ["relu1", "conv2"]},
            "source": {"count": 40, "image_size": 16},
            "run": {"output": str(out), "batch_size": 4, "shard_size": 8, "actors": 2}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return Config.from_dict(data)


def _direct(config):
    model = build_model(config.model)
    samples = open_source(config.source).read(range(len(open_source(config.source))))
    x = torch.stack([s.image for s in samples])
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    if config.source.preprocess.mean_std() is not None:
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in config.source.preprocess.mean_std())
        x = (x - mean) / std
    with torch.no_grad():
        relu1 = model.relu1(model.conv1(x))
        return {"relu1": relu1, "conv2": model.conv2(relu1)}


def _assert_complete(config, expected):
    for layer, values in expected.items():
        table = read_table(config.run.output, layer)
        assert table.column("index").to_pylist() == list(range(len(values)))
        assert len(set(table.column("sample_id").to_pylist())) == len(values)
        np.testing.assert_allclose(read_layer(config.run.output, layer), values.numpy(), rtol=1e-3, atol=1e-3)


def test_dump_equals_a_direct_forward_exactly_once(tmp_path):
    config = _config(tmp_path / "out")
    summary = run(config, stream=None)
    assert summary.rows == {"relu1": 40, "conv2": 40}
    assert summary.shards == 5 and summary.resumed == 0 and summary.actors == 2 and summary.bad == []
    _assert_complete(config, _direct(config))
    records = sorted((tmp_path / "out" / SHARDS_DIR).glob("*.json"))
    assert len(records) == 5
    assert "40 samples, 2 layer(s)" in summary.format()
    assert not list((tmp_path / "out").rglob(".*.tmp"))


def test_rerun_resumes_and_equals_an_uninterrupted_run(tmp_path):
    out = tmp_path / "out"
    config = _config(out)
    run(config, stream=None)
    before = {layer: read_layer(str(out), layer) for layer in ("relu1", "conv2")}
    # an interruption: two shards never finished (no record; one left a temporary file)
    for shard in (1, 3):
        (out / SHARDS_DIR / f"{shard:05d}.json").unlink()
        (out / f"layer=conv2/part-{shard:05d}.parquet").unlink()
    (out / "layer=conv2/.part-00003.parquet.deadbeef.tmp").write_bytes(b"half")
    stamp = (out / "layer=relu1/part-00000.parquet").stat().st_mtime_ns
    summary = run(_config(out, run={"actors": 1, "batch_size": 3}), stream=None)
    assert summary.resumed == 3 and summary.new_samples == 16
    assert (out / "layer=relu1/part-00000.parquet").stat().st_mtime_ns == stamp
    for layer, values in before.items():
        assert np.array_equal(read_layer(str(out), layer), values)
    assert not list(out.rglob(".*.tmp")), "the interrupted write's temporary file is cleared"
    assert run(config, stream=None).new_samples == 0


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


def test_dead_actor_loses_nothing(tmp_path):
    marker = tmp_path / "died"
    config = _config(tmp_path / "out", run={"actors": 1},
                     source={"kind": "dataset", "target": "support.datasets:DiesOnce",
                             "kwargs": {"n": 24, "size": 8, "die_at": 13, "marker": str(marker)},
                             "preprocess": {"normalize": "none"}})
    summary = run(config, stream=None)
    assert marker.exists(), "the actor should have died once"
    assert summary.rows == {"relu1": 24, "conv2": 24} and summary.bad == []
    table = read_table(config.run.output, "conv2")
    assert table.column("index").to_pylist() == list(range(24))
    assert table.column("label").to_pylist() == [i % 3 for i in range(24)]


def test_bad_samples_are_reported_and_strict_mode_fails_fast(tmp_path):
    source = {"kind": "dataset", "target": "support.datasets:Squares", "kwargs": {"n": 24, "size": 8, "bad": 17},
              "preprocess": {"normalize": "none"}}
    summary = run(_config(tmp_path / "lenient", source=source), stream=None)
    assert summary.bad == [{"index": 17, "sample_id": "17", "reason": "ValueError: item 17 is corrupt"}]
    assert summary.rows["conv2"] == 23
    assert "17 (index 17): ValueError: item 17 is corrupt" in summary.format()
    strict = _config(tmp_path / "strict", source=source, run={"strict": True, "actors": 1})
    with pytest.raises(BadSampleError, match="item 17 is corrupt"):
        run(strict, stream=None)
    # the shards before the bad one are kept
    done = sorted(p.name for p in (tmp_path / "strict" / SHARDS_DIR).glob("*.json"))
    assert "00000.json" in done and "00002.json" not in done


def test_killed_driver_is_resumed_by_the_same_command(tmp_path, ray_cluster):
    out = tmp_path / "out"
    # 20 shards of 8 samples that take 0.05 s each to read: about 8 s of work to interrupt
    source = {"kind": "dataset", "target": "support.datasets:Slow", "kwargs": {"n": 160, "size": 16, "delay": 0.05},
              "preprocess": {"normalize": "none"}}
    args = [sys.executable, "-m", "pipeline", "run", "--quiet",
            "--set", "model.name=support.models:tiny", "--set", "model.layers=[relu1]",
            "--set", f"source={json.dumps(source)}", "--set", "run.shard_size=8",
            "--set", "run.actors=1", "--set", "run.batch_size=2", "--set", f"run.output={out}"]
    # the driver process joins the test cluster; its actors die with it
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / SHARDS_DIR).glob("*.json"))) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list((out / SHARDS_DIR).glob("*.json")))
    assert 3 <= finished < 20, "the driver should have been killed mid-run"
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"({finished} already done)" in done.stderr or "already done" in done.stderr
    config = _config(out, source=source, model={"layers": ["relu1"]})
    _assert_complete(config, {"relu1": _direct(config)["relu1"]})


def test_strict_failure_with_shards_in_flight_names_the_bad_sample(tmp_path, capsys):
    from pipeline.cli import main

    source = {"kind": "dataset", "target": "support.datasets:Squares", "kwargs": {"n": 32, "size": 8, "bad": 20},
              "preprocess": {"normalize": "none"}}
    code = main(["run", "--quiet", "--set", "model.name=support.models:tiny", "--set", "model.layers=[conv2]",
                 "--set", f"source={json.dumps(source)}", "--set", "run.strict=true", "--set", "run.actors=1",
                 "--set", "run.shard_size=4", "--set", "run.batch_size=2", "--set", f"run.output={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 1
    assert "BadSampleError: sample '20' (index 20): ValueError: item 20 is corrupt" in err
    assert "rerun the same command to resume" in err
