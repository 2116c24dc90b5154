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

from ._layout import METADATA_KEY, TENSOR_FORMAT

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
    """The ``(N, *shape)`` array of a fixed-size binary column (bfloat16 stays as uint16 bits)."""
    dtype = numpy_dtype(spec["dtype"])
    shape = tuple(spec["shape"])
    per_row = int(np.prod(shape, dtype=np.int64))
    parts = []
    for chunk in _chunks(column):
        if chunk.null_count:
            raise ValueError("a tensor column holds nulls")
        data = np.frombuffer(chunk.buffers()[1], dtype=dtype,
                             count=len(chunk) * per_row, offset=chunk.offset * per_row * dtype.itemsize)
        parts.append(data.reshape((len(chunk),) + shape))
    if not parts:
        return np.empty((0,) + shape, dtype=dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def decode_variable(column: pa.Array | pa.ChunkedArray, shapes: pa.Array | pa.ChunkedArray,
                    spec: Mapping[str, Any]) -> list[np.ndarray]:
    """The arrays of a variable-shape column, one per row."""
    dtype = numpy_dtype(spec["dtype"])
    values = [v for chunk in _chunks(column) for v in chunk.to_pylist()]
    dims = [s for chunk in _chunks(shapes) for s in chunk.to_pylist()]
    return [np.frombuffer(v, dtype=dtype).reshape(s) for v, s in zip(values, dims)]


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
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError("this Parquet schema carries no 'actmap' metadata: not an actmap dump")
    doc = json.loads(raw)
    if doc.get("format") != TENSOR_FORMAT:
        raise ValueError(f"unknown actmap metadata format {doc.get('format')!r}; this version reads "
                         f"{TENSOR_FORMAT!r}")
    return doc
