"""Whether a dump's files are what its shard records say was committed.

A shard's record pins each file it wrote: the size, the rows, and the first and last source
index. Checking a file costs its size (one listing of its layer's folder gives them all) and
its footer (one small read); no data is read. A rerun redoes the shards whose files fail the
check, ``actmap inspect`` names them (and reads the index column, to prove each sample is
there exactly once), and the readers refuse a dump that has any.

>>> record = ShardRecord(2, 8, 12, rows={"a": 4}, files={"a": layer_file("a", 2)},
...                      bytes={"a": 900}, index_range={"a": (8, 11)})
>>> file_problem(record, "a", listed_size=900, footer=(4, (8, 11)))
>>> file_problem(record, "a", listed_size=900, footer=(4, (12, 15)))
'holds indices 12-15, its record says 8-11'
>>> file_problem(record, "a", listed_size=512, footer=None)
'512 bytes, its record says 900 (cut short, or replaced)'
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable, Collection, Iterable
from typing import Any, TypeVar

import numpy as np
import pyarrow.parquet as pq

from ._layout import (INDEX, SHARDS_DIR, file_shard, is_data_file, is_shard_record, layer_file, partition_dir,
                      record_shard, shard_record_path)
from ._records import ShardRecord
from ._shards import ShardPlan
from ._sources._base import describe_error
from ._store import OutputStore
from .errors import RecordError

T = TypeVar("T")
R = TypeVar("R")

#: Files checked at once on object storage (each check waits on a request).
REMOTE_CHECKS = 32

#: ``(rows, (first index, last index) or None)`` of a data file, from its footer.
Footer = tuple[int, "tuple[int, int] | None"]


@dataclasses.dataclass(frozen=True)
class Damage:
    """A file of the dump (relative to its root) that is not what the dump says, and why;
    ``shard`` is the shard whose redo mends it."""

    path: str
    reason: str
    shard: int | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def parallel_map(store: OutputStore, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``fn`` over ``items``: in threads on object storage, where each call waits on the network."""
    items = list(items)
    if store.local or len(items) < 2:
        return [fn(item) for item in items]
    with concurrent.futures.ThreadPoolExecutor(REMOTE_CHECKS, thread_name_prefix="actmap-check") as pool:
        return list(pool.map(fn, items))


def read_footer(store: OutputStore, relative: str) -> Footer:
    """A data file's rows and its first and last source index (from the column statistics of
    its row groups; from the index column itself where a writer kept none)."""
    with store.fs.open_input_file(store.path(relative)) as handle:
        parquet = pq.ParquetFile(handle)
        meta = parquet.metadata
        column = next((j for j in range(meta.num_columns) if meta.schema.column(j).path == INDEX), None)
        if column is None:
            raise ValueError(f"it has no {INDEX!r} column")
        if not meta.num_rows:
            return 0, None
        stats = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)
                 if meta.row_group(g).num_rows]
        if all(s is not None and s.has_min_max for s in stats):
            return meta.num_rows, (min(s.min for s in stats), max(s.max for s in stats))
        values = parquet.read(columns=[INDEX]).column(INDEX)
        return meta.num_rows, (int(np.min(values)), int(np.max(values)))


def file_problem(record: ShardRecord, layer: str, listed_size: int | None, footer: Footer | Exception | None) -> str | None:
    """What is wrong with ``record``'s file of ``layer`` (``None``: nothing), given its size in
    the listing (``None``: not there) and its footer (an exception: unreadable; ``None``: not
    read, because the size already tells)."""
    if listed_size is None:
        return "missing"
    expected = record.bytes.get(layer)
    if expected is not None and listed_size != expected:
        return f"{listed_size:,} bytes, its record says {expected:,} (cut short, or replaced)"
    if isinstance(footer, Exception):
        return f"unreadable ({describe_error(footer)})"
    if footer is None:
        return None
    rows, bounds = footer
    if layer in record.rows and rows != record.rows[layer]:
        return f"holds {rows:,} rows, its record says {record.rows[layer]:,}"
    pinned = record.index_range.get(layer)
    if pinned is not None and bounds != tuple(pinned):
        return f"holds indices {_span(bounds)}, its record says {_span(pinned)}"
    return range_problem(bounds, record.start, record.stop)


def range_problem(bounds: tuple[int, int] | None, start: int, stop: int) -> str | None:
    """Why a file whose indices span ``bounds`` cannot be of the shard of samples ``[start, stop)``."""
    if bounds is not None and not (start <= bounds[0] and bounds[1] < stop):
        return f"holds indices {_span(bounds)}, outside its shard's samples {start}-{stop - 1}"
    return None


def _span(bounds: tuple[int, int] | None) -> str:
    return "none" if bounds is None else f"{bounds[0]}-{bounds[1]}"


def record_problem(record: ShardRecord, path: str, plan: ShardPlan | None) -> str | None:
    """What is wrong with a record as such: a shard other than its file name's, samples other
    than the plan's, a file of another shard."""
    if record.shard != record_shard(path):
        return f"holds the record of shard {record.shard}"
    if plan is not None:
        if record.shard >= len(plan):
            return f"shard {record.shard} is not in the plan of {len(plan):,} shards"
        shard = plan[record.shard]
        if (record.start, record.stop) != (shard.start, shard.stop):
            return (f"covers samples {record.start}-{record.stop - 1}, the plan's shard {shard.id} "
                    f"covers {shard.start}-{shard.stop - 1}")
    for layer, name in record.files.items():
        if name != layer_file(layer, record.shard):
            return f"names the file {name!r}, not its shard's {layer_file(layer, record.shard)!r}"
    return None


@dataclasses.dataclass
class DumpCheck:
    """The records of a dump whose files passed the check (``records``), what failed
    (``damage``, each naming a file), and the data files of each layer checked, with sizes."""

    records: dict[int, ShardRecord]
    damage: list[Damage]
    files: dict[str, dict[str, int]]

    @property
    def damaged_shards(self) -> set[int]:
        return {d.shard for d in self.damage if d.shard is not None}


def _read_record(store: OutputStore, path: str) -> ShardRecord | Damage:
    try:
        return ShardRecord.from_dict(store.read_json(path))
    except (OSError, ValueError, RecordError) as exc:  # JSON that does not parse is a ValueError
        return Damage(path, f"the record cannot be read ({describe_error(exc)})", record_shard(path))


def check_dump(store: OutputStore, plan: ShardPlan | None, layers: Collection[str],
               footers: bool = True) -> DumpCheck:
    """Read every shard record and check the files of ``layers`` they name, and the other data
    files in those layers' folders against the plan.

    Args:
        store: the dump.
        plan: the manifest's shard plan (``None``: unknown, records are checked on their own).
        layers: the layers whose files to check (the records of the others are read only).
        footers: read each file's footer (rows, first and last index); without, sizes only.
    """
    records: dict[int, ShardRecord] = {}
    damage: list[Damage] = []
    paths = [p for p in store.list_files(SHARDS_DIR) if is_shard_record(p)]
    for path, read in zip(paths, parallel_map(store, lambda p: _read_record(store, p), paths)):
        problem = read if isinstance(read, Damage) else (
            None if (reason := record_problem(read, path, plan)) is None else Damage(path, reason, record_shard(path)))
        if problem is not None:
            damage.append(problem)
        else:
            records[read.shard] = read
    files = {layer: {f: size for f, size in store.sizes(partition_dir(layer)).items() if is_data_file(f)}
             for layer in layers}
    named = [(record, layer, path) for record in records.values() for layer, path in record.files.items()
             if layer in files]
    recorded = {path for _, _, path in named}
    unrecorded = [(layer, path) for layer, listing in files.items() for path in listing if path not in recorded]

    def footer(path: str) -> Footer | Exception:
        try:
            return read_footer(store, path)
        except Exception as exc:  # any file that does not read as Parquet is damage, named
            return exc

    # a footer is read where the size does not already tell
    to_read = [path for record, layer, path in named
               if footers and files[layer].get(path) is not None and files[layer][path] == record.bytes.get(layer, files[layer][path])]
    to_read += [path for _, path in unrecorded if plan is not None and footers]
    read = dict(zip(to_read, parallel_map(store, footer, to_read)))
    for record, layer, path in named:
        reason = file_problem(record, layer, files[layer].get(path), read.get(path))
        if reason is not None:
            damage.append(Damage(path, reason, record.shard))
    for layer, path in unrecorded:  # files of shards in flight or cut short: each must be of its shard
        shard = file_shard(path)
        if shard in records:
            damage.append(Damage(path, f"its shard's record lists no file of layer {layer!r}", shard))
        elif path not in read:
            continue
        elif shard >= len(plan):
            damage.append(Damage(path, f"shard {shard} is not in the plan of {len(plan):,} shards"))
        elif isinstance(read[path], Exception):
            damage.append(Damage(path, f"unreadable ({describe_error(read[path])})", shard))
        elif (reason := range_problem(read[path][1], plan[shard].start, plan[shard].stop)) is not None:
            damage.append(Damage(path, reason, shard))
    bad = {d.shard for d in damage}
    return DumpCheck({k: r for k, r in records.items() if k not in bad}, damage, files)


def page_problem(store: OutputStore, path: str) -> str | None:
    """Whether every page of the data file ``path`` passes its checksum: the whole file is read."""
    try:
        with store.fs.open_input_file(store.path(path)) as handle:
            pq.ParquetFile(handle, page_checksum_verification=True).read()
    except Exception as exc:  # pyarrow says OSError for a checksum, other errors for other damage
        return f"a page does not read back as written ({describe_error(exc)})"
    return None


def mend_by_redo(damage: Damage) -> str:
    """What to do about damage a rerun's cheap check does not see (its size and footer are
    intact): drop the shard's record, so that the rerun redoes it."""
    return (f"{damage}; delete its shard's record ({shard_record_path(damage.shard)}) and rerun the same command "
            "to redo the shard" if damage.shard is not None else f"{damage}; delete it")


def index_problems(store: OutputStore, path: str, start: int, stop: int, bad: Collection[int]) -> list[str]:
    """Whether the file ``path`` of the shard of samples ``[start, stop)`` holds each of them
    exactly once, but those in ``bad`` (recorded as unreadable): the index column is read."""
    with store.fs.open_input_file(store.path(path)) as handle:
        indices = pq.ParquetFile(handle, page_checksum_verification=True).read(columns=[INDEX]).column(INDEX)
    values, counts = np.unique(np.asarray(indices), return_counts=True)
    problems = []
    twice = values[counts > 1]
    if len(twice):
        problems.append(f"holds {len(twice):,} indices more than once ({_some(twice)})")
    outside = values[(values < start) | (values >= stop)]
    if len(outside):
        problems.append(f"holds {len(outside):,} indices outside its shard's samples {start}-{stop - 1} "
                        f"({_some(outside)})")
    expected = np.setdiff1d(np.arange(start, stop), np.fromiter(bad, np.int64, len(bad)))
    missing = np.setdiff1d(expected, values)
    if len(missing):
        problems.append(f"lacks {len(missing):,} of its shard's samples ({_some(missing)})")
    listed_bad = np.intersect1d(values, np.fromiter(bad, np.int64, len(bad)))
    if len(listed_bad):
        problems.append(f"holds {len(listed_bad):,} samples its record lists as bad ({_some(listed_bad)})")
    return problems


def _some(values: Any, limit: int = 5) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")
