"""The files read as they are by the tools users have: DuckDB, pandas, Hugging Face datasets and
Ray Data, on a dump written by several actors; and the block-shuffled ActivationDataset."""

import glob
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import ActivationDataset, read_layer, read_table, run
from pipeline.config import Config
from pipeline._shuffle import block_shuffle, groups_per_window

LAYERS = ("relu1", "conv2")


@pytest.fixture(scope="module")
def dump(tmp_path_factory, ray_cluster):
    """40 generated samples, two layers, written by two actors (5 shards of 8 rows)."""
    out = tmp_path_factory.mktemp("readers") / "out"
    config = Config.from_dict({"model": {"name": "support.models:tiny", "layers": list(LAYERS)},
                               "source": {"count": 40, "image_size": 16},
                               "run": {"output": str(out), "batch_size": 2, "shard_size": 8, "actors": 2}})
    summary = run(config, stream=None)
    assert summary.actors == 2
    workers = {json.loads(p.read_text())["worker"]["pid"] for p in (out / "_actmap" / "shards").glob("*.json")}
    assert len(workers) == 2, "both actors wrote shards"
    return str(out)


def _spec(dump, layer):
    """The activation's dtype and shape, from the schema metadata of any of the layer's files."""
    first = sorted(glob.glob(f"{dump}/layer={layer}/*.parquet"))[0]
    return json.loads(pq.read_schema(first).metadata[b"actmap"])["columns"]["activation"]


def _stack(values, spec):
    return np.frombuffer(b"".join(values), dtype=spec["dtype"]).reshape(-1, *spec["shape"])


def test_duckdb_reads_ids_labels_and_activations_and_joins_layers(dump):
    import duckdb

    rows = duckdb.sql(f"SELECT sample_id, label FROM '{dump}/layer=conv2/*.parquet' ORDER BY index").fetchall()
    expected = read_table(dump, "conv2", columns=["sample_id", "label"])
    assert rows == list(zip(expected.column("sample_id").to_pylist(), expected.column("label").to_pylist()))
    # the spec from the files' own key-value metadata, with DuckDB alone
    meta = duckdb.sql(f"SELECT value FROM parquet_kv_metadata('{dump}/layer=conv2/part-00000.parquet') "
                      "WHERE key = 'actmap'").fetchall()[0][0]
    spec = json.loads(meta)["columns"]["activation"]
    joined = duckdb.sql(f"""
        SELECT a.sample_id, a.activation AS relu1, b.activation AS conv2
        FROM '{dump}/layer=relu1/*.parquet' a JOIN '{dump}/layer=conv2/*.parquet' b USING (sample_id)
        ORDER BY a.index""").fetchall()
    assert [r[0] for r in joined] == [str(i) for i in range(40)]
    np.testing.assert_array_equal(_stack([r[2] for r in joined], spec), read_layer(dump, "conv2"))
    np.testing.assert_array_equal(_stack([r[1] for r in joined], _spec(dump, "relu1")), read_layer(dump, "relu1"))


def test_pandas_reads_a_layer_folder(dump):
    import pandas as pd

    frame = pd.read_parquet(f"{dump}/layer=relu1").sort_values("index")
    assert list(frame["sample_id"]) == [str(i) for i in range(40)]
    spec = _spec(dump, "relu1")
    x = np.stack([np.frombuffer(b, dtype=spec["dtype"]).reshape(spec["shape"]) for b in frame["activation"]])
    np.testing.assert_array_equal(x, read_layer(dump, "relu1"))
    mask_spec = json.loads(pq.read_schema(sorted(glob.glob(f"{dump}/layer=relu1/*.parquet"))[0])
                           .metadata[b"actmap"])["columns"]["mask"]
    assert np.frombuffer(frame["mask"].iloc[3], dtype=mask_spec["dtype"]).reshape(mask_spec["shape"]).shape == (16, 16)


def test_hugging_face_datasets_read_the_files(dump, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datasets import Dataset, load_dataset

    files = sorted(glob.glob(f"{dump}/layer=conv2/*.parquet"))
    spec = _spec(dump, "conv2")
    expected = read_layer(dump, "conv2")
    direct = Dataset.from_parquet(files, cache_dir=str(tmp_path / "a")).sort("index")
    loaded = load_dataset("parquet", data_files={"train": files}, split="train", cache_dir=str(tmp_path / "b"))
    for data in (direct, loaded.sort("index")):
        assert data.num_rows == 40 and data["sample_id"][:3] == ["0", "1", "2"]
        np.testing.assert_array_equal(_stack(data["activation"], spec), expected)


def test_ray_data_reads_the_files(dump):
    import ray

    rows = ray.data.read_parquet(f"{dump}/layer=conv2").sort("index").take_all()
    assert [r["sample_id"] for r in rows] == [str(i) for i in range(40)]
    np.testing.assert_array_equal(_stack([r["activation"] for r in rows], _spec(dump, "conv2")),
                                  read_layer(dump, "conv2"))


# -- block shuffle --------------------------------------------------------------------------------


def test_block_shuffle_is_a_permutation_within_bounded_windows():
    sizes = [4, 4, 3, 4, 4]
    order = block_shuffle(sizes, window=6, seed=1)
    assert sorted(order.tolist()) == list(range(19))
    assert not np.array_equal(order, np.arange(19))
    assert np.array_equal(order, block_shuffle(sizes, window=6, seed=1))
    assert not np.array_equal(order, block_shuffle(sizes, window=6, seed=2))
    group = np.searchsorted(np.cumsum(sizes), order, side="right")
    for begin in range(0, 19, 6):
        assert len(set(group[begin:begin + 6])) <= groups_per_window(sizes, 6)
    # window 1: whole row groups in a random order, rows in order inside each
    ordered = block_shuffle(sizes, window=1, seed=1).tolist()
    of = np.searchsorted(np.cumsum(sizes), ordered, side="right").tolist()
    assert of != sorted(of)
    assert all(b == a + 1 for a, b, ga, gb in zip(ordered, ordered[1:], of, of[1:]) if ga == gb)
    with pytest.raises(ValueError, match="window must be at least 1 row, got 0"):
        block_shuffle(sizes, 0, 0)


def test_shuffled_dataset_serves_every_row_once_and_reads_each_group_once(dump, monkeypatch):
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **k: reads.append(i) or real(self, i, *a, **k))
    plain = ActivationDataset(dump, "conv2")
    data = ActivationDataset(dump, "conv2", shuffle=True, window=8, seed=3)
    groups = len(plain._groups)
    assert groups == 20  # batches of 2 rows: one row group each
    reads.clear()
    items = [data[i] for i in range(len(data))]
    assert len(reads) == groups, "each row group read once in an epoch"
    indices = [labels["index"] for _, labels in items]
    assert sorted(indices) == list(range(40)) and indices != list(range(40))
    expected = read_layer(dump, "conv2")
    for activation, labels in items:
        np.testing.assert_array_equal(activation.numpy(), expected[labels["index"]].astype(np.float32))
    first = indices
    data.set_epoch(1)
    assert [data[i][1]["index"] for i in range(40)] != first
    data.set_epoch(0)
    assert [data[i][1]["index"] for i in range(40)] == first
    loader = torch.utils.data.DataLoader(data, batch_size=8, num_workers=2)
    seen = [i for _, labels in loader for i in labels["index"].tolist()]
    assert sorted(seen) == list(range(40)) and seen == first
