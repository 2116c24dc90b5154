from pathlib import Path

import pytest

from pipeline._layout import MANIFEST_PATH, shard_record_path
from pipeline._manifest import completed_shards, new_manifest, prepare_output
from pipeline._records import ShardRecord
from pipeline._store import OutputStore
from pipeline.config import Config
from pipeline.errors import OutputConflictError

MODEL = {"name": "resnet18", "weights_sha256": "abc"}
SOURCE = {"kind": "generated", "count": 10}


def _manifest(**run):
    return new_manifest(Config.from_dict({"run": run}), MODEL, SOURCE, 10)


def test_new_folder_gets_the_manifest(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    assert prepare_output(store, _manifest(shard_size=4)) == {}
    doc = store.read_json(MANIFEST_PATH)
    assert doc["plan"] == {"samples": 10, "shard_size": 4, "shards": 3}
    assert doc["model"] == MODEL and doc["source"] == SOURCE


def _record(store, shard, files):
    for f in files:
        Path(store.path(f)).parent.mkdir(parents=True, exist_ok=True)
        Path(store.path(f)).write_bytes(b"x")
    store.write_json(shard_record_path(shard), ShardRecord(shard, 0, 1, files={"l": f for f in files}).to_dict())


def test_resume_returns_the_shards_done(tmp_path):
    store = OutputStore(str(tmp_path))
    prepare_output(store, _manifest())
    _record(store, 0, ["layer=l/part-00000.parquet"])
    store.write_json(shard_record_path(1), ShardRecord(1, 1, 2, files={"l": "layer=l/part-00001.parquet"}).to_dict())
    # shard 1's file is missing: it is redone
    assert set(prepare_output(store, _manifest(actors=3))) == {0}
    assert set(completed_shards(store)) == {0}


def test_other_run_is_refused_with_the_difference(tmp_path):
    store = OutputStore(str(tmp_path))
    prepare_output(store, _manifest())
    other = new_manifest(Config.from_dict({"model": {"layers": ["layer2"]}}), MODEL, SOURCE, 10)
    with pytest.raises(OutputConflictError) as info:
        prepare_output(store, other)
    message = str(info.value)
    assert "holds a dump of another run" in message and "--overwrite" in message
    assert 'config: model.layers: ["layer3", "layer4"] -> ["layer2"]' in message
    assert store.exists(MANIFEST_PATH)


def test_changed_weights_are_refused(tmp_path):
    store = OutputStore(str(tmp_path))
    prepare_output(store, _manifest())
    other = new_manifest(Config(), {**MODEL, "weights_sha256": "def"}, SOURCE, 10)
    with pytest.raises(OutputConflictError, match='model: weights_sha256: "abc" -> "def"'):
        prepare_output(store, other)


def test_overwrite_clears_the_old_dump(tmp_path):
    store = OutputStore(str(tmp_path))
    prepare_output(store, _manifest())
    _record(store, 0, ["layer=l/part-00000.parquet"])
    other = new_manifest(Config.from_dict({"model": {"layers": ["layer2"]}}), MODEL, SOURCE, 10)
    assert prepare_output(store, other, overwrite=True) == {}
    assert not (tmp_path / "layer=l").exists()
    assert store.read_json(MANIFEST_PATH)["identity"]["model"]["layers"] == ["layer2"]


def test_foreign_files_are_never_touched(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    store = OutputStore(str(tmp_path))
    for overwrite in (False, True):
        with pytest.raises(OutputConflictError, match=r"holds files that are not an actmap dump \(thesis.tex\)"):
            prepare_output(store, _manifest(), overwrite=overwrite)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_output_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        prepare_output(OutputStore(str(tmp_path / "f")), _manifest())
