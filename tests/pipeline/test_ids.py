"""Repeated sample ids, found in bounded memory (``pipeline._sources._ids``)."""

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline._sources import ParquetSource, _ids
from pipeline._sources._ids import repeated_ids


def _column(*chunks):
    return lambda: iter([pa.array(chunk) for chunk in chunks])


def test_repeats_across_batches_in_order_of_first_appearance():
    found = repeated_ids(_column(["x", "a", None], ["b", "a", None], ["c", "b", "x", "x"]), rows=10)
    assert found == {"count": 3, "examples": ["x", "a", "b"]}
    assert repeated_ids(_column([5, 7], [9, 7, 7]), rows=5) == {"count": 1, "examples": ["7"]}
    assert repeated_ids(_column(["a"], [None, None]), rows=3) == {"count": 0, "examples": []}  # nulls are not ids
    assert repeated_ids(_column([]), rows=0) == {"count": 0, "examples": []}
    assert repeated_ids(_column([f"id{i}" for i in range(100)]), rows=100, examples=2) == {"count": 0, "examples": []}


def test_float_ids_compare_as_the_sample_ids_they_become():
    nan = float("nan")
    assert repeated_ids(_column([1.0, nan, 2.0], [nan, 1.0]), rows=5) == {"count": 2, "examples": ["1.0", "nan"]}
    assert repeated_ids(_column([0.0, -0.0]), rows=2) == {"count": 0, "examples": []}


def test_more_ids_than_announced_are_counted_too():
    assert repeated_ids(_column(["a", "b"], ["c", "a"]), rows=1) == {"count": 1, "examples": ["a"]}


def test_ids_that_only_share_a_hash_are_not_reported(monkeypatch):
    # every id gets the same hash: the second pass counts the ids themselves
    monkeypatch.setattr(_ids, "_hashes", lambda values: _ids.np.zeros(len(values), dtype=_ids.np.int64))
    assert repeated_ids(_column(["a", "b", "c"], ["d"]), rows=4) == {"count": 0, "examples": []}
    assert repeated_ids(_column(["a", "b"], ["b", "c"]), rows=4) == {"count": 1, "examples": ["b"]}


def test_a_parquet_id_column_streams_past_the_driver(tmp_path, monkeypatch):
    # the driver never holds the id column whole: no table of it is ever read
    for f in range(3):
        keys = [f"k{f * 10 + i}" for i in range(10)] + (["k3"] if f == 2 else [])
        pq.write_table(pa.table({"image": [b"x"] * len(keys), "key": keys}), tmp_path / f"{f}.parquet",
                       row_group_size=4)

    class Streamed:
        """The dataset as pyarrow opens it, but a whole-table read fails."""

        def __init__(self, dataset):
            self._dataset = dataset

        def __getattr__(self, name):
            if name in ("to_table", "head", "take"):
                raise AssertionError(f"the id column was read whole ({name})")
            return getattr(self._dataset, name)

    opened = ds.dataset
    monkeypatch.setattr(ds, "dataset", lambda *args, **kwargs: Streamed(opened(*args, **kwargs)))
    source = ParquetSource(str(tmp_path), id_column="key")
    assert len(source) == 31 and source.repeated_ids == {"count": 1, "examples": ["k3"]}
