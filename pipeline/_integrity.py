"""Whether a dump's files are what its shard records say was committed.

A shard's record pins each file it wrote: the size, the rows, and the first and last source
index. Checking a file costs its size (one listing of its layer's folder gives them all) and
its footer (one small read); no data is read. The footer also says what the file holds (its
layer, its columns, each tensor column's dtype and shape), which must be what its layer holds:
its folder's layer, the manifest's dtype and shape, the columns of the layer's other files. A rerun redoes the shards whose files fail the
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

import collections
import concurrent.futures
import dataclasses
import functools
import json
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, TypeVar

import numpy as np
import pyarrow.parquet as pq

from ._encoding import layout_problem, parse_metadata
from ._layout import (ACTIVATION, INDEX, METADATA_KEY, SAMPLE_ID, SHARDS_DIR, file_shard, is_data_file, is_owned,
                      is_shard_record, layer_file, partition_dir, record_shard, shard_record_path, shape_columns)
from ._records import LayerSpec, ShardRecord
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


def read_footer(store: OutputStore, relative: str, layer: str | None = None) -> tuple[Footer, FileLayout | str | None]:
    """A data file's rows and its first and last source index (from the column statistics of
    its row groups; from the index column itself where a writer kept none), and what its footer
    says it holds (:func:`file_layout`, for a file of ``layer``; ``None`` without a layer)."""
    with store.fs.open_input_file(store.path(relative)) as handle:
        parquet = pq.ParquetFile(handle)
        meta = parquet.metadata
        column = next((j for j in range(meta.num_columns) if meta.schema.column(j).path == INDEX), None)
        if column is None:
            raise ValueError(f"it has no {INDEX!r} column")
        layout = None if layer is None else file_layout(parquet, layer)
        if not meta.num_rows:
            return (0, None), layout
        stats = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)
                 if meta.row_group(g).num_rows]
        if all(s is not None and s.has_min_max for s in stats):
            return (meta.num_rows, (min(s.min for s in stats), max(s.max for s in stats))), layout
        values = parquet.read(columns=[INDEX]).column(INDEX)
        return (meta.num_rows, (int(np.min(values)), int(np.max(values)))), layout


@dataclasses.dataclass(frozen=True)
class FileLayout:
    """What a data file's footer says it holds: each column's Arrow type (as text) and the spec
    of each tensor column (``{"dtype", "shape"}``, from the ``actmap`` metadata)."""

    types: Mapping[str, str]
    specs: Mapping[str, Mapping[str, Any]]

    def column(self, name: str) -> tuple[str, str | None] | None:
        """Column ``name`` as ``(type, spec as JSON or None)``; ``None`` where the file lacks it."""
        return self._columns.get(name)

    @functools.cached_property
    def _columns(self) -> dict[str, tuple[str, str | None]]:
        return {name: (kind, None if (spec := self.specs.get(name)) is None else json.dumps(spec, sort_keys=True))
                for name, kind in self.types.items()}


def file_layout(parquet: pq.ParquetFile, layer: str) -> FileLayout | str:
    """What the footer of ``parquet``, a data file of ``layer``'s folder, says it holds; or why
    that cannot be so (its ``actmap`` metadata does not parse, names another layer, or
    describes columns the file's schema does not have as it says; its row groups do not add up
    to its rows)."""
    raw = (parquet.metadata.metadata or {}).get(METADATA_KEY)
    schema = parquet.schema_arrow
    try:
        doc = parse_metadata(raw)
    except ValueError as exc:
        return f"its footer is damaged: {exc}"
    copy = (schema.metadata or {}).get(METADATA_KEY)  # (pyarrow keeps a second one in the Arrow schema)
    if copy is not None and copy != raw:
        return "its footer is damaged: its two copies of the 'actmap' metadata differ"
    if doc.get("layer", layer) != layer:
        return (f"its footer says it holds rows of layer {doc['layer']!r}, not of {layer!r}, whose folder it is in "
                "(a file of another layer?)")
    grouped = sum(parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups))
    if grouped != parquet.metadata.num_rows:
        return f"its footer is damaged: its row groups hold {grouped:,} rows, it says {parquet.metadata.num_rows:,}"
    missing = [c for c in (SAMPLE_ID, INDEX) if c not in schema.names]
    if ACTIVATION not in doc["columns"]:
        return f"its footer is damaged: its 'actmap' metadata describes no {ACTIVATION!r} column"
    problem = (f"it has no {missing[0]!r} column" if missing else None) or layout_problem(schema, doc["columns"])
    if problem is not None:
        return f"its footer is damaged: {problem}"
    return FileLayout({f.name: str(f.type) for f in schema}, doc["columns"])


def layout_problems(layouts: Mapping[str, FileLayout], expected: LayerSpec | None = None) -> dict[str, str]:
    """The files of one layer (by path) whose footers disagree with what the layer holds: its
    activations are ``expected`` (the manifest's; ``None``: unknown), and its other columns
    are what most of its files hold (the first file's, on a tie). A tensor column (an array
    label) may be missing from a file whose rows have none; any other column is in every file.

    >>> a = FileLayout({INDEX: "int64", ACTIVATION: "fixed_size_binary[8]"},
    ...                {ACTIVATION: {"dtype": "float32", "shape": [2]}})
    >>> b = FileLayout({INDEX: "int32", ACTIVATION: "fixed_size_binary[8]"}, a.specs)
    >>> layout_problems({"f0": a, "f1": b, "f2": a})
    {'f1': "its footer disagrees with the layer's other files: its column 'index' is int32, theirs int64"}
    >>> layout_problems({"f0": a}, LayerSpec((2,), "int32"))
    {'f0': "its footer says its activations are 2 float32, the dump's manifest says 2 int32"}
    """
    problems = {}
    if expected is not None:
        for path, layout in layouts.items():
            spec = layout.specs[ACTIVATION]
            # (a dump of variable shapes made by 0.1.0 has a shape in its manifest: its first sample's)
            if spec["dtype"] != expected.dtype or (spec["shape"] is not None and tuple(spec["shape"]) != expected.shape):
                problems[path] = (f"its footer says its activations are {LayerSpec.from_dict(spec).describe()}, the "
                                  f"dump's manifest says {expected.describe()}")
    reference = _reference_columns(list(layouts.values()))
    for path, layout in layouts.items():
        problem = next((p for name, want in reference.items() if (p := _column_problem(name, layout.column(name), want))),
                       None)
        if problem is not None and path not in problems:
            problems[path] = f"its footer disagrees with the layer's other files: {problem}"
    return problems


def _reference_columns(layouts: list[FileLayout]) -> dict[str, tuple[str, str | None] | None]:
    """Each column as most of ``layouts`` hold it (``None``: most lack it); a tensor column as most
    of the files that have it hold it. Shape columns go with their tensor column."""
    companions = set().union(*(shape_columns(layout.specs) for layout in layouts))
    reference = {}
    for name in dict.fromkeys(n for layout in layouts for n in layout.types):
        if name in companions:
            continue
        held = [layout.column(name) for layout in layouts]
        counts = collections.Counter(held)
        top = _most(counts)
        tensors = collections.Counter(h for h in held if h is not None and h[1] is not None)
        if top is SPLIT and any(h is not None and h[1] is None for h in counts):  # plain in as many files
            reference[name] = SPLIT
        elif top is not None and top is not SPLIT and top[1] is None:  # a plain column
            reference[name] = top
        elif tensors:  # an array label: the files whose rows have none lack it, and do not count
            reference[name] = TENSORS_SPLIT if (most := _most(tensors)) is SPLIT else most
        else:
            reference[name] = top
    return reference


#: A column the layer's files hold in two or more ways, none held by more files than the others
#: (``TENSORS_SPLIT``: an array label, which a file whose rows have none may lack).
SPLIT, TENSORS_SPLIT = ("", ""), ("", "tensors")


def _most(counts: collections.Counter) -> Any:
    """The value held most, or :data:`SPLIT` when another is held as often: then no file can
    be taken for the layer's, and every file that holds one of them is named, so a rerun
    redoes them all rather than the good ones.

    >>> _most(collections.Counter("aab")), _most(collections.Counter("ab")) is SPLIT
    ('a', True)
    """
    top = counts.most_common(2)
    return SPLIT if len(top) == 2 and top[0][1] == top[1][1] else top[0][0]


def _column_problem(name: str, have: tuple[str, str | None] | None, want: tuple[str, str | None] | None) -> str | None:
    if want is TENSORS_SPLIT and have is None:
        return None
    if want is SPLIT or want is TENSORS_SPLIT:
        return f"the layer's files hold its column {name!r} in as many ways as each other: " + (
            "this one lacks it" if have is None else f"this one as {_held(have)}")
    if have == want or (have is None and want[1] is not None):  # (an array label the file's rows lack)
        return None
    if want is None:
        return f"it has a column {name!r} ({_held(have)}) that they lack"
    if have is None:
        return f"it lacks the column {name!r} ({_held(want)}) that they have"
    return f"its column {name!r} is {_held(have)}, theirs {_held(want)}"


def _held(column: tuple[str, str | None]) -> str:
    kind, spec = column
    return kind if spec is None else f"{kind} holding {LayerSpec.from_dict(json.loads(spec)).describe()}"


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
               footers: bool = True, layer_info: Mapping[str, LayerSpec] | None = None) -> DumpCheck:
    """Read every shard record and check the files of ``layers`` they name, and the other data
    files in those layers' folders against the plan.

    Args:
        store: the dump.
        plan: the manifest's shard plan (``None``: unknown, records are checked on their own).
        layers: the layers whose files to check (the records of the others are read only).
        footers: read each file's footer (rows, first and last index, and what it says it holds:
            its layer, columns and tensor specs, against :func:`layout_problems`); without,
            sizes only.
        layer_info: the manifest's stored type of each layer, that the footers must agree with.
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
    # (a copy in a folder inside a layer's is none of the dump's files: readers pass over it)
    files = {layer: {f: size for f, size in store.sizes(partition_dir(layer)).items()
                     if is_data_file(f) and is_owned(f)} for layer in layers}
    named = [(record, layer, path) for record in records.values() for layer, path in record.files.items()
             if layer in files]
    recorded = {path for _, _, path in named}
    unrecorded = [(layer, path) for layer, listing in files.items() for path in listing if path not in recorded]

    layer_of = {path: layer for _, layer, path in named} | {path: layer for layer, path in unrecorded}
    layouts: dict[str, FileLayout | str | None] = {}

    def footer(path: str) -> Footer | Exception:
        try:
            read, layouts[path] = read_footer(store, path, layer_of[path])
            return read
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
    damage += _layout_damage(layouts, layer_of, {d.path for d in damage}, layer_info or {})
    bad = {d.shard for d in damage}
    return DumpCheck({k: r for k, r in records.items() if k not in bad}, damage, files)


def _layout_damage(layouts: Mapping[str, FileLayout | str | None], layer_of: Mapping[str, str],
                   damaged: Collection[str], layer_info: Mapping[str, LayerSpec]) -> list[Damage]:
    """The files (not in ``damaged`` already) whose footers say they hold other than their
    layer does: :func:`file_layout`, then :func:`layout_problems` over each layer's files."""
    damage, by_layer = [], collections.defaultdict(dict)
    for path, layout in sorted(layouts.items()):
        if path in damaged or layout is None:
            continue
        if isinstance(layout, str):
            damage.append(Damage(path, layout, file_shard(path)))
        else:
            by_layer[layer_of[path]][path] = layout
    for layer, files in by_layer.items():
        damage += [Damage(path, problem, file_shard(path))
                   for path, problem in layout_problems(files, layer_info.get(layer)).items()]
    return damage


def page_problem(store: OutputStore, path: str) -> str | None:
    """Whether every page of the data file ``path`` passes its checksum: the whole file is read."""
    try:
        with store.fs.open_input_file(store.path(path)) as handle:
            pq.ParquetFile(handle, page_checksum_verification=True).read()
    except Exception as exc:  # pyarrow says OSError for a checksum, other errors for other damage
        return unreadable_pages(exc)
    return None


def unreadable_pages(error: BaseException) -> str:
    """The reason of a file whose pages failed to read with ``error``."""
    return f"a page does not read back as written ({describe_error(error)})"


def mend_by_redo(damage: Damage) -> str:
    """What to do about damage a rerun's cheap check does not see (its size and footer are
    intact): drop the shard's record, so that the rerun redoes it."""
    return (f"{damage}; delete its shard's record ({shard_record_path(damage.shard)}) and rerun the same command "
            "to redo the shard" if damage.shard is not None else f"{damage}; delete it")


def index_problems(store: OutputStore, path: str, start: int, stop: int, bad: Collection[int]) -> list[str]:
    """Whether the file ``path`` of the shard of samples ``[start, stop)`` holds each of them
    exactly once, but those in ``bad`` (recorded as unreadable): the index column is read (an
    error where its pages do not read back: see :func:`index_damage`)."""
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


def index_damage(store: OutputStore, path: str, record: ShardRecord) -> tuple[list[Damage], Damage | None]:
    """:func:`index_problems` of ``record``'s file ``path`` as damage; and, apart, the damage of
    an index column whose pages do not read back (which a rerun's cheap check does not see)."""
    try:
        problems = index_problems(store, path, record.start, record.stop, {b.index for b in record.bad})
    except Exception as exc:  # pyarrow says OSError for a checksum, other errors for other damage
        return [], Damage(path, unreadable_pages(exc), record.shard)
    return [Damage(path, problem, record.shard) for problem in problems], None


def _some(values: Any, limit: int = 5) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")
