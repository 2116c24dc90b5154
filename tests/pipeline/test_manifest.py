"""The manifest and the output folder: new, resumed, refused, replaced; what a dump owns."""

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline._layout import LOCK_PATH, MANIFEST_PATH, layer_file, shard_record_path
from pipeline._manifest import (completed_shards, foreign_entries, new_manifest, prepare_output, remove_dump,
                                remove_temporaries)
from pipeline._records import ShardRecord
from pipeline._shards import plan_shards
from pipeline._store import OutputStore
from pipeline._writer import LayerFileWriter, build_table
from pipeline.config import Config
from pipeline.errors import OutputConflictError

MODEL = {"name": "resnet18", "weights_sha256": "abc"}
SOURCE = {"kind": "generated", "count": 10}


def _manifest(layers=("l",), **run):
    return new_manifest(Config.from_dict({"model": {"layers": list(layers)}, "run": {"shard_size": 4, **run}}),
                        MODEL, SOURCE, 10)


def _commit(store, shard_id, layer="l"):
    """Write shard ``shard_id``'s file of ``layer`` and its record, as a worker does."""
    shard = plan_shards(10, 4)[shard_id]
    writer = LayerFileWriter(store, shard.file_name(layer), "none")
    indices = list(range(shard.start, shard.stop))
    writer.write(build_table(np.zeros((len(shard), 2), np.float16), sample_ids=[str(i) for i in indices],
                             indices=indices, labels={}, label_fields=[], fixed=True))
    size = writer.commit()
    record = ShardRecord(shard.id, shard.start, shard.stop, rows={layer: len(shard)},
                         files={layer: shard.file_name(layer)}, bytes={layer: size},
                         index_range={layer: writer.index_range})
    store.write_json(shard_record_path(shard.id), record.to_dict())
    return record


def test_new_folder_gets_the_manifest(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    assert prepare_output(store, _manifest()) == {}
    doc = store.read_json(MANIFEST_PATH)
    assert doc["plan"] == {"samples": 10, "shard_size": 4, "shards": 3}
    assert doc["model"] == MODEL and doc["source"] == SOURCE


def test_resume_returns_the_shards_done_and_redoes_those_that_miss_files(tmp_path, caplog):
    store = OutputStore(str(tmp_path))
    prepare_output(store, _manifest())
    first = _commit(store, 0)
    _commit(store, 1)
    (tmp_path / layer_file("l", 1)).unlink()
    assert prepare_output(store, _manifest(actors=3)) == {0: first}
    assert "shard 1 is redone: layer=l/part-00001.parquet: missing" in caplog.text
    assert not (tmp_path / shard_record_path(1)).exists(), "the record of a shard to redo goes"
    assert set(completed_shards(store)) == {0}


def test_other_run_is_refused_with_the_difference(tmp_path):
    store = OutputStore(str(tmp_path))
    prepare_output(store, _manifest())
    with pytest.raises(OutputConflictError) as info:
        prepare_output(store, _manifest(layers=["layer2"]))
    message = str(info.value)
    assert "holds a dump of another run" in message and "--overwrite" in message
    assert 'config: model.layers: ["l"] -> ["layer2"]' in message
    assert store.exists(MANIFEST_PATH)


def test_changed_weights_are_refused(tmp_path):
    store = OutputStore(str(tmp_path))
    prepare_output(store, _manifest())
    other = new_manifest(Config.from_dict({"model": {"layers": ["l"]}, "run": {"shard_size": 4}}),
                         {**MODEL, "weights_sha256": "def"}, SOURCE, 10)
    with pytest.raises(OutputConflictError, match='model: weights_sha256: "abc" -> "def"'):
        prepare_output(store, other)


def test_overwrite_deletes_only_what_the_dump_wrote(tmp_path):
    store = OutputStore(str(tmp_path))
    prepare_output(store, _manifest())
    _commit(store, 0)
    (tmp_path / "layer=l" / ".part-00001.parquet.0123456789ab.tmp").write_bytes(b"cut short")
    mine = {"notes.txt": "mine", ".env": "SECRET=1", "probe_results/a.csv": "1,2", "layer=l/README": "mine",
            "layer=other/part-00000.parquet": "not of this dump's layers", ".git/HEAD": "ref"}
    for name, text in mine.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert prepare_output(store, _manifest(layers=["layer2"]), overwrite=True) == {}
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted([*mine, MANIFEST_PATH])
    assert store.read_json(MANIFEST_PATH)["identity"]["model"]["layers"] == ["layer2"]


def test_a_folder_that_is_no_dump_is_refused_hidden_entries_included(tmp_path):
    for name in ("thesis.tex", ".git/HEAD", ".env", "layer=x/mine.parquet"):
        folder = tmp_path / name.replace("/", "_")
        (folder / name).parent.mkdir(parents=True)
        (folder / name).write_text("precious")
        store = OutputStore(str(folder))
        for overwrite in (False, True):
            with pytest.raises(OutputConflictError, match=r"holds files that are not an actmap dump \("):
                prepare_output(store, _manifest(), overwrite=overwrite)
        assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == [Path(name).name], "nothing written"
        assert (folder / name).read_text() == "precious"


def test_the_files_of_a_dump_without_its_manifest_are_replaced_only_with_overwrite(tmp_path):
    store = OutputStore(str(tmp_path))
    prepare_output(store, _manifest())
    _commit(store, 0)
    (tmp_path / MANIFEST_PATH).unlink()
    with pytest.raises(OutputConflictError, match="holds the files of an actmap dump without its manifest"):
        prepare_output(store, _manifest())
    assert (tmp_path / layer_file("l", 0)).exists()
    assert prepare_output(store, _manifest(), overwrite=True) == {}
    assert not (tmp_path / layer_file("l", 0)).exists() and not (tmp_path / shard_record_path(0)).exists()


def test_a_corrupt_manifest_is_named_with_what_to_do(tmp_path):
    store = OutputStore(str(tmp_path))
    prepare_output(store, _manifest())
    _commit(store, 0)
    (tmp_path / MANIFEST_PATH).write_text('{"format": "actmap.manifest/1", "plan": {"sam')
    with pytest.raises(OutputConflictError) as info:
        prepare_output(store, _manifest())
    assert f"{tmp_path}/_actmap/manifest.json cannot be read (JSONDecodeError" in str(info.value)
    assert "Rerun with --overwrite to replace the dump" in str(info.value)
    (tmp_path / "notes.txt").write_text("mine")
    assert prepare_output(store, _manifest(), overwrite=True) == {}
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / layer_file("l", 0)).exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_manifest_the_storage_does_not_give_is_no_damaged_dump(tmp_path, monkeypatch, overwrite):
    store = OutputStore(str(tmp_path))
    prepare_output(store, _manifest())
    _commit(store, 0)

    def unreachable(path):
        raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: Could not connect to server")

    monkeypatch.setattr(store, "read_json", unreachable)
    with pytest.raises(OSError, match="manifest.json cannot be read now .*NETWORK_CONNECTION.*; the dump is left "
                                      "as it is: rerun when its storage answers") as info:
        prepare_output(store, _manifest(), overwrite=overwrite)
    assert not isinstance(info.value, OutputConflictError) and "--overwrite" not in str(info.value)
    assert (tmp_path / layer_file("l", 0)).exists() and (tmp_path / MANIFEST_PATH).exists()


def test_a_corrupt_record_is_named_and_its_shard_redone(tmp_path, caplog):
    store = OutputStore(str(tmp_path))
    prepare_output(store, _manifest())
    first, _ = _commit(store, 0), _commit(store, 1)
    (tmp_path / shard_record_path(1)).write_text('{"shard": 1, "sta')
    assert prepare_output(store, _manifest()) == {0: first}
    assert ("shard 1 is redone: _actmap/shards/00001.json: the record cannot be read (JSONDecodeError"
            in caplog.text)
    (tmp_path / shard_record_path(0)).write_text(json.dumps({"shard": 0, "start": 0, "stop": 4, "bad": [7]}))
    assert prepare_output(store, _manifest()) == {}
    assert "_actmap/shards/00000.json: the record cannot be read (RecordError: a BadSample is a mapping" in caplog.text


def test_foreign_entries_and_remove_dump_keep_the_lock(tmp_path):
    store = OutputStore(str(tmp_path))
    prepare_output(store, _manifest())
    _commit(store, 0)
    store.write_json(LOCK_PATH, {"pid": 1})
    (tmp_path / "layer=l" / "sub").mkdir()
    (tmp_path / "layer=l" / "sub" / "part-00009.parquet").write_text("nested: not the dump's")
    assert foreign_entries(store, ["l"]) == ["layer=l/sub/part-00009.parquet"]
    remove_dump(store, ["l"])
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        LOCK_PATH, "layer=l/sub/part-00009.parquet"]


def test_output_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputConflictError, match="run.output: '.*/f' is a file, not a folder; give a folder"):
        prepare_output(OutputStore(str(tmp_path / "f")), _manifest())
    assert (tmp_path / "f").read_text() == "x"


def test_a_damaged_file_is_found_and_its_shard_redone(tmp_path, caplog):
    store = OutputStore(str(tmp_path))
    prepare_output(store, _manifest())
    records = {i: _commit(store, i) for i in range(3)}
    assert prepare_output(store, _manifest()) == records
    # shard 1's file replaced by a copy of shard 0's (same size: same rows, ids of one digit)
    data = (tmp_path / layer_file("l", 0)).read_bytes()
    assert len(data) == records[1].bytes["l"]
    (tmp_path / layer_file("l", 1)).write_bytes(data)
    # shard 2's file cut short
    (tmp_path / layer_file("l", 2)).write_bytes((tmp_path / layer_file("l", 2)).read_bytes()[:-100])
    assert set(prepare_output(store, _manifest())) == {0}
    assert "layer=l/part-00001.parquet: holds indices 0-3, its record says 4-7" in caplog.text
    assert f"layer=l/part-00002.parquet: {records[2].bytes['l'] - 100:,} bytes, its record says" in caplog.text


def test_pinned_records_still_load_without_pins(tmp_path):
    """A record of an older version (no index range) is checked against its shard's samples."""
    store = OutputStore(str(tmp_path))
    prepare_output(store, _manifest())
    for i in range(2):
        record = _commit(store, i).to_dict()
        del record["index_range"]
        store.write_json(shard_record_path(i), record)
    (tmp_path / layer_file("l", 1)).write_bytes((tmp_path / layer_file("l", 0)).read_bytes())
    assert set(prepare_output(store, _manifest())) == {0}



def test_a_manifest_written_with_credentials_in_its_uris_is_resumed_without_them(tmp_path):
    """Before credentials were left out of manifests, a dump kept them; its rerun compares the
    two without them (and its refusals would not print them)."""
    from dataclasses import replace

    from pipeline._manifest import conflicts

    source = {"kind": "folder", "path": "s3://bucket/images?endpoint_override=host:9000"}
    config = Config.from_dict({"source": {"kind": "folder", "path": "s3://KEY:SECRET@bucket/images"}})
    new = new_manifest(config, MODEL, source, 10)
    assert "SECRET" not in json.dumps(new.to_dict())
    old = replace(new, identity=config.identity(), config=config.to_dict(),
                  source=dict(source, path="s3://KEY:SECRET@bucket/images?endpoint_override=host:9000"))
    assert "SECRET" in json.dumps(old.to_dict()) and conflicts(old, new) == []


def test_a_dump_begun_before_a_source_fact_was_kept_resumes_without_it():
    # the other Parquet files' schemas came into the identity later: a dump begun before has no
    # such key, and is resumed as it was (one begun after with none, null, is compared)
    from dataclasses import replace

    from pipeline._manifest import conflicts

    source = {"kind": "parquet", "path": "/t", "index_sha256": "a", "schemas_sha256": "b"}
    new = new_manifest(Config(), MODEL, source, 10)
    before = {k: v for k, v in source.items() if k != "schemas_sha256"}
    assert conflicts(replace(new, source=before), new) == []
    assert conflicts(replace(new, source=dict(source, schemas_sha256=None)), new) == ['source: schemas_sha256: null -> "b"']


def test_the_temporary_files_of_shards_still_being_written_are_kept(tmp_path):
    planted = {shard: [tmp_path / "layer=l" / f".part-{shard:05d}.parquet.0123456789ab.tmp",
                       tmp_path / "_actmap" / "shards" / f".{shard:05d}.json.0123456789ab.tmp"] for shard in (3, 4)}
    for paths in planted.values():
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"cut short")
    assert remove_temporaries(OutputStore(str(tmp_path)), ["l"], keep={3}) == 2
    assert all(p.exists() for p in planted[3]) and not any(p.exists() for p in planted[4])


def test_a_manifest_says_its_format_by_whether_it_pools_maps_laid_out_channels_last():
    """Maps pooled as (batch, height, width, channels) get a manifest format that versions
    before layouts were recorded do not resume (they would pool the rest otherwise); this
    version resumes both formats, and refuses another, naming those it knows."""
    from dataclasses import replace

    from pipeline._manifest import conflicts
    from pipeline._records import LayerSpec

    def manifest(reduce, layout):
        return new_manifest(Config.from_dict({"dump": {"reduce": reduce}}), MODEL, {"count": 10}, 10,
                            {"a": LayerSpec((8, 1, 1), "float16", layout="channels_first"),
                             "b": LayerSpec((8, 1, 1), "float16", layout=layout)})

    assert manifest("pool", "channels_last").format == "actmap.manifest/2"
    assert manifest("channel_mean", "channels_last").format == "actmap.manifest/2"
    assert manifest("pool", "channels_first").format == "actmap.manifest/1"
    assert manifest("none", "channels_last").format == "actmap.manifest/1"  # stored as the model gave them
    new = manifest("pool", "channels_last")
    assert conflicts(new, new) == [] and conflicts(replace(new, format="actmap.manifest/1"), new) == []
    assert conflicts(replace(new, format="actmap.manifest/3"), new) == [
        "manifest format 'actmap.manifest/3', this version writes 'actmap.manifest/1' or 'actmap.manifest/2'"]
