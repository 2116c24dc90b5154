"""The typed records: one conversion to and from JSON, tolerant of fields added or removed."""

import json
from pathlib import Path

import pytest

from pipeline._records import BadSample, LayerSpec, ShardRecord
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
