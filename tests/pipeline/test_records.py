"""The typed records (a shard's, a layer's, a bad sample's, the manifest): one conversion to and from
JSON, tolerant of fields added or removed."""

import json
from pathlib import Path

import pytest

from pipeline._manifest import new_manifest
from pipeline._model_inputs import ModelInput
from pipeline._records import BadSample, LayerSpec, Manifest, ShardRecord
from pipeline._shards import ShardPlan
from pipeline.config import Config
from pipeline.errors import RecordError

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "dump-0.1.0"


def test_records_written_by_release_0_1_0_load_and_convert_back_unchanged():
    for path in sorted(FIXTURE.glob("*/_actmap/shards/*.json")):
        doc = json.loads(path.read_text())
        record = ShardRecord.from_dict(doc)
        converted = record.to_dict()
        assert {k: v for k, v in converted.items() if k in doc} == doc
        assert {k: v for k, v in converted.items() if k not in doc} == {"stats": {}, "index_range": {}}  # added since: defaults
    record = ShardRecord.from_dict(json.loads((FIXTURE / "variable/_actmap/shards/00001.json").read_text()))
    assert (record.shard, record.start, record.stop, record.rows) == (1, 4, 6, {"conv2": 1, "relu1": 1})
    assert record.bad[0].sample_id == "5.png" and record.bad[0].reason.startswith("UnidentifiedImageError")
    assert record.total_bytes == sum(record.bytes.values()) > 0


def test_missing_fields_take_their_defaults_and_unknown_fields_are_ignored():
    record = ShardRecord.from_dict({"shard": 3, "start": 24, "stop": 32, "checksums": {"l": "ab"}})
    assert record == ShardRecord(3, 24, 32)
    assert record.rows == {} and record.bad == () and record.worker == {}
    assert BadSample.from_dict({"index": 1, "sample_id": "1", "reason": "r", "kind": "decode"}) == BadSample(1, "1", "r")


def test_a_record_without_its_shard_is_refused():
    with pytest.raises(RecordError, match=r"a ShardRecord needs stop; got keys \['shard', 'start'\]"):
        ShardRecord.from_dict({"shard": 3, "start": 24})
    with pytest.raises(RecordError, match="a LayerSpec is a mapping, got list"):
        LayerSpec.from_dict([1, 2])


def test_layer_specs():
    spec = LayerSpec([256, 14, 14], "float16")
    assert spec.shape == (256, 14, 14) and spec.to_dict() == {"shape": [256, 14, 14], "dtype": "float16"}
    assert LayerSpec.from_dict(spec.to_dict()) == spec
    assert LayerSpec.from_dict({"shape": None, "dtype": "float32"}).describe() == "variable float32"


# -- the manifest --------------------------------------------------------------------------------


@pytest.mark.parametrize("dump", ["generated", "variable"])
def test_a_manifest_of_release_0_1_0_loads_and_writes_back_byte_for_byte(dump):
    text = (FIXTURE / dump / "_actmap" / "manifest.json").read_text()
    manifest = Manifest.from_dict(json.loads(text))
    assert manifest.input is None, "0.1.0 did not record the model's input: the field takes its default"
    assert manifest.layers == ("relu1", "conv2") and manifest.model["name"] == "support.models:tiny"
    assert manifest.layer_info["conv2"].dtype == ("float16" if dump == "generated" else "bfloat16")
    assert (manifest.plan.samples, manifest.plan.shard_size, len(manifest.plan)) == (
        (30, 8, 4) if dump == "generated" else (6, 4, 2))
    assert json.dumps(manifest.to_dict(), indent=1, sort_keys=True) == text  # as OutputStore.write_json writes


def test_a_new_manifest_keeps_the_key_names_of_0_1_0_and_adds_the_input():
    config = Config.from_dict({"model": {"layers": ["conv2"]}, "run": {"shard_size": 4}})
    inputs = ModelInput(((0.5,) * 3, (0.25,) * 3), None, (8, 8))
    manifest = new_manifest(config, {"name": "m", "weights_sha256": "ab"}, {"kind": "generated"}, 10,
                            {"conv2": LayerSpec((16, 4, 4), "float16")}, inputs)
    doc = manifest.to_dict()
    old = json.loads((FIXTURE / "generated" / "_actmap" / "manifest.json").read_text())
    assert sorted(doc) == sorted([*old, "input"])
    assert doc["plan"] == {"samples": 10, "shard_size": 4, "shards": 3} and doc["layers"] == ["conv2"]
    assert doc["layer_info"] == {"conv2": {"shape": [16, 4, 4], "dtype": "float16"}}
    again = Manifest.from_dict(json.loads(json.dumps(doc)))
    assert again == manifest and again.input == inputs and again.plan == ShardPlan(10, 4)


def test_a_manifest_with_a_field_missing_or_of_the_wrong_kind_is_refused():
    doc = json.loads((FIXTURE / "generated" / "_actmap" / "manifest.json").read_text())
    with pytest.raises(RecordError, match=r"a Manifest needs plan; got keys \['config', 'created', "):
        Manifest.from_dict({k: v for k, v in doc.items() if k != "plan"})
    with pytest.raises(RecordError, match="a Manifest's model is a mapping, got str"):
        Manifest.from_dict({**doc, "model": "resnet18"})
    with pytest.raises(RecordError, match="a Manifest's layers are a list of layer names, got 'relu1'"):
        Manifest.from_dict({**doc, "layers": "relu1"})
    with pytest.raises(RecordError, match=r"a Manifest with a value of the wrong kind \(KeyError: 'shard_size'\)"):
        Manifest.from_dict({**doc, "plan": {"samples": 30}})
    older = Manifest.from_dict({k: v for k, v in doc.items() if k not in ("created", "layer_info")})
    assert (older.created, older.layer_info, older.input) == ("", {}, None), "fields that may miss take defaults"
