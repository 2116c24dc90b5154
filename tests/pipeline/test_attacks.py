"""Attacks of a hostile but realistic user, each made for real through the command line: real
files, real processes, real kills. Each test states what the output holds afterwards and that
nothing was lost or duplicated. They run on the local executor (no Ray), but for those about
Ray's actors, which share the session's local Ray.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import inspect_dump, read_layer, read_table
from pipeline._layout import LOCK_PATH, MANIFEST_PATH, SHARDS_DIR, layer_file, shard_record_path
from pipeline.cli import main
from pipeline.errors import DamagedDumpError

#: A small dump: 40 generated images, 5 shards of 8, two layers of the tiny model, no Ray.
BASE = {"model.name": "support.models:tiny", "model.layers": "[relu1,conv2]", "source.count": 40,
        "source.image_size": 16, "run.shard_size": 8, "run.batch_size": 4, "run.executor": "local"}


def _args(out, *extra, **keys):
    settings = {**BASE, **keys, "run.output": str(out)}
    return ["run", "--quiet", *(a for k, v in settings.items() for a in ("--set", f"{k}={v}")), *extra]


def _cli(capsys, *args):
    """``actmap ARGS`` in this process: its exit status and its stderr (warnings go to the log,
    which pytest captures: ``caplog``)."""
    code = main(list(args))
    return code, capsys.readouterr().err


def _files(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())


def _exactly_once(out, layer, samples, bad=()):
    """Every sample but the ``bad`` ones, once, in index order, and ``inspect`` agrees."""
    indices = read_table(str(out), layer, columns=["index"]).column("index").to_pylist()
    assert indices == [i for i in range(samples) if i not in bad]
    info = inspect_dump(str(out))
    assert info.complete and not info.damage, info.format()


# -- 1. --overwrite deletes only what actmap wrote ----------------------------------------------------


def test_a_folder_of_hidden_entries_is_refused_before_the_first_run(tmp_path, capsys):
    out = tmp_path / "out"
    (out / ".git").mkdir(parents=True)
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / ".env").write_text("TOKEN=secret\n")
    for extra in ((), ("--overwrite",)):
        code, err = _cli(capsys, *_args(out, *extra))
        assert code == 2
        assert f"run.output: '{out}' holds files that are not an actmap dump (.env, .git); choose an empty" in err
        assert _files(out) == [".env", ".git/HEAD"], "nothing written, nothing deleted"


def test_overwrite_keeps_what_was_put_next_to_a_dump(tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli(capsys, *_args(out))[0] == 0
    mine = {"notes.txt": "mine", "probe_results/probe.csv": "0.93", ".env": "x=1", "layer=relu1/README": "mine"}
    for name, text in mine.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    code, err = _cli(capsys, *_args(out, "--overwrite", **{"model.layers": "[conv1]"}))
    assert code == 0, err
    assert {name: (out / name).read_text() for name in mine} == mine
    assert not (out / "layer=conv2").exists() and _files(out / "layer=relu1") == ["README"]
    _exactly_once(out, "conv1", 40)
    # a resume leaves them alone too
    assert _cli(capsys, *_args(out, **{"model.layers": "[conv1]"}))[0] == 0
    assert {name: (out / name).read_text() for name in mine} == mine


# -- 2. damaged output is found, redone, and refused by the readers -----------------------------------


def test_damaged_files_are_named_refused_by_readers_and_redone_by_a_rerun(tmp_path, capsys, caplog):
    out = tmp_path / "out"
    args = _args(out, **{"dump.compression": "none"})
    assert _cli(capsys, *args)[0] == 0
    before = read_layer(str(out), "conv2")
    # one part file replaced by a copy of another of the same size, one cut short; their records stay
    copy, cut = out / layer_file("conv2", 4), out / layer_file("relu1", 2)
    assert copy.stat().st_size == (out / layer_file("conv2", 3)).stat().st_size
    shutil.copy(out / layer_file("conv2", 3), copy)
    cut.write_bytes(cut.read_bytes()[:-300])
    with pytest.raises(DamagedDumpError) as info:
        read_layer(str(out), "conv2")
    assert "layer=conv2/part-00004.parquet: holds indices 24-31, its record says 32-39" in str(info.value)
    assert "Rerun the command that made it: the rerun checks every file, redoes those shards" in str(info.value)
    with pytest.raises(DamagedDumpError, match="layer=relu1/part-00002.parquet: .* bytes, its record says"):
        read_table(str(out), "relu1")
    code = main(["inspect", str(out)])
    text = capsys.readouterr().out
    assert code == 3 and "shards: 3/5 done, DAMAGED" in text
    assert "  layer=conv2/part-00004.parquet: holds indices 24-31, its record says 32-39\n" in text
    assert "  layer=relu1/part-00002.parquet: " in text
    code, err = _cli(capsys, *args)
    assert code == 0, err
    assert "shard 4 is redone: layer=conv2/part-00004.parquet: holds indices 24-31" in caplog.text
    assert "shard 2 is redone: layer=relu1/part-00002.parquet" in caplog.text
    assert "5 shards (3 already done)" in err
    np.testing.assert_array_equal(read_layer(str(out), "conv2"), before)
    for layer in ("relu1", "conv2"):
        _exactly_once(out, layer, 40)


def test_a_page_changed_in_place_is_named_by_the_readers_and_inspect_verify(tmp_path, capsys):
    """One byte flipped inside a page: size and footer hold, so only the page checksums tell."""
    out = tmp_path / "out"
    args = _args(out, **{"dump.compression": "none"})
    assert _cli(capsys, *args)[0] == 0
    before = read_layer(str(out), "conv2")
    path = out / layer_file("conv2", 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    advice = ("layer=conv2/part-00001.parquet: a page does not read back as written (OSError: could not verify "
              "page integrity, CRC checksum verification failed")
    with pytest.raises(DamagedDumpError, match=re.escape(advice)) as info:
        read_layer(str(out), "conv2")
    assert "delete its shard's record (_actmap/shards/00001.json) and rerun the same command" in str(info.value)
    from pipeline import ActivationDataset

    rows = ActivationDataset(str(out), "conv2")
    rows[0]  # another file: fine
    with pytest.raises(DamagedDumpError, match=re.escape(advice)):
        for i in range(8, 16):  # the file's row groups, one of which holds the page
            rows[i]
    assert main(["inspect", str(out), "--verify"]) == 3
    assert advice in capsys.readouterr().out
    (out / shard_record_path(1)).unlink()
    code, err = _cli(capsys, *args)
    assert code == 0 and "5 shards (4 already done)" in err
    np.testing.assert_array_equal(read_layer(str(out), "conv2"), before)
    assert main(["inspect", str(out), "--verify"]) == 0


def test_inspect_proves_each_sample_is_there_once(tmp_path, capsys):
    """A file rewritten with its own shard's indices, one row twice and one missing, keeps its
    size, rows and first and last index: only the index column shows it."""
    out = tmp_path / "out"
    assert _cli(capsys, *_args(out, **{"dump.compression": "none"}))[0] == 0
    path = out / layer_file("conv2", 1)
    table = pq.read_table(path)
    doctored = table.set_column(1, "index", pa.array([8, 9, 9, 11, 12, 13, 14, 15], pa.int64()))
    pq.write_table(doctored, path, compression="none", use_dictionary=False, write_statistics=["sample_id", "index"])
    record = json.loads((out / shard_record_path(1)).read_text())
    record["bytes"]["conv2"] = path.stat().st_size  # a forger who also mends the record's size
    (out / shard_record_path(1)).write_text(json.dumps(record))
    info = inspect_dump(str(out))
    assert not info.complete
    assert info.damage == ["layer=conv2/part-00001.parquet: holds 1 indices more than once (9)",
                           "layer=conv2/part-00001.parquet: lacks 1 of its shard's samples (10)"]


# -- 9. config values checked before anything is written ----------------------------------------------


@pytest.mark.parametrize("key, value, message", [
    ("source.preprocess.normalize", "{mean: [0.5, 0.5, 0.5], std: [1, 1, .nan]}",
     "source.preprocess.normalize.std: expected three finite numbers, got [1, 1, nan]"),
    ("source.preprocess.normalize", "{mean: [a, 0.5, 0.5], std: [1, 1, 1]}",
     "source.preprocess.normalize.mean: expected three finite numbers, got ['a', 0.5, 0.5]"),
    ("source.preprocess.normalize", "{mean: [0, 0, .inf], std: [1, 1, 1]}",
     "source.preprocess.normalize.mean: expected three finite numbers, got [0, 0, inf]"),
    ("run.gpus_per_actor", ".nan", "run.gpus_per_actor: expected a finite number, got nan"),
    ("run.cpus_per_actor", ".inf", "run.cpus_per_actor: expected a finite number, got inf"),
    ("run.cpus_per_actor", "-1", "run.cpus_per_actor: must be more than 0, got -1"),
    ("run.start_timeout", "0", "run.start_timeout: must be more than 0, got 0"),
    ("source.image_size", "100000", "source.image_size: 100000x100000 = 10,000,000,000 pixels, over "
                                    "source.preprocess.max_pixels (89,478,485); ask for less, or raise that limit"),
    ("source.preprocess.resize", "20000", "source.preprocess.resize: 20000x20000 = 400,000,000 pixels, over "
                                          "source.preprocess.max_pixels"),
])
def test_bad_numbers_exit_2_naming_the_key_before_anything_is_written(tmp_path, capsys, key, value, message):
    out = tmp_path / "out"
    code, err = _cli(capsys, *_args(out, **{key: value}))
    assert code == 2 and f"actmap: error: {message}" in err
    assert not out.exists()


def test_an_output_that_is_a_file_or_cannot_be_opened_exits_2(tmp_path, capsys):
    out = tmp_path / "results.csv"
    out.write_text("a,b\n")
    code, err = _cli(capsys, *_args(out))
    assert code == 2
    assert f"run.output: '{out}' is a file, not a folder; give a folder" in err
    code, err = _cli(capsys, *_args(out / "dump" / "here"))
    assert code == 2
    assert f"run.output: '{out}/dump/here' lies under '{out}', which is a file, not a folder; give a folder" in err
    assert out.read_text() == "a,b\n"
    code, err = _cli(capsys, *_args("nosuchfs://bucket/dump"))
    assert code == 2 and "run.output: cannot use 'nosuchfs://bucket/dump': " in err


# -- 11. absurd sizes ------------------------------------------------------------------------------


def test_an_absurd_source_size_is_refused_at_once_in_flat_memory(tmp_path):
    """``source.count: 100000000000``: before, the shard list grew the driver to 24 GB."""
    # the peak of that process alone: its ru_maxrss starts at the peak of the process that started
    # it, this test process, which the guide's Mask R-CNN doctest may have grown by GBs
    code = ("import sys; from pipeline.cli import main; from pipeline._metrics import peak_rss_mb; "
            "status = main(sys.argv[1:]); print('peak MB', int(peak_rss_mb())); sys.exit(status)")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, *_args(tmp_path / "out", **{"source.count": 100_000_000_000})],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert ("run.shard_size: 100,000,000,000 samples in shards of 8 make 12,500,000,000 shards, more than the "
            "1,000,000 a run takes") in done.stderr
    assert "set run.shard_size to at least 100,000" in done.stderr
    assert int(done.stdout.split()[-1]) < 1500, done.stdout  # torch and the model: a few hundred MB
    assert time.monotonic() - started < 120
    assert not (tmp_path / "out").exists()


# -- 12. a corrupt record or manifest ----------------------------------------------------------------


def test_a_corrupt_manifest_is_named_with_what_to_do(tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli(capsys, *_args(out))[0] == 0
    (out / MANIFEST_PATH).write_text((out / MANIFEST_PATH).read_text()[:100])
    code, err = _cli(capsys, *_args(out))
    assert code == 2
    assert f"{out}/_actmap/manifest.json cannot be read (JSONDecodeError: " in err
    assert "Rerun with --overwrite to replace the dump" in err and "rerun to resume" not in err
    assert main(["inspect", str(out)]) == 3
    assert "manifest.json cannot be read" in capsys.readouterr().err
    code, err = _cli(capsys, *_args(out, "--overwrite"))
    assert code == 0, err
    _exactly_once(out, "conv2", 40)


def test_a_corrupt_record_is_named_and_its_shard_redone(tmp_path, capsys, caplog):
    out = tmp_path / "out"
    assert _cli(capsys, *_args(out))[0] == 0
    (out / shard_record_path(4)).write_text('{"shard": 4, "start": 32, "st')
    code = main(["inspect", str(out)])
    text = capsys.readouterr().out
    assert code == 3 and "_actmap/shards/00004.json: the record cannot be read (JSONDecodeError" in text
    with pytest.raises(DamagedDumpError, match="_actmap/shards/00004.json: the record cannot be read"):
        read_layer(str(out), "conv2")
    code, err = _cli(capsys, *_args(out))
    assert code == 0 and "shard 4 is redone: _actmap/shards/00004.json: the record cannot be read" in caplog.text
    assert "5 shards (4 already done)" in err
    _exactly_once(out, "conv2", 40)


def test_a_damaged_source_index_is_written_again_on_resume(tmp_path, capsys, caplog):
    """The workers number the samples by ``_actmap/source-index.parquet``: cut short, it would
    stop every rerun; the source is unchanged (the manifest says so), so its listing replaces it."""
    from pipeline._layout import SOURCE_INDEX_PATH

    _images(tmp_path / "images", [f"{i:02d}.png" for i in range(20)])
    out = tmp_path / "out"
    args = _args(out, **{"source": json.dumps({"kind": "folder", "path": str(tmp_path / "images")})})
    assert _cli(capsys, *args)[0] == 0
    for shard in (1, 2):
        (out / shard_record_path(shard)).unlink()
    index = out / SOURCE_INDEX_PATH
    index.write_bytes(index.read_bytes()[:50])
    code, err = _cli(capsys, *args)
    assert code == 0, err
    assert f"{index} holds unreadable (" in caplog.text and "written again from the source" in caplog.text
    assert "3 shards (1 already done)" in err
    _exactly_once(out, "conv2", 20)


def test_a_stray_part_file_is_named_and_deleted_by_the_rerun(tmp_path, capsys, caplog):
    # named as the dump's own data file, of a shard no run of this dump writes: the rerun the
    # readers' error prescribes deletes it (it had only named it, and the readers went on refusing)
    out = tmp_path / "out"
    assert _cli(capsys, *_args(out))[0] == 0
    shutil.copy(out / layer_file("conv2", 0), out / layer_file("conv2", 7))
    with pytest.raises(DamagedDumpError, match="layer=conv2/part-00007.parquet: shard 7 is not in the plan of 5"):
        read_layer(str(out), "conv2")
    assert _cli(capsys, *_args(out))[0] == 0
    assert ("layer=conv2/part-00007.parquet: shard 7 is not in the plan of 5 shards: no shard of this dump writes "
            "it; deleted") in caplog.text
    assert not (out / layer_file("conv2", 7)).exists()
    _exactly_once(out, "conv2", 40)


def test_a_dump_without_its_manifest_reads_only_the_files_its_records_vouch_for(tmp_path, capsys):
    # without the plan a stray copy of a part file had its rows read twice, and the file of a
    # shard whose record is gone was read too
    out = tmp_path / "out"
    assert _cli(capsys, *_args(out))[0] == 0
    (out / MANIFEST_PATH).unlink()
    shutil.copy(out / layer_file("conv2", 0), out / layer_file("conv2", 7))
    (out / shard_record_path(1)).unlink()
    indices = read_table(str(out), "conv2", columns=["index"]).column("index").to_pylist()
    assert indices == [i for i in range(40) if not 8 <= i < 16]


def test_a_layer_whose_files_are_all_gone_is_damage_and_a_missing_folder_is_said(tmp_path, capsys):
    from pipeline.errors import UnknownDumpLayerError

    out = tmp_path / "out"
    assert _cli(capsys, *_args(out))[0] == 0
    shutil.rmtree(out / "layer=conv2")
    with pytest.raises(DamagedDumpError, match=r"layer=conv2/part-00000.parquet: .*missing"):
        read_layer(str(out), "conv2")  # (it had said that no shard of the layer was finished yet)
    with pytest.raises(UnknownDumpLayerError, match="holds no rows of layer 'conv2'; it is empty or does not exist"):
        read_layer(str(tmp_path / "nowhere"), "conv2")


# -- smaller ---------------------------------------------------------------------------------------


def test_a_no_op_rerun_reports_no_rate(tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli(capsys, *_args(out))[0] == 0
    code, err = _cli(capsys, *_args(out))
    assert code == 0 and "5 shards, all already done: nothing to do" in err
    assert "MB/s" not in err and "samples/s" not in err


def test_after_an_error_a_rerun_cannot_mend_it_says_so(tmp_path, capsys):
    """A shard that keeps failing the same way: the advice is to change the config, not to rerun."""
    source = {"kind": "dataset", "target": "support.datasets:Fails", "preprocess": {"normalize": "none"},
              "kwargs": {"n": 24, "size": 8, "at": 13, "log": str(tmp_path / "reads"), "times": 99}}
    code, err = _cli(capsys, *_args(tmp_path / "out", **{"source": json.dumps(source), "dump.shapes": "fixed",
                                                           "run.max_attempts": 2}))
    assert code == 1 and "gave outputs of shape" in err
    assert "a rerun of the same config fails the same way" in err and "rerun the same command to resume" not in err


# -- 4. two runs on one output at once -----------------------------------------------------------

#: ``actmap`` in a process of its own.
ACTMAP = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"]


def _gated(out, gate):
    """A run of 40 samples in 5 shards whose sample 20 (shard 2) waits for the file ``gate``."""
    source = {"kind": "dataset", "target": "support.datasets:Gated", "preprocess": {"normalize": "none"},
              "kwargs": {"n": 40, "size": 16, "at": 20, "gate": str(gate)}}
    return [*ACTMAP, *_args(out, **{"source": json.dumps(source), "run.actors": 1})]


def _records(out):
    return len(list((Path(out) / SHARDS_DIR).glob("*.json")))


def _wait_for(condition, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_second_run_on_a_live_dump_is_refused_naming_the_first(tmp_path):
    out, gate = tmp_path / "out", tmp_path / "gate"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(_gated(out, gate), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: _records(out) >= 2, "the first run's shards")
        owner = json.loads((out / LOCK_PATH).read_text())
        assert owner["pid"] == first.pid
        assert f"INCOMPLETE (a run is at work on it: host {owner['host']}, process {first.pid}, " in \
            inspect_dump(str(out)).format()
        second = subprocess.run(_gated(out, gate), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert f"is in use by another run (host {owner['host']}, process {first.pid}, started " in second.stderr
        gate.touch()
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    log = (tmp_path / "first.log").read_text()
    assert "failed" not in log and "lost" not in log, "the second run took nothing from the first"
    assert "5 shards (0 already done)" in log
    assert not (out / LOCK_PATH).exists() and not list(out.rglob(".*.tmp"))
    _exactly_once(out, "conv2", 40)


def test_sigterm_stops_a_run_as_ctrl_c_does_and_lets_go_of_its_lock(tmp_path):
    # (ray job stop, a scheduler's preemption) the run was killed outright: its lock stayed, and a
    # rerun on another host waited for the lease to end
    out = tmp_path / "out"
    source = {"kind": "dataset", "target": "support.datasets:Slow", "preprocess": {"normalize": "none"},
              "kwargs": {"n": 40, "size": 16, "delay": 0.2}}  # 4 s of reads on the 2 lanes
    command = [*ACTMAP, *_args(out, **{"source": json.dumps(source), "run.actors": 1})]
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: _records(out) >= 1, "the first shard")
        first.send_signal(signal.SIGTERM)
        err = first.communicate(timeout=120)[1]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 128 + signal.SIGTERM, err
    assert "actmap: terminated (SIGTERM); rerun the same command to resume" in err
    assert not (out / LOCK_PATH).exists() and not list(out.rglob(".*.tmp"))
    assert _records(out) < 5
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "taking over the lock" not in rerun.stderr
    _exactly_once(out, "conv2", 40)


def test_a_killed_runs_lock_is_taken_over_by_its_rerun(tmp_path):
    out, gate = tmp_path / "out", tmp_path / "gate"
    first = subprocess.Popen(_gated(out, gate), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    _wait_for(lambda: _records(out) >= 2, "the first run's shards")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert json.loads((out / LOCK_PATH).read_text())["pid"] == first.pid, "a killed run leaves its lock"
    done = _records(out)
    gate.touch()
    rerun = subprocess.run(_gated(out, gate), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"taking over the lock of a run that ended without releasing it (host " in rerun.stderr
    assert f"process {first.pid}," in rerun.stderr
    assert f"5 shards ({done} already done)" in rerun.stderr
    assert not (out / LOCK_PATH).exists() and not list(out.rglob(".*.tmp"))
    _exactly_once(out, "conv2", 40)


# -- 10. actors the cluster cannot hold (the session's local Ray: 4 CPUs, no GPU) -----------------------


def _ray(out, **keys):
    return _args(out, **{"run.executor": "ray", **keys})


@pytest.fixture
def ray_fixed(ray_cluster):
    """The session's Ray, once its monitor has reported it as a cluster without an autoscaler."""
    from pipeline._ray_executor import autoscaling

    _wait_for(lambda: not autoscaling(), "Ray's monitor to report a cluster without an autoscaler", 60)
    return ray_cluster


@pytest.fixture
def cpus_taken(ray_cluster):
    """Takes ``n`` of the cluster's CPUs with an idle actor, while the test runs."""
    held = []

    def take(n):
        blocker = ray_cluster.remote(num_cpus=n)(_Idle).remote()
        ray_cluster.get(blocker.ready.remote())
        held.append(blocker)
    yield take
    for blocker in held:
        ray_cluster.kill(blocker)


class _Idle:
    def ready(self) -> bool:
        return True


@pytest.mark.parametrize("keys, message", [
    ({"run.actors": 5}, "run.actors: 5 actors of 1 CPU and 0 GPU each, but the cluster has 4 CPUs and 0 GPUs on "
                        "1 node(s), room for 4 of them; set run.actors to at most 4 (or auto), or give each actor less"),
    ({"run.actors": 1, "run.gpus_per_actor": 1}, "run.gpus_per_actor: 1 actors of 1 CPU and 1 GPU each, but the "
                                                 "cluster has 4 CPUs and 0 GPUs on 1 node(s): no node holds one actor"),
    ({"run.cpus_per_actor": 6}, "run.cpus_per_actor: 1 actors of 6 CPU and 0 GPU each"),
])
def test_actors_the_cluster_can_never_hold_are_refused_before_anything_is_written(tmp_path, capsys, ray_fixed,
                                                                                   keys, message):
    out = tmp_path / "out"
    code, err = _cli(capsys, *_ray(out, **keys))
    assert code == 2 and f"actmap: error: {message}" in err
    assert not out.exists(), "nothing written: not even the folder"


@pytest.mark.parametrize("keys, message", [
    ({"run.gpus_per_actor": 1}, "run.gpus_per_actor: 1 GPUs per worker, but this machine has none that torch can "
                                "use (torch.cuda.device_count() is 0); use 0 to run on the CPU"),
    ({"run.gpus_per_actor": 0.5, "run.actors": 2}, "run.gpus_per_actor: 0.5 GPUs per worker, but this machine has "
                                                   "none"),
])
def test_gpus_the_machine_lacks_are_refused_by_the_local_executor_before_anything_is_written(tmp_path, capsys,
                                                                                              keys, message):
    """As the Ray executor refuses actors that no node holds (above): exit 2, the key named."""
    out = tmp_path / "out"
    code, err = _cli(capsys, *_args(out, **keys))
    assert code == 2 and f"actmap: error: {message}" in err
    assert not out.exists(), "nothing written: not even the folder"


def test_the_work_starts_on_the_actors_that_are_up(tmp_path, ray_fixed, cpus_taken, monkeypatch):
    """Another job holds 3 of the 4 CPUs: of 2 actors one comes up, the dump is done on it, and
    the progress line counts the other as pending."""
    import io

    from pipeline import _ray_executor, run
    from pipeline.config import load_config

    # the other actor cannot come up while the test runs: the start waits for it no longer than
    # the first one took (not the 5 s more a cluster that is scaling up gets)
    monkeypatch.setattr(_ray_executor, "STRAGGLERS", 0.0)
    cpus_taken(3)
    progress = io.StringIO()
    config = load_config(None, [a for a in _ray(tmp_path / "out", **{"run.actors": 2})[2:] if a != "--set"])
    summary = run(config, stream=progress)
    assert summary.actors == 1 and summary.rows == {"relu1": 40, "conv2": 40}
    assert "(1 actor pending)" in progress.getvalue()
    _exactly_once(tmp_path / "out", "conv2", 40)


def test_a_run_whose_actors_none_comes_up_stops_saying_why(tmp_path, capsys, ray_fixed, cpus_taken):
    cpus_taken(4)
    code, err = _cli(capsys, *_ray(tmp_path / "out", **{"run.actors": 1, "run.start_timeout": 3}))
    assert code == 1
    assert ("WorkersUnavailableError: no actor came up within 3 s (run.start_timeout): each needs 1 CPU and 0 GPU, "
            "and the cluster has 0 of 4 CPUs, 0 of 0 GPUs free now") in err
    assert "Nothing was lost" in err


# -- 3. the source changes mid-run -------------------------------------------------------------------


def _images(folder, names, size=16):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        pixels = np.random.default_rng(sum(map(ord, name))).integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)


def test_a_source_that_changes_mid_run_cannot_shift_the_samples(tmp_path, ray_cluster):
    """A file added to a folder after some shards are done, then the only actor killed: the
    restarted actor numbers the files by the listing the run started with, the output holds
    each of those files once with its own activations, and a rerun on the changed folder is
    refused."""
    import threading

    from pipeline import run
    from pipeline.config import Config
    from pipeline.errors import OutputConflictError

    names = [f"img-{i:03d}.png" for i in range(48)]
    _images(tmp_path / "images", names)
    shutil.copytree(tmp_path / "images", tmp_path / "frozen")
    data = {"model": {"name": "support.models:slow", "kwargs": {"delay": 0.1}, "layers": ["conv2"]},
            "source": {"kind": "folder", "path": str(tmp_path / "images")},
            "run": {"output": str(tmp_path / "out"), "executor": "ray", "actors": 1, "shard_size": 8, "batch_size": 4}}
    killed = []

    def attack():
        _wait_for(lambda: _records(tmp_path / "out") >= 2, "two shards done")
        _images(tmp_path / "images", ["img-000a.png"])  # sorts second: every later file would shift by one
        record = json.loads(next((tmp_path / "out" / SHARDS_DIR).glob("*.json")).read_text())
        os.kill(record["worker"]["pid"], signal.SIGKILL)
        killed.append((record["worker"]["pid"], _records(tmp_path / "out")))

    attacker = threading.Thread(target=attack)
    attacker.start()
    summary = run(Config.from_dict(data), stream=None)
    attacker.join()
    (pid, done_before), = killed
    assert done_before < 6, "the actor was killed with most of the work left"
    assert summary.rows == {"conv2": 48} and summary.bad == []
    records = [json.loads(p.read_text()) for p in (tmp_path / "out" / SHARDS_DIR).glob("*.json")]
    assert {r["worker"]["pid"] for r in records} - {pid}, "the restarted actor did shards"
    table = read_table(str(tmp_path / "out"), "conv2", columns=["sample_id", "index"])
    assert table.column("sample_id").to_pylist() == names and table.column("index").to_pylist() == list(range(48))
    _exactly_once(tmp_path / "out", "conv2", 48)
    # each row is its own file's: the same as a dump of the folder as it was
    frozen = {**data, "source": {"kind": "folder", "path": str(tmp_path / "frozen")},
              "model": {**data["model"], "kwargs": {"delay": 0.0}},
              "run": {**data["run"], "output": str(tmp_path / "again"), "executor": "local"}}
    run(Config.from_dict(frozen), stream=None)
    np.testing.assert_array_equal(read_layer(str(tmp_path / "out"), "conv2"), read_layer(str(tmp_path / "again"), "conv2"))
    with pytest.raises(OutputConflictError, match="source: files: 48 -> 49"):
        run(Config.from_dict(data), stream=None)


# -- 5, 6, 7: images that used to stop or poison a run ------------------------------------------------


def _header_only_png(width, height):
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with no pixels at all."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_odd_images_in_a_folder_are_converted_or_recorded_with_their_reason(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(images / "a-rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((16, 16), 255, np.uint8)])).save(images / "a-rgba.png")
    grey = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(grey).save(images / "b-8bit.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(images / "b-16bit.png")  # 16 bits a channel: I;16
    frames = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).quantize(16) for _ in range(2)]
    frames[0].save(images / "c-anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.open(images / "c-anim.gif").convert("RGB").save(images / "c-frame0.png")
    (images / "d-bomb.png").write_bytes(_header_only_png(14_000, 14_000))
    (images / "e-garbage.png").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / "f-other-size.png")
    assert Image.open(images / "b-16bit.png").mode == "I;16" and Image.open(images / "c-anim.gif").n_frames == 2
    out = tmp_path / "out"
    code, err = _cli(capsys, *_args(out, **{"source": json.dumps({"kind": "folder", "path": str(images)})}))
    assert code == 0, err
    assert "conv2: 7 rows of variable float16" in err and "bad samples: 2" in err
    assert ("d-bomb.png (index 6): ImageError: the image is 14000x14000 = 196,000,000 pixels, over the limit of "
            "89,478,485 (source.preprocess.max_pixels)") in err
    assert "e-garbage.png (index 7): ImageError: cannot decode the image (4,096 bytes, starting b" in err
    assert "UnidentifiedImageError: not an image format torchvision or PIL reads" in err
    assert "object at 0x" not in err
    table = read_table(str(out), "conv2")
    rows = dict(zip(table.column("sample_id").to_pylist(), read_layer(str(out), "conv2")))
    assert all(np.isfinite(r).all() for r in rows.values())
    np.testing.assert_array_equal(rows["a-rgba.png"], rows["a-rgb.png"])
    np.testing.assert_allclose(rows["b-16bit.png"].astype(np.float32), rows["b-8bit.png"].astype(np.float32), atol=2e-3)
    np.testing.assert_array_equal(rows["c-anim.gif"], rows["c-frame0.png"])
    assert rows["f-other-size.png"].shape == (16, 10, 12)
    _exactly_once(out, "conv2", 9, bad={6, 7})


# -- 8. Parquet ids ------------------------------------------------------------------------------


def test_parquet_ids_null_are_bad_samples_and_repeats_are_reported_or_refused(tmp_path, capsys, caplog):
    def png(seed):
        buffer = __import__("io").BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    keys = ["a", "b", None, "a", "c", "d"]
    pq.write_table(pa.table({"image": [png(i) for i in range(6)], "key": keys}), tmp_path / "t.parquet")
    source = json.dumps({"kind": "parquet", "path": str(tmp_path / "t.parquet"), "id_column": "key"})
    code, err = _cli(capsys, *_args(tmp_path / "strict", **{"source": source, "run.strict": "true"}))
    assert code == 2
    assert "source: 1 sample ids appear more than once (e.g. 'a')" in err and "run.strict is set" in err
    assert not (tmp_path / "strict").exists()
    code, err = _cli(capsys, *_args(tmp_path / "out", **{"source": source}))
    assert code == 0, err
    assert "1 sample ids appear more than once (e.g. 'a')" in caplog.text
    assert "bad samples: 1" in err and "2 (index 2): the id (key) is null" in err
    table = read_table(str(tmp_path / "out"), "conv2")
    assert table.column("sample_id").to_pylist() == ["a", "b", "a", "c", "d"]
    _exactly_once(tmp_path / "out", "conv2", 6, bad={2})


def test_a_sample_the_model_cannot_take_is_a_bad_sample_not_a_failed_run(tmp_path, capsys):
    source = {"kind": "dataset", "target": "support.datasets:WithWhite", "preprocess": {"normalize": "none"},
              "kwargs": {"n": 16, "size": 16, "white": 5}}
    out = tmp_path / "out"
    code, err = _cli(capsys, *_args(out, **{"source": json.dumps(source), "model.name": "support.models:picky"}))
    assert code == 0, err
    assert ("5 (index 5): the model's forward fails on it: ValueError: cannot take an all-white image" in err
            and "bad samples: 1" in err)
    _exactly_once(out, "conv2", 16, bad={5})


@pytest.mark.parametrize("secret", ["se#cret", "se/cret", "se?cret"])
def test_a_password_that_breaks_its_uri_is_not_shown_in_the_error(tmp_path, capsys, secret):
    # pyarrow refuses the URI and quotes it whole: the password must not reach the terminal
    # (or a Ray job's log), and the error says how to write it
    source = _args(tmp_path / "out", **{"source.kind": "parquet", "source.path": f"s3://AKIA:{secret}@bucket/train"})
    for key, args in (("source.path", source), ("run.output", _args(f"s3://AKIA:{secret}@bucket/out"))):
        code, err = _cli(capsys, *args)
        assert code == 2 and f"{key}: cannot use 's3://***@bucket/" in err, err
        assert "cret" not in err and "'#' as %23" in err
    assert not (tmp_path / "out").exists()


def test_the_credentials_of_a_folder_or_table_uri_are_not_shown_in_its_warnings_and_errors(s3, caplog):
    import pyarrow.fs as pafs

    from pipeline._sources import FolderSource, ParquetSource
    from pipeline.errors import ConfigError

    fs, _ = pafs.FileSystem.from_uri(f"s3://data?{s3}")
    fs.create_dir("data")
    for key in ("data/hidden/a/.x.png", "data/table/_SUCCESS"):
        with fs.open_output_stream(key) as f:
            f.write(b"\x89PNG")
    for kind, folder, message in ((FolderSource, "nothere", "does not exist"),
                                  (FolderSource, "hidden", "holds no image files"),
                                  (ParquetSource, "nothere", "does not exist"),
                                  (ParquetSource, "table", "no Parquet file in")):
        with pytest.raises(ConfigError, match=message) as caught:
            kind(f"s3://AKIA:sEcReT@data/{folder}?{s3}")
        assert "sEcReT" not in str(caught.value) and "s3://data/" in str(caught.value)
    assert "left out" in caplog.text and "sEcReT" not in caplog.text


def test_a_secret_query_parameter_cut_by_an_unencoded_hash_is_left_out_whole():
    from pipeline._secrets import redact

    assert redact("s3://bucket/x?endpoint_override=h:9000&secret_key=ab#cd") == "s3://bucket/x?endpoint_override=h:9000"
    assert redact("gs://bucket/a#b") == "gs://bucket/a#b"
