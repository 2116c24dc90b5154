import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline._encoding import decode_fixed, read_metadata
from pipeline._store import OutputStore
from pipeline._writer import LayerFileWriter, build_table


def _table(n=3, start=0, fixed=True):
    acts = [np.full((2, 2), i, np.float16) for i in range(start, start + n)]
    return build_table(np.stack(acts) if fixed else acts, sample_ids=[f"s{i}" for i in range(start, start + n)],
                       indices=list(range(start, start + n)),
                       labels={"label": [i % 2 for i in range(n)],
                               "mask": [np.ones((4, 4), np.uint8) * i for i in range(n)]},
                       label_fields=[pa.field("label", pa.int64())], fixed=fixed,
                       metadata={"layer": "l1"})


def test_table_columns_and_metadata():
    table = _table()
    assert table.column_names == ["sample_id", "index", "activation", "label", "mask"]
    meta = read_metadata(table.schema)
    assert meta["layer"] == "l1"
    assert meta["columns"]["mask"] == {"dtype": "uint8", "shape": [4, 4]}
    assert np.array_equal(decode_fixed(table.column("mask"), meta["columns"]["mask"])[2], np.full((4, 4), 2))


def test_variable_table_has_shape_columns():
    table = _table(fixed=False)
    assert table.column_names == ["sample_id", "index", "activation", "activation_shape", "label",
                                  "mask", "mask_shape"]
    assert table.column("activation_shape").to_pylist()[0] == [2, 2]


def test_file_appears_only_on_commit(tmp_path):
    store = OutputStore(str(tmp_path))
    writer = LayerFileWriter(store, "layer=l1/part-00000.parquet")
    writer.write(_table(3, 0))
    writer.write(_table(2, 3))
    assert not (tmp_path / "layer=l1/part-00000.parquet").exists()
    hidden = list((tmp_path / "layer=l1").iterdir())
    assert len(hidden) == 1 and hidden[0].name.startswith(".")
    size = writer.commit()
    final = tmp_path / "layer=l1/part-00000.parquet"
    assert size == final.stat().st_size > 0
    assert [p.name for p in (tmp_path / "layer=l1").iterdir()] == ["part-00000.parquet"]
    table = pq.read_table(final)
    assert table.column("index").to_pylist() == [0, 1, 2, 3, 4]
    assert pq.ParquetFile(final).metadata.num_row_groups == 2


def test_retry_replaces_the_file(tmp_path):
    store = OutputStore(str(tmp_path))
    for start in (0, 10):
        writer = LayerFileWriter(store, "layer=l1/part-00000.parquet")
        writer.write(_table(2, start))
        writer.commit()
    assert pq.read_table(tmp_path / "layer=l1/part-00000.parquet").column("index").to_pylist() == [10, 11]


def test_abort_leaves_nothing(tmp_path):
    store = OutputStore(str(tmp_path))
    writer = LayerFileWriter(store, "layer=l1/part-00000.parquet")
    writer.write(_table())
    writer.abort()
    writer.abort()
    assert list((tmp_path / "layer=l1").iterdir()) == []


def test_schema_change_within_a_file_is_refused(tmp_path):
    writer = LayerFileWriter(OutputStore(str(tmp_path)), "layer=l1/part-00000.parquet")
    writer.write(_table())
    with pytest.raises(ValueError, match=r"a batch's columns differ from the file's first batch: columns \["):
        writer.write(_table(fixed=False))
    # the same columns, of another tensor shape: the bytes would be read with the first one's
    transposed = _table()
    acts = np.zeros((3, 2, 2), np.float16)
    other = build_table(acts.reshape(3, 4, 1), sample_ids=["a", "b", "c"], indices=[3, 4, 5],
                        labels={"label": [0, 1, 0], "mask": [np.ones((4, 4), np.uint8)] * 3},
                        label_fields=[pa.field("label", pa.int64())], fixed=True, metadata={"layer": "l1"})
    assert other.schema.equals(transposed.schema, check_metadata=False)
    with pytest.raises(ValueError, match=r'activation: \{"dtype": "float16", "shape": \[2, 2\]\} -> '
                                         r'\{"dtype": "float16", "shape": \[4, 1\]\}'):
        writer.write(other)
    writer.abort()


def test_commit_without_rows_writes_no_file(tmp_path):
    assert LayerFileWriter(OutputStore(str(tmp_path)), "layer=l1/part-00000.parquet").commit() == 0
    assert not (tmp_path / "layer=l1").exists()


def test_an_attempt_without_rows_removes_the_file_of_an_earlier_attempt(tmp_path):
    store = OutputStore(str(tmp_path))
    first = LayerFileWriter(store, "layer=l1/part-00000.parquet")
    first.write(_table())
    first.commit()
    assert LayerFileWriter(store, "layer=l1/part-00000.parquet").commit() == 0
    assert not (tmp_path / "layer=l1/part-00000.parquet").exists()
