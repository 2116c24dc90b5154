import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline._encoding import (METADATA_KEY, bfloat16_to_float32, decode_fixed, decode_variable,
                               encode_fixed, encode_variable, layout_problem, parse_metadata, read_metadata,
                               schema_metadata)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.uint8, np.int64])
def test_fixed_round_trip(dtype):
    x = (np.random.default_rng(0).normal(size=(5, 3, 4, 2)) * 10).astype(dtype)
    column, spec = encode_fixed(x)
    assert spec == {"dtype": np.dtype(dtype).name, "shape": [3, 4, 2]}
    assert np.array_equal(decode_fixed(column, spec), x)


def test_fixed_encoding_does_not_copy_contiguous_arrays():
    x = np.ones((4, 8), dtype=np.float16)
    column, _ = encode_fixed(x)
    assert column.buffers()[1].address == x.ctypes.data


def test_fixed_decodes_sliced_and_chunked_columns():
    x = np.arange(60, dtype=np.float32).reshape(10, 6)
    column, spec = encode_fixed(x)
    chunked = pa.chunked_array([column.slice(0, 3), column.slice(3, 4), column.slice(7)])
    assert np.array_equal(decode_fixed(chunked, spec), x)
    assert np.array_equal(decode_fixed(column.slice(2, 5), spec), x[2:7])


def test_bfloat16_bits_round_trip_through_float32():
    t = torch.tensor([[1.5, -2.0], [3.0e-3, 1.0e20]], dtype=torch.bfloat16)
    bits = t.view(torch.int16).numpy().view(np.uint16)
    column, spec = encode_fixed(bits, "bfloat16")
    assert spec["dtype"] == "bfloat16"
    assert np.array_equal(bfloat16_to_float32(decode_fixed(column, spec)), t.float().numpy())


def test_variable_round_trip():
    arrays = [np.full((2, k, 3), k, dtype=np.float16) for k in (1, 4, 2)]
    column, shapes, spec = encode_variable(arrays)
    assert spec == {"dtype": "float16", "shape": None}
    out = decode_variable(column, shapes, spec)
    assert [a.shape for a in out] == [(2, 1, 3), (2, 4, 3), (2, 2, 3)]
    assert all(np.array_equal(a, b) for a, b in zip(out, arrays))


def test_variable_needs_one_dtype():
    with pytest.raises(ValueError, match="share one dtype"):
        encode_variable([np.zeros(2, np.float16), np.zeros(2, np.float32)])


def test_metadata_is_json_and_survives_parquet(tmp_path):
    column, spec = encode_fixed(np.zeros((2, 3), np.float16))
    table = pa.table({"activation": column}).replace_schema_metadata(
        schema_metadata({"activation": spec}, layer="l1"))
    pq.write_table(table, tmp_path / "f.parquet")
    schema = pq.read_schema(tmp_path / "f.parquet")
    doc = json.loads(schema.metadata[METADATA_KEY])
    assert doc["columns"]["activation"] == {"dtype": "float16", "shape": [3]}
    assert read_metadata(schema)["layer"] == "l1"


def test_read_metadata_refuses_foreign_files():
    with pytest.raises(ValueError, match="not an actmap dump"):
        read_metadata(pa.schema([pa.field("x", pa.int64())]))


@pytest.mark.parametrize("spec", [{"dtype": "float32", "shape": [12, 8]}, {"dtype": "float16", "shape": [16, 8]},
                                  {"dtype": "float64", "shape": [16, 8]}])
def test_fixed_refuses_a_spec_whose_rows_are_not_the_columns_width(spec):
    """A shape or dtype that does not describe the column (a damaged footer) gives no rows."""
    column, _ = encode_fixed(np.zeros((3, 16, 8), np.float32))
    with pytest.raises(ValueError, match=r"a column of fixed_size_binary\[512\] cannot hold rows of "):
        decode_fixed(pa.chunked_array([column]), spec)


def test_variable_refuses_rows_without_a_shape_or_of_another_size():
    column, shapes, spec = encode_variable([np.zeros((2, 3), np.float32), np.zeros((2, 2), np.float32)])
    with pytest.raises(ValueError, match=r"row 1 of a variable-shape float32 column has no shape \(a null\)"):
        decode_variable(column, pa.array([[2, 3], None], pa.list_(pa.int32())), spec)
    with pytest.raises(ValueError, match="row 1 of a variable-shape float32 column holds 16 bytes, not the 24 of "):
        decode_variable(column, pa.array([[2, 3], [2, 3]], pa.list_(pa.int32())), spec)
    with pytest.raises(ValueError, match="a variable-shape column of 2 rows comes with 1 shapes"):
        decode_variable(column, pa.array([[2, 3]], pa.list_(pa.int32())), spec)


@pytest.mark.parametrize("raw, said", [
    (b"{nope", "the 'actmap' metadata is not JSON"),
    (b"[1, 2]", "the 'actmap' metadata is JSON of a list, not an object"),
    (b'{"format": "actmap.tensor/1"}', r"the 'actmap' metadata has no 'columns' object \(keys: \['format'\]\)"),
    (b'{"format": "actmap.tensor/1", "columns": {"a": {"dtype": "object", "shape": [2]}}}',
     "gives column 'a' the dtype 'object', no numeric dtype"),
    (b'{"format": "actmap.tensor/1", "columns": {"a": {"dtype": "float17", "shape": [2]}}}',
     "gives column 'a' the dtype 'float17', no numeric dtype"),
    (b'{"format": "actmap.tensor/1", "columns": {"a": {"dtype": "float16", "shape": [2.5]}}}',
     r"gives column 'a' the shape \[2.5\], not a list of sizes"),
    (b'{"format": "actmap.tensor/1", "columns": {"a": {"dtype": "float16"}}}',
     "the 'actmap' metadata of column 'a' is {'dtype': 'float16'}, not a 'dtype' and a 'shape'"),
])
def test_metadata_that_is_not_what_actmap_writes_is_refused_saying_why(raw, said):
    with pytest.raises(ValueError, match=said):
        parse_metadata(raw)
    with pytest.raises(ValueError, match=said):  # (the readers' way in: a schema)
        read_metadata(pa.schema([pa.field("x", pa.int64())], metadata={METADATA_KEY: raw}))


def test_layout_problem_finds_a_spec_that_does_not_describe_its_column():
    fixed, spec = encode_fixed(np.zeros((1, 4), np.float16))
    values, shapes, vspec = encode_variable([np.zeros(3, np.float16)])
    schema = pa.table({"f": fixed, "v": values, "v_shape": shapes}).schema
    assert layout_problem(schema, {"f": spec, "v": vspec}) is None
    assert layout_problem(schema, {"g": spec}) == "its metadata describes a tensor column 'g' that it does not have"
    assert layout_problem(schema, {"v": spec}) == ("column 'v' is large_binary, where its metadata's 4 float16 takes "
                                                   "fixed_size_binary[8]")
    assert layout_problem(schema.remove(2), {"v": vspec}) == ("it lacks the column 'v_shape' that holds the shapes "
                                                              "of its variable-shape column 'v'")
    assert layout_problem(schema, {"f": {"dtype": "float32", "shape": [4]}}) == (
        "column 'f' is fixed_size_binary[8], where its metadata's 4 float32 takes fixed_size_binary[16]")
