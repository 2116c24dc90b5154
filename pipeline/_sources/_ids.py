"""Sample ids that appear more than once, found in bounded memory.

The driver looks for repeated ids before any work (a warning, or a refusal with
``run.strict``). Counting the ids in a hash table of the ids themselves (``pc.value_counts``)
holds every distinct id at once: gigabytes for a Parquet id column of 100 million strings.
Here the id column streams by twice at most: the first pass keeps an 8-byte hash per id and
sorts them, so equal ids lie side by side; only when two hashes are equal does a second pass
count the ids behind those hashes exactly (two different ids may share a hash, and are not
reported). Null ids are left out: their rows are bad samples already. Numbers compare as the
sample ids they become (their ``str``).

>>> import pyarrow as pa
>>> column = lambda: iter([pa.array(["a", "b", None]), pa.array(["a", None, "c", "b", "a"])])
>>> repeated_ids(column, rows=8)
{'count': 2, 'examples': ['a', 'b']}
>>> repeated_ids(lambda: iter([pa.array([3, 1, 2])]), rows=3)
{'count': 0, 'examples': []}
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa


def _hashes(values: list) -> np.ndarray:
    return np.fromiter(map(hash, values), dtype=np.int64, count=len(values))


def sample_id(value: object) -> str:
    """The sample id an id column's value gives: its text; bytes (text written as binary, as
    Hive and older Spark do) decoded as UTF-8, or their hex digits where they are not UTF-8.

    >>> sample_id(39), sample_id("k0"), sample_id(b"k0"), sample_id(b"\\xff\\x00")
    ('39', 'k0', 'k0', 'ff00')
    """
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.hex()
    return str(value)


def sample_ids(array: pa.Array | pa.ChunkedArray) -> list:
    """:func:`sample_id` of each value of an id column, ``None`` where it is null, made a
    column at a time: integers by Arrow's cast, text as it is.

    >>> sample_ids(pa.array([39, None])), sample_ids(pa.array([b"k0", b"\\xff"]))
    (['39', None], ['k0', 'ff'])
    """
    if pa.types.is_integer(array.type):
        return array.cast(pa.string()).to_pylist()
    values = array.to_pylist()
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return values
    return [None if value is None else sample_id(value) for value in values]


def _ids(array: pa.Array) -> list:
    """The non-null values of ``array``, as sample ids compare: integers, floats and bytes by
    the id they become (:func:`sample_id`: a file's integer 39 is another file's text "39", its
    binary b"k0" another's text "k0"; NaN is one id, ``-0.0`` and ``0.0`` two), text as it is."""
    return sample_ids(array.drop_null())


def repeated_ids(batches: Callable[[], Iterator[pa.Array]], rows: int, examples: int = 5) -> dict:
    """``{"count", "examples"}``: how many distinct ids appear more than once, and the first
    ``examples`` of them in the order they first appear.

    Args:
        batches: gives the id column anew, as arrays in row order, each time it is called.
        rows: the column's length (the hashes are kept in one array of that size).
    """
    hashes = np.empty(rows, dtype=np.int64)
    filled = 0
    for array in batches():
        found = _hashes(_ids(array))
        if filled + len(found) > len(hashes):  # more ids than ``rows`` said: grown, not refused
            hashes = np.resize(hashes, max(2 * len(hashes), filled + len(found)))
        hashes[filled:filled + len(found)] = found
        filled += len(found)
    hashes = hashes[:filled]
    hashes.sort()
    suspects = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    if not len(suspects):
        return {"count": 0, "examples": []}
    counts: collections.Counter = collections.Counter()
    for array in batches():
        values = _ids(array)
        for i in np.flatnonzero(np.isin(_hashes(values), suspects)):
            counts[values[i]] += 1
    repeated = [value for value, count in counts.items() if count > 1]
    return {"count": len(repeated), "examples": [str(v) for v in repeated[:examples]]}
