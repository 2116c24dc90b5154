"""The output store on a local folder and on S3 (a moto server on loopback)."""

import numpy as np
import pytest

from pipeline import inspect_dump, read_layer
from pipeline._manifest import new_manifest, prepare_output
from pipeline._shards import plan_shards
from pipeline._store import OutputStore
from pipeline._worker import ShardWorker
from pipeline.config import Config


def test_local_store_basics(tmp_path):
    store = OutputStore(str(tmp_path / "a"))
    assert store.entries() == []
    store.write_json("_actmap/x.json", [1, 2])
    assert store.entries() == ["_actmap"] and store.read_json("_actmap/x.json") == [1, 2]
    assert store.list_files("_actmap") == ["_actmap/x.json"]
    assert not [p for p in (tmp_path / "a" / "_actmap").iterdir() if p.name.startswith(".")]
    assert store.sizes("_actmap") == {"_actmap/x.json": len((tmp_path / "a" / "_actmap" / "x.json").read_bytes())}
    assert store.create_json("_actmap/lock.json", {"a": 1}) and not store.create_json("_actmap/lock.json", {"a": 2})
    assert store.read_json("_actmap/lock.json") == {"a": 1}
    store.delete_dir("_actmap")
    assert store.entries() == []


def test_dump_to_s3_and_read_it_back(tmp_path, s3):
    uri = f"s3://dumps/run1?{s3}"
    config = Config.from_dict({"model": {"name": "support.models:tiny", "layers": ["conv2"]},
                               "source": {"count": 10, "image_size": 16},
                               "run": {"output": uri, "batch_size": 4, "shard_size": 4}})
    with ShardWorker(config.to_dict()) as worker:
        store = OutputStore(uri)
        prepare_output(store, new_manifest(config, worker.identity, worker.source.identity(), 10))
        for shard in plan_shards(10, 4):
            worker.run_shard(shard)
    assert store.list_files("layer=conv2") == [f"layer=conv2/part-0000{i}.parquet" for i in range(3)]
    # the same run on a local folder gives the same values
    local = Config.from_dict({**config.to_dict(), "run": {**config.to_dict()["run"], "output": str(tmp_path)}})
    with ShardWorker(local.to_dict()) as worker:
        worker.run_shard(plan_shards(10, 10)[0])
    np.testing.assert_array_equal(read_layer(uri, "conv2"), read_layer(str(tmp_path), "conv2"))
    info = inspect_dump(uri)
    assert info.complete and info.layers["conv2"]["rows"] == 10
    # a second run on the same prefix resumes: nothing left to do
    assert set(prepare_output(store, new_manifest(config, worker.identity, worker.source.identity(), 10))) == {0, 1, 2}
