"""A source's index: the frozen list of what it holds, made once by the driver.

Sources that must look around before they can number their samples (the files of a folder,
the row groups of Parquet files, the members of tar shards) do so once, on the driver, and
write what they found as an index table. The dump keeps it (``_layout.SOURCE_INDEX_PATH``),
so every actor numbers the samples the same way, none walks the tree again, and a source that
changes during a run cannot shift the indices of the work already done.

The index file is written in row groups of :data:`GROUP_ROWS` rows, so the rows of one shard
come from the one or two row groups that hold them, whatever the size of the index.

>>> table = pa.table({"path": ["a.png", "b.png", "c.png"], "size": [1, 2, 3]})
>>> index = MemoryIndex(table, {"classes": []})
>>> index.slice(1, 3).column("path").to_pylist()
['b.png', 'c.png']
>>> len(index), index.meta
(3, {'classes': []})
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .._layout import temporary_name
from ..config import comparable_location

#: Rows per row group of an index file: one shard reads one or two of them.
GROUP_ROWS = 16_384

_META_KEY = b"actmap.index"


class Index(Protocol):
    """Rows of a source's index, read by range, and the source's facts that go with them."""

    meta: dict[str, Any]

    def __len__(self) -> int: ...

    def slice(self, start: int, stop: int) -> pa.Table:
        """Rows ``[start, stop)`` of the index."""


class MemoryIndex:
    """An index held in memory: the driver's, before it is written."""

    def __init__(self, table: pa.Table, meta: Mapping[str, Any] | None = None):
        self.table, self.meta = table, dict(meta or {})

    def __len__(self) -> int:
        return self.table.num_rows

    def slice(self, start: int, stop: int) -> pa.Table:
        return self.table.slice(start, max(0, stop - start))


class IndexFile:
    """An index written by :func:`write_index`, read a row group range at a time."""

    def __init__(self, fs: pafs.FileSystem, path: str):
        self.fs, self.path = fs, path
        self._handle = fs.open_input_file(path)
        self._file = pq.ParquetFile(self._handle)
        metadata = self._file.metadata
        self.meta = json.loads(self._file.schema_arrow.metadata[_META_KEY])
        self._rows = metadata.num_rows
        self._group_rows = metadata.row_group(0).num_rows if metadata.num_row_groups else GROUP_ROWS
        self._lock = threading.Lock()  # the shards a worker runs at once read it from their threads

    def __len__(self) -> int:
        return self._rows

    def slice(self, start: int, stop: int) -> pa.Table:
        stop = min(stop, self._rows)
        if start >= stop:
            return self._file.schema_arrow.empty_table()
        first, last = start // self._group_rows, (stop - 1) // self._group_rows
        with self._lock:
            table = self._file.read_row_groups(list(range(first, last + 1)))
        return table.slice(start - first * self._group_rows, stop - start)

    def close(self) -> None:
        self._file.close()
        self._handle.close()  # not closed by ParquetFile.close: it was handed in


def write_index(fs: pafs.FileSystem, path: str, index: MemoryIndex) -> None:
    """Write ``index`` to ``path`` (complete or not at all: a temporary name, then a move)."""
    schema = index.table.schema.with_metadata({_META_KEY: json.dumps(index.meta, sort_keys=True).encode()})
    temporary = temporary_name(path)
    # paths are mostly unique: a dictionary costs time and space for nothing
    with pq.ParquetWriter(temporary, schema, filesystem=fs, compression="zstd", use_dictionary=False) as writer:
        writer.write_table(index.table.replace_schema_metadata(schema.metadata), row_group_size=GROUP_ROWS)
    fs.move(temporary, path)


def digest(table: pa.Table, meta: Mapping[str, Any] | None = None) -> str:
    """A SHA-256 of an index's rows and facts: the identity of the source it describes.

    >>> t = pa.table({"path": ["a", "b"]})
    >>> digest(t) == digest(pa.table({"path": ["a", "b"]})), digest(t) == digest(pa.table({"path": ["b", "a"]}))
    (True, False)
    """
    h = hashlib.sha256(json.dumps(meta or {}, sort_keys=True).encode())
    table = table.replace_schema_metadata(None).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as stream:  # the logical bytes, whatever the chunks
        for batch in table.to_batches(max_chunksize=65_536):
            stream.write_batch(batch)
    h.update(sink.getvalue())
    return h.hexdigest()


def first_difference(old: Index, new: Index, rows: int = GROUP_ROWS) -> str | None:
    """Where two indexes of a source first differ, in words (``None``: nowhere): the row's
    number and its two versions (a tar's number given as its name), or the rows one lacks.
    The facts a newer version keeps that ``old`` lacks are no difference.

    >>> a = MemoryIndex(pa.table({"path": ["a.png", "b.png"], "size": [1, 2]}))
    >>> first_difference(a, MemoryIndex(pa.table({"path": ["a.png", "b.png"], "size": [1, 3]})))
    "sample 1: {'path': 'b.png', 'size': 2} -> {'path': 'b.png', 'size': 3}"
    >>> first_difference(a, MemoryIndex(a.table.slice(0, 1)))
    'sample 1 on: 1 row(s) before, none now'
    >>> first_difference(a, MemoryIndex(a.table, {"fields": "what a newer version keeps"})) is None
    True
    >>> first_difference(MemoryIndex(a.table, {"sha256": "x"}), MemoryIndex(a.table, {"sha256": "y"}))
    "the facts only the index's digest holds (such as the first Parquet file's schema)"
    >>> groups = MemoryIndex(pa.table({"file": ["a", "b"], "rows": [10, 4], "first": [0, 10]}))
    >>> print(first_difference(groups, MemoryIndex(pa.table({"file": ["a", "b"], "rows": [10, 3], "first": [0, 10]}))))
    samples from 10 on (a row group): {'file': 'b', 'rows': 4, 'first': 10} -> {'file': 'b', 'rows': 3, 'first': 10}
    >>> print(first_difference(groups, MemoryIndex(pa.table({"file": ["a", "b", "c"], "rows": [10, 4, 2], "first": [0, 10, 14]}))))
    samples from 14 on: 1 row group(s) now, none before
    """
    def named(index: Index, table: pa.Table) -> pa.Table:  # tar numbers as names (spelled one way), where there are tars
        tars = index.meta.get("tars")
        if not tars or "tar" not in table.schema.names:
            return table
        names = pa.array([comparable_location(t) for t in tars], pa.string()).take(table.column("tar"))
        return table.set_column(table.schema.get_field_index("tar"), "tar", names)

    def described(row: dict) -> str:
        text = repr(row)
        return text if len(text) <= 300 else text[:297] + "..."

    def sample(number: int, *found: dict) -> str:  # a Parquet index has a row per row group
        firsts = [row["first"] for row in found if "first" in row]
        return f"samples from {min(firsts)} on (a row group)" if firsts else f"sample {number}"

    common = min(len(old), len(new))
    for start in range(0, common, rows):
        before, after = named(old, old.slice(start, start + rows)), named(new, new.slice(start, start + rows))
        if before.schema != after.schema:
            return f"the index's columns: {before.schema.names} -> {after.schema.names}"
        if before.equals(after):
            continue
        for offset, (a, b) in enumerate(zip(before.to_pylist(), after.to_pylist())):
            if a != b:
                return f"{sample(start + offset, a, b)}: {described(a)} -> {described(b)}"
    if len(old) != len(new):
        longer = old if len(old) > len(new) else new
        more = "before, none now" if longer is old else "now, none before"
        first = sample(common, *longer.slice(common, common + 1).to_pylist()).removesuffix(" on (a row group)")
        unit = "row group(s)" if "first" in longer.slice(0, 0).schema.names else "row(s)"
        return f"{first} on: {abs(len(old) - len(new)):,} {unit} {more}"
    # (as a file keeps them: JSON's lists, not the tuples an index made in memory may hold)
    before, after = (json.loads(json.dumps(index.meta)) for index in (old, new))
    for facts in (before, after):
        if "tars" in facts:
            facts["tars"] = [comparable_location(t) for t in facts["tars"]]
    changed = sorted(k for k in before if k not in _DIGESTS and before.get(k) != after.get(k))
    if changed:
        return "the facts the index keeps: " + ", ".join(_FACTS.get(k, k) for k in changed)
    if old.meta.get("sha256") != new.meta.get("sha256"):
        return "the facts only the index's digest holds (such as the first Parquet file's schema)"
    return None


#: The facts of an index that are digests of the others (their differences say nothing more).
_DIGESTS = frozenset({"sha256", "sha256_as_spelled"})
#: The facts an index keeps, in words.
_FACTS = {"fields": "the columns' types (fields)", "repeated_ids": "the ids that repeat (repeated_ids)",
          "schemas_sha256": "the schemas of the files whose schema is not the first's (schemas_sha256)",
          "classes": "the class folders (classes)", "json_fields": "the .json files' fields (json_fields)"}
