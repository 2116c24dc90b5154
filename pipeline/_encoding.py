"""Tensor columns in Arrow: one binary value per row, the shape and dtype in JSON metadata.

One raw value per row (``fixed_size_binary`` when every row has the same shape) encodes and
decodes about ten times faster than element-wise list types, and any Parquet reader can get the
array back with ``numpy.frombuffer``. Variable shapes use ``large_binary`` plus a
``<column>_shape`` list column. The metadata is JSON under the schema key ``actmap``; nothing is
pickled.

>>> import numpy as np
>>> x = np.arange(12, dtype=np.float16).reshape(2, 3, 2)
>>> column, spec = encode_fixed(x)
>>> column.type, spec
(FixedSizeBinaryType(fixed_size_binary[12]), {'dtype': 'float16', 'shape': [3, 2]})
>>> bool((decode_fixed(column, spec) == x).all())
True
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from ._layout import METADATA_KEY, TENSOR_FORMAT, shape_column

# bfloat16 has no numpy dtype: its bits travel as uint16 and are widened on read.
_STORAGE_NUMPY = {"bfloat16": np.dtype(np.uint16)}


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype whose bytes hold values of ``dtype`` (``bfloat16`` -> ``uint16``)."""
    return _STORAGE_NUMPY.get(dtype) or np.dtype(dtype)


def encode_fixed(array: np.ndarray, dtype: str | None = None) -> tuple[pa.Array, dict]:
    """Encode ``(N, *shape)`` as N fixed-size binary values, without copying a contiguous array.

    Args:
        array: the batch; the first dim is the rows.
        dtype: the logical dtype when the bytes hold another (``"bfloat16"`` in a uint16 array).

    Returns:
        The column and its spec ``{"dtype", "shape"}`` for the schema metadata.
    """
    array = np.ascontiguousarray(array)
    rows = array.shape[0]
    width = array.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
    if width == 0:
        raise ValueError(f"cannot store empty per-row tensors of shape {array.shape[1:]}")
    column = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), rows, [None, pa.py_buffer(array.reshape(-1).view(np.uint8))])
    return column, {"dtype": dtype or str(array.dtype), "shape": [int(d) for d in array.shape[1:]]}


def encode_variable(arrays: Sequence[np.ndarray] | np.ndarray, dtype: str | None = None) -> tuple[pa.Array, pa.Array, dict]:
    """Encode arrays of differing shapes: a ``large_binary`` column plus a shape column.

    ``arrays`` may also be one ``(N, *shape)`` array: N rows of one shape (a batch of equal
    inputs), encoded without a step per row.

    >>> batch = np.zeros((2, 3, 1), np.float16)
    >>> column, shapes, _ = encode_variable(batch)
    >>> column.equals(encode_variable(list(batch))[0]), shapes.to_pylist()
    (True, [[3, 1], [3, 1]])
    """
    if len(arrays) == 0:
        raise ValueError("encode_variable needs at least one array")
    if isinstance(arrays, np.ndarray):
        batch = np.ascontiguousarray(arrays)
        rows, shape = batch.shape[0], [int(d) for d in batch.shape[1:]]
        width = batch.itemsize * int(np.prod(shape, dtype=np.int64))
        column = pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), rows,
            [None, pa.py_buffer(np.arange(rows + 1, dtype=np.int64) * width), pa.py_buffer(batch.reshape(-1).view(np.uint8))])
        shapes = pa.ListArray.from_arrays(np.arange(rows + 1, dtype=np.int32) * len(shape),
                                          pa.array(np.tile(np.asarray(shape, np.int32), rows), pa.int32()))
        return column, shapes, {"dtype": dtype or str(batch.dtype), "shape": None}
    kinds = {a.dtype for a in arrays}
    if len(kinds) != 1:
        raise ValueError(f"all arrays must share one dtype, got {sorted(map(str, kinds))}")
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([a.nbytes for a in arrays], out=offsets[1:])
    data = np.concatenate([np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays])
    column = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(arrays), [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    shapes = pa.array([list(a.shape) for a in arrays], type=pa.list_(pa.int32()))
    return column, shapes, {"dtype": dtype or str(arrays[0].dtype), "shape": None}


def _chunks(column: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return column.chunks if isinstance(column, pa.ChunkedArray) else [column]


def decode_fixed(column: pa.Array | pa.ChunkedArray, spec: Mapping[str, Any]) -> np.ndarray:
    """The ``(N, *shape)`` array of a fixed-size binary column (bfloat16 stays as uint16 bits).

    A ``ValueError`` when the column's width is not what ``spec`` takes (a spec that does not
    describe the column: read as if it did, every row would be wrong):

    >>> column, spec = encode_fixed(np.zeros((2, 16, 8), np.float32))
    >>> decode_fixed(column, {"dtype": "float32", "shape": [12, 8]})
    Traceback (most recent call last):
    ...
    ValueError: a column of fixed_size_binary[512] cannot hold rows of 12x8 float32 (384 bytes each): its metadata does not describe it
    """
    dtype = numpy_dtype(spec["dtype"])
    shape = tuple(spec["shape"])
    per_row = int(np.prod(shape, dtype=np.int64))
    width = per_row * dtype.itemsize
    parts = []
    for chunk in _chunks(column):
        if not pa.types.is_fixed_size_binary(chunk.type) or chunk.type.byte_width != width:
            raise ValueError(f"a column of {chunk.type} cannot hold rows of {_describe(spec)} ({width:,} bytes "
                             "each): its metadata does not describe it")
        if chunk.null_count:
            raise ValueError("a tensor column holds nulls")
        data = np.frombuffer(chunk.buffers()[1], dtype=dtype,
                             count=len(chunk) * per_row, offset=chunk.offset * per_row * dtype.itemsize)
        parts.append(data.reshape((len(chunk),) + shape))
    if not parts:
        return np.empty((0,) + shape, dtype=dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _describe(spec: Mapping[str, Any]) -> str:
    """``16x8x8 float16`` (``variable float16``) of a column's spec."""
    shape = "variable" if spec["shape"] is None else "x".join(map(str, spec["shape"]))
    return f"{shape} {spec['dtype']}"


def decode_variable(column: pa.Array | pa.ChunkedArray, shapes: pa.Array | pa.ChunkedArray,
                    spec: Mapping[str, Any]) -> list[np.ndarray]:
    """The arrays of a variable-shape column, one per row; a ``ValueError`` for a row without
    a shape, or whose bytes do not hold its shape.

    >>> column, shapes, spec = encode_variable([np.zeros((2, 3), np.float16)])
    >>> decode_variable(column, pa.array([[3, 3]], pa.list_(pa.int32())), spec)
    Traceback (most recent call last):
    ...
    ValueError: row 0 of a variable-shape float16 column holds 12 bytes, not the 18 of its shape [3, 3]
    """
    dtype = numpy_dtype(spec["dtype"])
    values = [v for chunk in _chunks(column) for v in chunk.to_pylist()]
    dims = [s for chunk in _chunks(shapes) for s in chunk.to_pylist()]
    if len(values) != len(dims):
        raise ValueError(f"a variable-shape column of {len(values):,} rows comes with {len(dims):,} shapes")
    arrays = []
    for row, (value, shape) in enumerate(zip(values, dims)):
        if value is None or shape is None:
            raise ValueError(f"row {row} of a variable-shape {spec['dtype']} column has no "
                             f"{'value' if value is None else 'shape'} (a null)")
        if len(value) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ValueError(f"row {row} of a variable-shape {spec['dtype']} column holds {len(value):,} bytes, not "
                             f"the {int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:,} of its shape {shape}")
        arrays.append(np.frombuffer(value, dtype=dtype).reshape(shape))
    return arrays


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 values held as uint16 bits to float32 (exact).

    >>> bfloat16_to_float32(np.array([0x3F80, 0xC000], dtype=np.uint16))
    array([ 1., -2.], dtype=float32)
    """
    return (bits.astype(np.uint32) << 16).view(np.float32)


def schema_metadata(columns: Mapping[str, Mapping[str, Any]], **extra: Any) -> dict[bytes, bytes]:
    """The schema metadata that describes the tensor columns of a table, as JSON."""
    doc = {"format": TENSOR_FORMAT, "columns": dict(columns), **extra}
    return {METADATA_KEY: json.dumps(doc, sort_keys=True).encode()}


def read_metadata(schema: pa.Schema) -> dict:
    """The ``actmap`` metadata of a schema; ``ValueError`` if the file was not written by actmap."""
    return parse_metadata((schema.metadata or {}).get(METADATA_KEY))


def parse_metadata(raw: bytes | None) -> dict:
    """The ``actmap`` metadata from its JSON text, checked to be what actmap writes: a ``format``
    this version reads and ``columns``, a spec ``{"dtype", "shape"}`` per tensor column. A
    ``ValueError`` says what is wrong.

    >>> parse_metadata(schema_metadata({"a": {"dtype": "float16", "shape": [2]}})[METADATA_KEY])["columns"]
    {'a': {'dtype': 'float16', 'shape': [2]}}
    >>> parse_metadata(schema_metadata({"a": {"dtype": "float16", "shape": [0]}})[METADATA_KEY])
    Traceback (most recent call last):
    ...
    ValueError: the 'actmap' metadata gives column 'a' the shape [0], not a list of sizes of at least 1
    >>> parse_metadata(b'{"colu')
    Traceback (most recent call last):
    ...
    ValueError: the 'actmap' metadata is not JSON (Unterminated string starting at: line 1 column 2 (char 1))
    """
    if raw is None:
        raise ValueError("this Parquet schema carries no 'actmap' metadata: not an actmap dump")
    try:
        doc = json.loads(raw)
    except ValueError as exc:  # (bytes that are no UTF-8 too)
        raise ValueError(f"the 'actmap' metadata is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"the 'actmap' metadata is JSON of a {type(doc).__name__}, not an object")
    if doc.get("format") != TENSOR_FORMAT:
        raise ValueError(f"unknown actmap metadata format {doc.get('format')!r}; this version reads "
                         f"{TENSOR_FORMAT!r}")
    columns = doc.get("columns")
    if not isinstance(columns, dict):
        raise ValueError(f"the 'actmap' metadata has no 'columns' object (keys: {sorted(doc)})")
    for name, spec in columns.items():
        if not isinstance(spec, dict) or not {"dtype", "shape"} <= set(spec):
            raise ValueError(f"the 'actmap' metadata of column {name!r} is {spec!r}, not a 'dtype' and a 'shape'")
        try:
            kind = numpy_dtype(spec["dtype"]).kind if isinstance(spec["dtype"], str) else None
        except (TypeError, ValueError):
            kind = None
        if kind is None or kind not in "biufc":
            raise ValueError(f"the 'actmap' metadata gives column {name!r} the dtype {spec['dtype']!r}, "
                             "no numeric dtype")
        shape = spec["shape"]
        if shape is not None and not (isinstance(shape, list) and all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
            raise ValueError(f"the 'actmap' metadata gives column {name!r} the shape {shape!r}, not a list of "
                             "sizes of at least 1")
    return doc


def layout_problem(schema: pa.Schema, columns: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Why ``schema``'s columns cannot hold the tensors that ``columns`` (the metadata's specs)
    describe (``None``: they can): each must be there, ``fixed_size_binary`` of the width its
    dtype and shape take, or ``large_binary`` beside a list column of shapes.

    >>> column, spec = encode_fixed(np.zeros((1, 4), np.float32))
    >>> schema = pa.schema([("x", column.type)])
    >>> layout_problem(schema, {"x": spec}) is None
    True
    >>> layout_problem(schema, {"x": {"dtype": "float32", "shape": [3]}})
    "column 'x' is fixed_size_binary[16], where its metadata's 3 float32 takes fixed_size_binary[12]"
    >>> layout_problem(schema, {"x": {"dtype": "float32", "shape": None}})
    "column 'x' is fixed_size_binary[16], where its metadata's variable float32 takes large_binary"
    """
    for name, spec in columns.items():
        if schema.get_field_index(name) < 0:
            return f"its metadata describes a tensor column {name!r} that it does not have"
        kind = schema.field(name).type
        if spec["shape"] is None:
            companion = shape_column(name)
            shapes = schema.field(companion).type if schema.get_field_index(companion) >= 0 else None
            if not (pa.types.is_large_binary(kind) or pa.types.is_binary(kind)):
                return f"column {name!r} is {kind}, where its metadata's {_describe(spec)} takes large_binary"
            if shapes is None:
                return f"it lacks the column {companion!r} that holds the shapes of its variable-shape column {name!r}"
            if not (pa.types.is_list(shapes) or pa.types.is_large_list(shapes)) or not pa.types.is_integer(shapes.value_type):
                return f"column {companion!r} (the shapes of {name!r}) is {shapes}, not a list of integers"
        else:
            width = numpy_dtype(spec["dtype"]).itemsize * int(np.prod(spec["shape"], dtype=np.int64))
            if not pa.types.is_fixed_size_binary(kind) or kind.byte_width != width:
                return (f"column {name!r} is {kind}, where its metadata's {_describe(spec)} takes "
                        f"fixed_size_binary[{width}]")
    return None
