"""Rows to Parquet: the table of one batch of one layer, and the file of one (layer, shard).

Columns: ``sample_id`` (string), ``index`` (int64), ``activation`` (one binary value per row),
``activation_shape`` (variable shapes only), then the source's pass-through columns; array
labels (masks) are tensor columns like the activation. The schema metadata (JSON under
``actmap``) gives each tensor column's dtype and shape, the layer and the reduction.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ._encoding import encode_fixed, encode_variable, read_metadata, schema_metadata
from ._layout import ACTIVATION, INDEX, RESERVED_COLUMNS, SAMPLE_ID, shape_column
from ._sources._base import ArraySpec
from ._store import OutputStore
from .errors import ReservedColumnError

log = logging.getLogger(__name__)


def _tensor_columns(name: str, arrays: Sequence[np.ndarray] | np.ndarray, fixed: bool,
                    dtype: str | None) -> tuple[list[tuple[str, pa.Array]], dict]:
    if fixed:
        batch = arrays if isinstance(arrays, np.ndarray) else np.stack(arrays)
        column, spec = encode_fixed(batch, dtype)
        return [(name, column)], spec
    column, shapes, spec = encode_variable(arrays if isinstance(arrays, np.ndarray) else list(arrays), dtype)
    return [(name, column), (shape_column(name), shapes)], spec


def build_table(activations: Sequence[np.ndarray] | np.ndarray, *, sample_ids: Sequence[str],
                indices: Sequence[int], labels: Mapping[str, Sequence[Any]],
                label_fields: Sequence[pa.Field], fixed: bool, dtype: str | None = None,
                metadata: Mapping[str, Any] | None = None,
                label_arrays: Mapping[str, ArraySpec] | None = None) -> pa.Table:
    """The rows of one batch of one layer.

    Args:
        activations: one array per row (or one ``(N, ...)`` array when ``fixed``).
        sample_ids, indices: the rows' ids and source indices.
        labels: pass-through values by column name; a column whose values are numpy arrays
            is stored as a tensor column, the others with the type in ``label_fields``.
        label_fields: the Arrow fields of the scalar pass-through columns.
        fixed: whether every row of the layer has one shape (a fixed-size column).
        label_arrays: the array labels' columns (:func:`~pipeline._labels.split_unfit` has
            checked their values): every file of a dump stores them with one dtype, and with
            one shape where they have it. Array labels without one are stored as they come,
            fixed-size with the layer.
        dtype: the activations' logical dtype when their bytes hold another (bfloat16).
        metadata: more entries for the JSON schema metadata (layer, reduction, ...).

    >>> import numpy as np
    >>> t = build_table(np.zeros((2, 4), np.float16), sample_ids=["a", "b"], indices=[0, 1],
    ...                 labels={"label": [3, 1]}, label_fields=[pa.field("label", pa.int64())], fixed=True)
    >>> t.column_names
    ['sample_id', 'index', 'activation', 'label']
    """
    columns: list[tuple[str, pa.Array]] = [(SAMPLE_ID, pa.array(sample_ids, pa.string())),
                                           (INDEX, pa.array(indices, pa.int64()))]
    encoded, spec = _tensor_columns(ACTIVATION, activations, fixed, dtype)
    columns += encoded
    own = len(columns)
    specs = {ACTIVATION: spec}
    types = {f.name: f.type for f in label_fields}
    for name, values in labels.items():
        if (spec := (label_arrays or {}).get(name)) is not None:
            values = [v if v.dtype == spec.dtype else v.astype(spec.dtype) for v in values]
            encoded, specs[name] = _tensor_columns(name, values, spec.shape is not None, None)
            columns += encoded
        elif values and isinstance(values[0], np.ndarray):
            encoded, specs[name] = _tensor_columns(name, values, fixed, None)
            columns += encoded
        else:
            columns.append((name, pa.array(values, type=types.get(name))))
    taken = set(RESERVED_COLUMNS)
    for name, _ in columns[own:]:  # the pass-through columns (and their shape columns) take no name twice
        if name in taken:  # (a column of every dump, or the shape column of a pass-through array)
            raise ReservedColumnError(name, RESERVED_COLUMNS if name in RESERVED_COLUMNS else [name])
        taken.add(name)
    table = pa.table(dict(columns))
    return table.replace_schema_metadata(schema_metadata(specs, **(metadata or {})))


def _change(first: pa.Schema, then: pa.Schema) -> str:
    """Where the schema ``then`` first differs from ``first``, on one line.

    >>> _change(pa.schema([("a", pa.int64())]), pa.schema([("a", pa.float64())]))
    'a: int64 -> double'
    """
    if first.names != then.names:
        return f"columns {first.names} -> {then.names}"
    for old, new in zip(first, then):
        if old.type != new.type:
            return f"{old.name}: {old.type} -> {new.type}"
    try:
        before, after = read_metadata(first)["columns"], read_metadata(then)["columns"]
    except ValueError:
        return "their metadata"
    changed = sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))
    if changed:
        name = changed[0]
        return f"{name}: {json.dumps(before.get(name))} -> {json.dumps(after.get(name))}"
    return "their metadata"


class LayerFileWriter:
    """Writes the file of one (layer, shard): ``write`` batches, then ``commit`` or ``abort``.

    The file is written under a hidden temporary name and appears under its final name only on
    commit, replacing the file of an earlier attempt at the same shard. Every page carries its
    CRC-32 (readers verify it), and ``index_range`` is the first and last source index written:
    with the rows and the size, the shard's record pins what the file holds.
    """

    def __init__(self, store: OutputStore, relative: str, compression: str = "zstd"):
        self.store, self.relative = store, relative
        self.compression = None if compression == "none" else compression
        self._temporary: str | None = None
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0
        self.index_range: tuple[int, int] | None = None

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self.store.make_dirs(self.relative.rsplit("/", 1)[0])
            self._temporary = self.store.temporary(self.relative)
            self._writer = pq.ParquetWriter(self._temporary, table.schema, filesystem=self.store.fs,
                                            compression=self.compression, use_dictionary=False,
                                            write_statistics=[SAMPLE_ID, INDEX], write_page_checksum=True)
        elif not table.schema.equals(self._writer.schema, check_metadata=True):
            raise ValueError(f"{self.relative}: a batch's columns differ from the file's first batch: "
                             f"{_change(self._writer.schema, table.schema)}")
        self._writer.write_table(table)
        self.rows += table.num_rows
        if table.num_rows:
            low, high = pc.min_max(table.column(INDEX)).values()
            low, high = low.as_py(), high.as_py()
            if self.index_range is not None:
                low, high = min(low, self.index_range[0]), max(high, self.index_range[1])
            self.index_range = (low, high)

    def commit(self) -> int:
        """Close the file and give it its final name; returns its size in bytes.

        With no rows there is no file, and the file of an earlier attempt at the shard (whose
        samples this attempt could not read) is removed: the record will not list it.
        """
        if self._writer is None:
            self.store.delete_file(self.store.path(self.relative))
            return 0
        self._writer.close()
        self.store.publish(self._temporary, self.relative)
        self._writer, self._temporary = None, None
        return self.store.size(self.relative)

    def abort(self) -> None:
        """Drop the temporary file; safe to call at any point, and twice."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # the file is dropped anyway
                log.debug("closing %s on abort failed", self._temporary, exc_info=True)
            self._writer = None
        if self._temporary is not None:
            self.store.delete_file(self._temporary)
            self._temporary = None
