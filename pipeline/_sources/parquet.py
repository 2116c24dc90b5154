"""A Parquet table (one file, a folder of files, or the files of a folder a glob matches:
``data/train-*.parquet``; local or on object storage) with an encoded-image column.

The other columns (all, or those named in ``columns``) pass through to every output row with
their Arrow types: ids, labels, masks, anything; so do the keys of hive-style folders
(``label=3/part-0.parquet``: a column ``label``, an integer where every value is one, else text;
a file's own column of that name comes first). The files need not have the same columns: a
column that some files lack is null in their rows (a warning names them), but every file must
store the image and id columns itself (a folder's key is none), each once, and a column's types
must agree across files (integers of any width, floats of any width, text, or bytes; lists,
maps and structs of such, a struct's fields by name; a null type, at any depth, agrees with
any: pandas types a column of empty lists ``list<null>``); the driver checks every file's
schema before any work. ``id_column`` gives the sample ids; without it
the id is the row's index (an id stored as bytes is its UTF-8 text, else its hex digits). An
image column may hold the encoded bytes, or a struct with a ``bytes`` field (as Hugging Face
datasets write them); a row with no bytes is a bad sample that says why. In a folder, where some
files end in ``.parquet``, files with another extension are not data (a warning names them: a
``README.md``, a partial download; Hive's files, without one, are); files and folders named
``_*`` or ``.*`` never are, nor objects whose key no path reaches (``t/sub//b.parquet``: a
warning names them).

The driver reads the files' footers once and indexes their row groups: which file, which row
group, how many rows, and the index of the first. A shard then reads each row group that holds
its rows once, in order, with only the columns it needs, so its cost depends on its own size
only, not on where it lies or on how large the dataset is. A row group that cannot be read on a
local disk (a damaged page) makes its rows bad samples that name it; over the network the error
fails the shard, which is retried, since it may pass. So with the driver's search for repeated
ids: a row group whose ids cannot be read is left out of it on a local disk (a warning names
it), and over the network it stops the run, to be rerun.
"""

from __future__ import annotations

import base64
import bisect
import dataclasses
import hashlib
import itertools
import json
import logging
import posixpath
import re
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..config import Config, ParquetSpec, SourceSpec
from ..errors import ConfigError, close_matches
from ._base import BadSample, Sample, StreamingSource
from ._files import Location, glob_names, missing, no_match, open_location, read_ahead
from ._ids import repeated_ids, sample_ids
from ._index import Index, MemoryIndex, digest

log = logging.getLogger(__name__)

#: Rows decoded at a time from a row group, and the read buffer: a shard holds about this much.
BATCH_ROWS = 256
READ_BUFFER = 1 << 20
#: On object storage or a network file system, where each read waits on the network: batches
#: read ahead of the decoding, and the largest row group (compressed bytes) whose columns are
#: fetched at once.
READ_AHEAD = 4
PRE_BUFFER_LIMIT = 64 << 20
#: Footers read at once by the driver.
FOOTER_READERS = 16
#: Reads a worker keeps open where a shard stopped inside a row group, for a later shard of it:
#: about the shards it runs at once (each holds its buffer, on object storage its pre-buffered group).
PARKED_READERS = 4
#: Ids read at a time by the driver's search for repeated ids.
ID_BATCH_ROWS = 65_536
#: How ids stored as binary become sample ids (:func:`._ids.sample_id`), in a dump's identity.
BINARY_IDS = "binary as UTF-8 text, else hex digits"

_INDEX_SCHEMA = pa.schema([("file", pa.string()), ("group", pa.int32()), ("rows", pa.int64()),
                           ("first", pa.int64())])


@dataclasses.dataclass(frozen=True)
class _Unread:
    """``rows`` rows that cannot be read, and why (their samples are bad)."""

    rows: int
    reason: str


@dataclasses.dataclass
class _Reader:
    """A read stopped inside row group ``group``: ``batches`` give its rows from ``row`` (the
    group's own row number) on, from the file ``handle`` (closed with the reader)."""

    group: int
    row: int
    batches: Iterator[pa.RecordBatch]
    handle: pa.NativeFile


class _Parked:
    """The reads that shards left inside a row group, for a later shard of the same group.

    Parquet cannot start a read inside a row group: a shard that starts in one reads it from
    its start, so over a group much larger than a shard each shard read more than the last
    (a worker given a group's shards in turn read the group's rows over and over). A shard that
    stops inside a group, past more of it than the shard's own rows, leaves its read here, and a
    shard that starts further on in the group takes the one nearest before its start and reads
    on from there. At most ``limit`` are kept, the oldest closed first (each holds its file's
    buffer and its current pages: groups no larger than a shard or two are read again instead).
    """

    def __init__(self, limit: int = PARKED_READERS):
        self.limit = limit
        self._readers: list[_Reader] = []
        self._lock = threading.Lock()  # the shards a worker runs at once share its source

    def take(self, group: int, row: int) -> _Reader | None:
        """The read of ``group`` furthest along that has not passed ``row``, now the caller's."""
        with self._lock:
            fits = [r for r in self._readers if r.group == group and r.row <= row]
            best = max(fits, key=lambda r: r.row, default=None)
            if best is not None:
                self._readers.remove(best)
            return best

    def put(self, reader: _Reader) -> None:
        with self._lock:
            self._readers.append(reader)
            evicted, self._readers = self._readers[:-self.limit], self._readers[-self.limit:]
        for old in evicted:
            old.handle.close()

    def close(self) -> None:
        with self._lock:
            readers, self._readers = self._readers, []
        for reader in readers:
            reader.handle.close()


#: File name extensions that mark a Parquet file (where some files have one, the others are not data).
PARQUET_EXTENSIONS = frozenset({"parquet", "parq", "pq"})


def _data_files(fs, root: str, path: str) -> list[pafs.FileInfo]:
    """The data files under the folder ``root``: every file but those whose name (or a folder's)
    starts with ``.`` or ``_`` (Spark's ``_SUCCESS``, ``.crc`` files); where some end in
    ``.parquet``, files with another extension are left out, and a warning names them (a
    ``README.md`` beside the data, a partial download). Files without an extension, as Hive
    writes them (``000000_0``), are always taken."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted((i for i in infos if i.type == pafs.FileType.File
                    and not any(part.startswith((".", "_")) for part in i.path[len(root):].split("/") if part)),
                   key=lambda i: i.path)
    files = _nameable(files, root, path)
    extensions = [posixpath.splitext(i.base_name)[1].lower().lstrip(".") for i in files]
    if not any(e in PARQUET_EXTENSIONS for e in extensions):
        return files
    others = [i.path[len(root):].lstrip("/") for i, e in zip(files, extensions) if e and e not in PARQUET_EXTENSIONS]
    if others:
        log.warning("%d file(s) in %r do not end in .parquet and are left out, e.g. %r", len(others), path, others[0])
    return [i for i, e in zip(files, extensions) if not e or e in PARQUET_EXTENSIONS]


def _nameable(files: list[pafs.FileInfo], root: str, path: str) -> list[pafs.FileInfo]:
    """``files`` but the objects whose key has an empty, ``.`` or ``..`` part (``t/sub//b.parquet``,
    which object storage allows): no path reaches them, so pyarrow cannot open them; a warning
    names them, as the folder source's listing does."""
    def reachable(info: pafs.FileInfo) -> bool:  # (below the folder: its own path is the user's to spell)
        return all(part not in ("", ".", "..") for part in _relative(info.path, root).split("/"))

    unnamed = [_relative(i.path, root) for i in files if not reachable(i)]
    if unnamed:
        log.warning("%d object(s) in %r have a key with an empty, '.' or '..' part, which no path reaches, and "
                    "are left out, e.g. %r", len(unnamed), path, unnamed[0])
    return [i for i in files if reachable(i)]


def _relative(path: str, root: str) -> str:
    """A file's path relative to the folder ``root``, as the index keeps it.

    >>> _relative("b/t/x/a.pq", "b/t"), _relative("/a.pq", "")
    ('x/a.pq', 'a.pq')
    """
    return path[len(root):].lstrip("/") if path.startswith(root) else path


def _pattern(root: str, local: bool) -> str | None:
    """The glob in the last part of a path that names nothing (``data/train-*.parquet``), if it
    has one (``?`` only in local paths: in a URI it begins the query).

    >>> _pattern("/data/train-*.pq", True), _pattern("s3://b/data/x?.pq", False)
    ('train-*.pq', None)
    """
    name = root.rsplit("/", 1)[-1]
    return name if any(c in name for c in _globs(local)) else None


def _globs(local: bool) -> str:
    return "*[?" if local else "*["


def _glob_in_folders(location: Location, path: str) -> None:
    """A :class:`ConfigError` for a path that names nothing because a folder part of it is a
    glob (``data/label=*/a.parquet``): the globs match file names only."""
    folder = location.root.rpartition("/")[0]
    if any(c in folder for c in _globs(location.local)) and location.fs.get_file_info(folder).type == pafs.FileType.NotFound:
        raise ConfigError(ParquetSpec.key("path"), f"{path!r} names nothing, and a glob matches the file names of one "
                          "folder, not folders: name the folder above them (a folder takes the files of all its "
                          "sub-folders, hive-style 'label=3/' ones with their keys as columns)")


def _matching(fs: pafs.FileSystem, folder: str, pattern: str, path: str) -> list[pafs.FileInfo]:
    """The files in ``folder`` whose names match the glob ``pattern`` (:class:`ConfigError`
    where none does, or where the folder is not there); names that start with ``.`` or ``_``
    are no data, unless the pattern starts so too."""
    try:
        entries = fs.get_file_info(pafs.FileSelector(folder))
    except FileNotFoundError:
        raise ConfigError(ParquetSpec.key("path"), f"{path!r}: its folder {folder!r} does not exist") from None
    by_name = {i.base_name: i for i in entries if i.type == pafs.FileType.File}
    files = [by_name[name] for name in glob_names(by_name, pattern, skip=(".", "_"))]
    if not files:
        names = sorted(by_name)
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "") if names else "none"
        why = no_match(pattern, names, [i.base_name for i in entries if i.type == pafs.FileType.Directory],
                       skip=(".", "_"))
        raise ConfigError(ParquetSpec.key("path"), f"{path!r} matches no file in {folder!r} (its files: {shown})"
                          + (f"; {why}" if why else ""))
    return files


def _fragments(fs: pafs.FileSystem, files: Sequence[pafs.FileInfo]) -> list[ds.ParquetFileFragment]:
    """The files, sorted by path, as pyarrow reads them: with the sizes their listing gave, so
    that no read first asks a file's size (a request each on object storage)."""
    parquet = ds.ParquetFileFormat()
    return [parquet.make_fragment(i.path, fs, file_size=i.size) for i in sorted(files, key=lambda i: i.path)]


def _row_groups(fragments: Sequence[ds.ParquetFileFragment], root: str) -> tuple[pa.Table, dict[str, pa.Schema]]:
    """One row per row group of the files: file, group, rows, first; and each file's schema.
    The footers are read several at a time (each is a request on object storage)."""
    def groups_of(fragment: ds.ParquetFileFragment) -> tuple[list[tuple[int, int]], pa.Schema]:
        try:
            return [(group.id, group.num_rows) for group in fragment.row_groups], fragment.physical_schema
        except (OSError, pa.ArrowInvalid) as exc:
            relative = _relative(fragment.path, root)
            raise ConfigError(ParquetSpec.key("path"), f"{relative!r} is not a Parquet file that can be read "
                              f"({exc}); remove it, or point {ParquetSpec.key('path')} at the data files") from None

    with ThreadPoolExecutor(FOOTER_READERS) as pool:
        per_file = list(pool.map(groups_of, fragments))
    files, groups, rows, firsts = [], [], [], []
    schemas: dict[str, pa.Schema] = {}
    first = 0
    for fragment, (found, schema) in zip(fragments, per_file):
        relative = _relative(fragment.path, root)
        schemas[relative] = schema
        for group, count in found:
            files.append(relative)
            groups.append(group)
            rows.append(count)
            firsts.append(first)
            first += count
    return pa.table([files, groups, rows, firsts], schema=_INDEX_SCHEMA), schemas


def _is_binary(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        return _is_binary(kind.value_type)
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind) \
        or pa.types.is_binary_view(kind)


def _family(kind: pa.DataType) -> object:
    """What a column's values must share across files for one output type to hold them all as
    they are: integers, floats, text, bytes, timestamps of one zone, lists, maps and structs of
    such (a struct's fields by name); ``"null"`` for a null type, which agrees with any family
    (:func:`_merged`: pandas types a column of empty lists ``list<null>``); else the type
    itself. (Integers and floats do not mix: an int64 over 2**53 is no double.)

    >>> _family(pa.map_(pa.string(), pa.list_(pa.null())))
    ('map', 'text', ('list', 'null'))
    """
    if pa.types.is_dictionary(kind):
        return _family(kind.value_type)
    for family, test in (("null", pa.types.is_null), ("integer", pa.types.is_integer),
                         ("float", pa.types.is_floating),
                         ("text", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)
                          or pa.types.is_string_view(t)),
                         ("bytes", lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)
                          or pa.types.is_binary_view(t))):
        if test(kind):
            return family
    if pa.types.is_timestamp(kind):
        return ("timestamp", kind.tz)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_list_view(kind) \
            or pa.types.is_large_list_view(kind):
        return ("list", _family(kind.value_type))
    if pa.types.is_map(kind):
        return ("map", _family(kind.key_type), _family(kind.item_type))
    if pa.types.is_struct(kind):
        return ("struct", tuple((field.name, _family(field.type)) for field in kind))
    return kind


def _merged(one: object, other: object) -> object | None:
    """The :func:`_family` of a column of two files whose families are ``one`` and ``other``
    (``None``: they disagree): a null, at any depth, takes the other's family; structs take
    the fields of both (a file whose struct lacks a field has nulls in it), which must agree
    where both have them.

    >>> _merged(("list", "null"), ("list", "text")), _merged(("list", "integer"), ("list", "text"))
    (('list', 'text'), None)
    >>> _merged(("struct", (("y", "integer"),)), ("struct", (("z", "text"), ("y", "null"))))
    ('struct', (('y', 'integer'), ('z', 'text')))
    """
    if one == "null" or other == "null":
        return other if one == "null" else one
    if not (isinstance(one, tuple) and isinstance(other, tuple) and one[0] == other[0] and len(one) == len(other)):
        return one if one == other else None
    if one[0] in ("list", "map"):
        parts = [_merged(a, b) for a, b in zip(one[1:], other[1:])]
        return None if None in parts else (one[0], *parts)
    if one[0] == "struct":
        fields = dict(one[1])
        for name, family in other[1]:
            fields[name] = _merged(fields[name], family) if name in fields else family
        return None if None in fields.values() else ("struct", tuple(fields.items()))
    return one if one == other else None


def _plain(kind: pa.DataType) -> pa.DataType:
    """``kind`` with each dictionary, at any depth, as the type of its values, and each view
    type as its plain one (pyarrow cannot yet take or sort rows of views).

    >>> _plain(pa.list_(pa.dictionary(pa.int32(), pa.string_view())))
    ListType(list<item: string>)
    """
    if pa.types.is_dictionary(kind):
        return _plain(kind.value_type)
    if pa.types.is_string_view(kind) or pa.types.is_binary_view(kind):
        return pa.string() if pa.types.is_string_view(kind) else pa.binary()
    if pa.types.is_list_view(kind) or pa.types.is_large_list_view(kind):
        item = kind.value_field.with_type(_plain(kind.value_type))
        return pa.list_(item) if pa.types.is_list_view(kind) else pa.large_list(item)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        item = kind.value_field.with_type(_plain(kind.value_type))
        return pa.list_(item) if pa.types.is_list(kind) else pa.large_list(item)
    if pa.types.is_fixed_size_list(kind):
        return pa.list_(kind.value_field.with_type(_plain(kind.value_type)), kind.list_size)
    if pa.types.is_struct(kind):
        return pa.struct([field.with_type(_plain(field.type)) for field in kind])
    if pa.types.is_map(kind):
        return pa.map_(kind.key_field.with_type(_plain(kind.key_type)), kind.item_field.with_type(_plain(kind.item_type)))
    return kind


def _widest(name: str, having: Sequence[tuple[str, pa.Field]]) -> pa.Field:
    """The type a column takes in the output, from its types in the files that have it: the one
    they share, else the widest of one :func:`_family` (pyarrow's permissive promotion: integer
    and float widths, timestamp units, nullability inside lists, a null type at any depth as
    the others' type, a struct with the fields of every file's; a file where the column is all
    null has no say); a dictionary, at any depth, as its values. :class:`ConfigError` where the
    families differ, naming two files that disagree."""
    types = list(dict.fromkeys(field.type for _, field in having))
    if len(types) == 1:  # (a dictionary as its values still: a batch's own dictionary may need wider indices)
        return having[0][1].with_type(_plain(types[0]))
    typed = [(f, field) for f, field in having if not pa.types.is_null(field.type)] or having[:1]
    (first_file, field), other = _disagreeing(typed)
    if other is None:
        try:
            plain = list(dict.fromkeys(_plain(o.type) for _, o in typed))
            widest = pa.unify_schemas([pa.schema([pa.field(name, k)]) for k in plain],
                                      promote_options="permissive").field(name).type
        except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
            other = typed[-1]
        else:
            lossy = next(((f, o.type, why) for f, o in typed if (why := _not_held(o.type, widest))), None)
            contrast = lossy and next(((f, o.type) for f, o in typed if o.type != lossy[1]), None)
            if lossy and contrast:  # named now, not first when a sample turns out bad
                log.warning("the column %r is %s in %r but %s in %r: the output holds it as %s, so %s makes "
                            "its sample bad", name, lossy[1], lossy[0], contrast[1], contrast[0], widest, lossy[2])
            return pa.field(name, widest)
    raise ConfigError(Config.key("source"), f"the column {name!r} is {field.type} in {first_file!r} but "
                      f"{other[1].type} in {other[0]!r}: a column has one type in the output; make the files "
                      f"agree, or leave the column out ({ParquetSpec.key('columns')})")


def _disagreeing(typed: Sequence[tuple[str, pa.Field]]) -> tuple[tuple[str, pa.Field], tuple[str, pa.Field] | None]:
    """Two of the files' fields of a column whose :func:`_family` disagree, the earlier first;
    else the first and ``None``. (A null agrees with any family, so two files may each agree
    with a third, ``list<null>``, and not with each other.)"""
    families = [_family(field.type) for _, field in typed]
    merged = families[0]
    for i, family in enumerate(families[1:], 1):
        merged = _merged(merged, family)
        if merged is None:  # the family it disagrees with came from an earlier file
            j = next((j for j in range(i) if _merged(families[j], family) is None), 0)
            return typed[j], typed[i]
    return typed[0], None


def _not_held(kind: pa.DataType, into: pa.DataType) -> str | None:
    """Which values of type ``kind`` the wider type ``into`` cannot hold, in words (``None``: it
    holds them all). pyarrow's promotion makes int64 of int64 and uint64, and nanoseconds of
    timestamps in coarser units.

    >>> _not_held(pa.uint64(), pa.int64())
    'a value over 9,223,372,036,854,775,807'
    >>> _not_held(pa.timestamp("s"), pa.timestamp("ns"))
    'a time before 1677-09-21 or after 2262-04-11'
    >>> _not_held(pa.int32(), pa.int64()) is None, _not_held(pa.timestamp("s"), pa.timestamp("us")) is None
    (True, True)
    >>> _not_held(pa.struct([("n", pa.list_(pa.uint64()))]), pa.struct([("n", pa.list_(pa.int64()))]))
    "in its field 'n', a value over 9,223,372,036,854,775,807"
    """
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    lists = (pa.types.is_list, pa.types.is_large_list)
    if any(test(kind) for test in lists) and any(test(into) for test in lists):
        return _not_held(kind.value_type, into.value_type)
    if pa.types.is_map(kind) and pa.types.is_map(into):
        for part, kinds in (("key", (kind.key_type, into.key_type)), ("value", (kind.item_type, into.item_type))):
            if why := _not_held(*kinds):
                return f"in a {part} of its map, {why}"
        return None
    if pa.types.is_struct(kind) and pa.types.is_struct(into):
        for field in kind:
            place = into.get_field_index(field.name)
            if place >= 0 and (why := _not_held(field.type, into.field(place).type)):
                return f"in its field {field.name!r}, {why}"
        return None
    if pa.types.is_integer(kind) and pa.types.is_integer(into):
        def bounds(t: pa.DataType) -> tuple[int, int]:
            bits = t.bit_width
            return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if pa.types.is_signed_integer(t) else (0, 2 ** bits - 1)
        (low, high), (least, most) = bounds(kind), bounds(into)
        if high > most:
            return f"a value over {most:,}"
        if low < least:
            return f"a value under {least:,}"
    if pa.types.is_timestamp(kind) and pa.types.is_timestamp(into) and kind.unit != "ns" and into.unit == "ns":
        return "a time before 1677-09-21 or after 2262-04-11"  # what 64 bits of nanoseconds span
    return None


def _file_columns(schemas: dict[str, pa.Schema], required: Sequence[str], columns: Sequence[str] | None,
                  path: str, empty: Sequence[tuple[str, pa.Schema]] = (), hive: bool = False) -> list[pa.Field]:
    """The pass-through fields of files with these ``schemas`` (their own, as their footers
    give them): ``columns`` (default: every column any file has, with (``hive``) the keys of
    their hive-style folders, in order of first appearance, but the ``required`` ones: the
    image column, then the id column if any), each typed by :func:`_widest`. Raises
    :class:`ConfigError` for a file without a required column (a folder's key is none: the
    files are read by their own columns), or whose image column holds no encoded images, for a
    file with two columns of a name it reads, for a column no file has (or only the files
    without rows, ``empty``), or for types no output column holds."""
    for key, name in zip(("image_column", "id_column"), required):
        _required_column(schemas, key, name, path)
    def holds_images(kind: pa.DataType) -> bool:  # (a column null in every row of a file: its samples are bad)
        return _is_binary(kind) or pa.types.is_null(kind) or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)

    for relative, schema in schemas.items():  # each file's own: a batch's images are read as its file has them
        image_type = schema.field(required[0]).type
        if not holds_images(image_type):
            where = f" in {relative!r}" if len(schemas) > 1 else ""
            raise ConfigError(ParquetSpec.key("image_column"), f"column {required[0]!r} has type {image_type}{where}; "
                              "expected binary (encoded image files) or a struct with a 'bytes' field")
    if hive:
        schemas = _partition_schemas(schemas)
    names = list(dict.fromkeys(name for schema in schemas.values() for name in schema.names))
    if columns is None:
        columns = [n for n in names if n not in required]
    fields, absent = [], {}
    for name in columns:
        if name not in names:
            holder = next((f for f, schema in empty if name in schema.names), None)
            if holder is not None:
                raise ConfigError(ParquetSpec.key("columns"), f"the column {name!r} is only in files without rows "
                                  f"(e.g. {holder!r}): it would be null in every row; leave it out")
            raise ConfigError(ParquetSpec.key("columns"), f"no column {name!r} in {path!r}; {close_matches(name, names)}")
        _one_column(schemas, "columns", name, f", or leave it out ({ParquetSpec.key('columns')})")
        having = [(f, schema.field(name)) for f, schema in schemas.items() if name in schema.names]
        if len(having) < len(schemas):
            absent[name] = [f for f, schema in schemas.items() if name not in schema.names]
        fields.append(_widest(name, having))
    for name, lacking in absent.items():
        log.warning("the column %r is missing from %d of the %d files (e.g. %r): it is null in their rows",
                    name, len(lacking), len(schemas), lacking[0])
    return fields


def _required_column(schemas: dict[str, pa.Schema], key: str, name: str, path: str) -> None:
    """A :class:`ConfigError` (for the setting ``key``) unless every file stores the column
    ``name``, once. A key of the hive-style folders is named as such: the workers read the
    image and id columns from the files, which do not store the folders' keys."""
    lacking = [f for f, schema in schemas.items() if name not in schema.names]
    folder = next((part for f in lacking for part in f.split("/")[:-1] if part.partition("=")[0] == name), None)
    if folder is not None:
        role = "image" if key == "image_column" else "id"
        raise ConfigError(ParquetSpec.key(key), f"{name!r} is a key of the hive-style folders (e.g. {folder + '/'!r}), "
                          f"not a column stored in the files: the {role} column must be a column of the files")
    if len(lacking) == len(schemas):
        names = list(dict.fromkeys(n for schema in schemas.values() for n in schema.names))
        raise ConfigError(ParquetSpec.key(key), f"no column {name!r} in {path!r}; {close_matches(name, names)}")
    if lacking:
        raise ConfigError(ParquetSpec.key(key), f"{len(lacking):,} of the {len(schemas):,} files in {path!r} have "
                          f"no column {name!r}, e.g. {lacking[0]!r} (its columns: {schemas[lacking[0]].names})")
    _one_column(schemas, key, name, ", or name another column")


def _one_column(schemas: dict[str, pa.Schema], key: str, name: str, instead: str) -> None:
    """A :class:`ConfigError` (for the setting ``key``) where a file has more than one column
    named ``name`` (pyarrow writes such files): a column is read by its name. ``instead``: what
    else the user may do."""
    for relative, schema in schemas.items():
        if (count := len(schema.get_all_field_indices(name))) > 1:
            raise ConfigError(ParquetSpec.key(key), f"{relative!r} has {count} columns named {name!r}, and a column "
                              f"is read by its name: rename all but one of them in the file{instead}")


def _partitions(relative: str) -> dict[str, str | None]:
    """The hive-style partition values in a file's folders.

    >>> _partitions('year=2024/label=a%2Fb/part-0'), _partitions('label=__HIVE_DEFAULT_PARTITION__/x')
    ({'year': '2024', 'label': 'a/b'}, {'label': None})
    """
    found = {}
    for folder in relative.split("/")[:-1]:
        key, equals, value = folder.partition("=")
        if equals and key:
            value = urllib.parse.unquote(value)
            found[key] = None if value == "__HIVE_DEFAULT_PARTITION__" else value
    return found


def _partition_schemas(schemas: dict[str, pa.Schema]) -> dict[str, pa.Schema]:
    """``schemas`` with each file's partition keys added (those its own columns lack): integers
    where every file's value is one, else text."""
    values: dict[str, list] = {}
    for relative in schemas:
        for key, value in _partitions(relative).items():
            values.setdefault(key, []).append(value)
    kinds = {key: pa.int64() if all(v is None or re.fullmatch(r"-?\d{1,18}", v) for v in found) else pa.string()
             for key, found in values.items()}
    return {relative: pa.schema([*schema, *(pa.field(k, kinds[k]) for k in _partitions(relative)
                                            if k not in schema.names)])
            for relative, schema in schemas.items()}


def _other_schemas(schemas: dict[str, pa.Schema]) -> str | None:
    """A SHA-256 of the schemas of the files whose schema differs from the first file's (that
    one is in the index's digest), with the files that have each; ``None`` where all share it.
    A column's type changed in any file is then a changed source (a resumed dump would read the
    redone rows with the type it began with). Kept apart from the digest, which stays as it was
    when only the first file's schema counted: the dumps begun then resume. Metadata, of the
    schemas or their fields, does not count.

    >>> one = pa.schema([("n", pa.int32())])
    >>> _other_schemas({"a": one, "b": one.with_metadata({"x": "y"})}) is None
    True
    >>> len(_other_schemas({"a": one, "b": pa.schema([("n", pa.int64())]), "c": one}))
    64
    """
    first = next(iter(schemas.values()))
    others: dict[str, list[str]] = {}
    for relative, schema in schemas.items():  # (equals first: only the differing ones are written out)
        if not schema.equals(first, check_metadata=False):
            others.setdefault(schema.to_string(show_field_metadata=False, show_schema_metadata=False),
                              []).append(relative)
    return hashlib.sha256(json.dumps(others, sort_keys=True).encode()).hexdigest() if others else None


def _encode_fields(fields: Sequence[pa.Field]) -> str:
    return base64.b64encode(pa.schema(fields).serialize().to_pybytes()).decode()


def _decode_fields(text: str) -> list[pa.Field]:
    return list(pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text))))


def _no_bytes(path: str | None) -> str:
    """Why a row whose image is null is bad: with a ``path`` beside it (as Hugging Face datasets
    write images they did not embed), what to do.

    >>> _no_bytes(None)
    'the image value is null'
    """
    if not path:
        return "the image value is null"
    return (f"the image holds no bytes, only the path {path!r}: the images are read from the table, not from "
            f"the files its paths name; store the image bytes in the table, or dump the files with "
            f"{SourceSpec.key('kind')}: folder")


class ParquetSource(StreamingSource):
    """The rows of the Parquet data at ``path``.

    Args:
        path: a file or folder, local or a URI (``s3://bucket/table/``, ...).
        image_column: the encoded-image column (binary, or a struct with a ``bytes`` field).
        id_column: the column of the sample ids (else the row index).
        columns: the columns to pass through (default: all others).
        index: the row-group index the driver made (actors); ``None`` reads the footers now.
    """

    def __init__(self, path: str, image_column: str = "image", id_column: str | None = None,
                 columns: Sequence[str] | None = None, index: Index | None = None):
        self.path = str(path)
        self.location = open_location(self.path, ParquetSpec.key("path"))
        path = self.location.shown  # (as the messages below quote it: without the credentials it may carry)
        try:
            info = self.location.fs.get_file_info(self.location.root)
            pattern = None
            if info.type == pafs.FileType.NotFound:
                _glob_in_folders(self.location, path)
                pattern = _pattern(self.location.root, self.location.local)
            if pattern is None and (why := missing(self.location, "a Parquet file or folder", info.type)) is not None:
                raise ConfigError(ParquetSpec.key("path"), why)
            single = info.type == pafs.FileType.File
            # file paths in the index are relative to the folder (a single file or a pattern: the file's own)
            self._root = self.location.root.rsplit("/", 1)[0] if single or pattern else self.location.root
            if index is None:  # the driver: discover the files, read their footers
                fragments = _fragments(self.location.fs, [info] if single else
                                       _matching(self.location.fs, self._root, pattern, path) if pattern else
                                       _data_files(self.location.fs, self.location.root, path))
                table, schemas = _row_groups(fragments, self._root)
                schema = next(iter(schemas.values()), None)
            else:  # a worker: the files are in the index; the schema from the first one's footer
                first_file = index.slice(0, 1).column("file")[0].as_py()
                with self.location.fs.open_input_file(f"{self._root}/{first_file}") as handle:
                    schema = pq.read_schema(handle)
        except (OSError, pa.ArrowInvalid) as exc:
            raise ConfigError(ParquetSpec.key("path"), f"cannot open Parquet data at {path!r}: "
                              f"{str(exc).replace(self.path, path)}") from None
        required = [image_column] + ([id_column] if id_column else [])
        if index is None:
            if not schemas:
                raise ConfigError(ParquetSpec.key("path"), f"no Parquet file in {path!r}")
            rows = int(pc.sum(table.column("rows")).as_py() or 0)
            if not rows:
                raise ConfigError(ParquetSpec.key("path"), f"the {len(schemas):,} Parquet file(s) in {path!r} hold no rows")
            # the files without rows have no say in the columns (pandas types an empty column null)
            used = set(table.filter(pc.greater(table.column("rows"), 0)).column("file").to_pylist())
            fields = _file_columns({f: s for f, s in schemas.items() if f in used}, required, columns, path,
                                   [(f, s) for f, s in schemas.items() if f not in used], hive=True)
        elif "fields" in index.meta:
            fields = _decode_fields(index.meta["fields"])
        else:  # the index of an earlier version: the first file's columns
            fields = _file_columns({first_file: schema}, required, columns, path)
        self.image_column, self.id_column = image_column, id_column
        self.columns = [f.name for f in fields]
        self._fields = fields
        if index is None:
            meta = {"rows": rows, "files": len(set(table.column("file").to_pylist())),
                    "repeated_ids": self._repeated_ids(fragments, rows) if id_column else None}
            meta["sha256"] = digest(table, {**meta, "schema": schema.remove_metadata().to_string()})
            if (others := _other_schemas(schemas)) is not None:
                meta["schemas_sha256"] = others
            meta["fields"] = _encode_fields(fields)
            if id_column and any(_is_binary(s.field(i).type) for s in schemas.values()
                                 for i in s.get_all_field_indices(id_column)):
                meta["binary_ids"] = True
            index = MemoryIndex(table, meta)
        self.index = index
        groups = index.slice(0, len(index))
        self._files = groups.column("file").to_pylist()
        self._groups = groups.column("group").to_pylist()
        self._firsts = groups.column("first").to_pylist()
        self._rows = groups.column("rows").to_pylist()
        self.count = int(index.meta["rows"])
        self._footers: dict[str, tuple[pq.FileMetaData, bool]] = {}  # file: its footer, whether to pre-buffer
        self._parked = _Parked()

    def _repeated_ids(self, fragments: Sequence[ds.ParquetFileFragment], rows: int) -> dict:
        """How many ids appear more than once, with a few of them: the id column streamed in
        batches, file by file (each with its own type), in memory of 8 bytes per row
        (:mod:`._ids`), not the column itself. A page that carries a CRC is checked against it,
        as the workers check it. Where a file's ids cannot all be read (a damaged page), they
        are read again row group by row group from where the read stopped: a group that cannot
        be read is, on a local disk, left out of the count from the damage on, with a warning
        (the workers make its rows that cannot be read bad samples); over the network, an
        :class:`OSError` that names it (the error may pass, and the count is part of the
        dump's identity: a partial one must not become it)."""
        warned: set[str] = set()  # (the ids may stream by twice: a file is warned of once)

        def column() -> Iterator[pa.Array]:
            for fragment in fragments:  # (whose sizes and footers are known: no request for them)
                if not fragment.metadata.num_rows:  # (a file without rows may lack the column)
                    continue
                given = 0
                try:  # a file at once: its row groups are read ahead of the search
                    for ids in self._ids(fragment):
                        given += len(ids)
                        yield ids
                except (OSError, pa.ArrowInvalid):
                    yield from self._ids_by_group(fragment, given, warned)

        return repeated_ids(column, rows)

    def _ids(self, fragment: ds.ParquetFileFragment, skip: int = 0) -> Iterator[pa.Array]:
        """The ids of ``fragment`` (a file, or one of its row groups) past its first ``skip``."""
        options = ds.ParquetFragmentScanOptions(page_checksum_verification=True)
        for batch in fragment.to_batches(columns=[self.id_column], batch_size=ID_BATCH_ROWS, use_threads=False,
                                         fragment_scan_options=options):
            yield batch.column(0).slice(min(skip, batch.num_rows))
            skip = max(skip - batch.num_rows, 0)

    def _ids_by_group(self, fragment: ds.ParquetFileFragment, given: int, warned: set[str]) -> Iterator[pa.Array]:
        """The ids of ``fragment`` past its first ``given``, row group by row group, where a read
        of the whole file failed: those of a group that cannot be read are left out with a
        warning (once per file, in ``warned``), or over the network an :class:`OSError` names it."""
        relative = _relative(fragment.path, self._root)
        first, unread = 0, []
        for group in fragment.split_by_row_group():
            count = group.row_groups[0].num_rows
            if first + count > given:
                try:
                    yield from self._ids(group, max(given - first, 0))
                except (OSError, pa.ArrowInvalid) as exc:
                    where = f"row group {group.row_groups[0].id} of {relative!r}"
                    if self.location.on_network:
                        raise OSError(f"cannot read the ids ({self.id_column}) of {where}: {exc}") from exc
                    unread.append((group.row_groups[0].id, exc))
            first += count
        if unread and relative not in warned:
            warned.add(relative)
            groups = ", ".join(str(g) for g, _ in unread[:5]) + (", ..." if len(unread) > 5 else "")
            log.warning("the ids (%s) of row group(s) %s of %r cannot be read (%s): the search for repeated ids "
                        "leaves out their ids from the damage on (the rows the workers cannot read are bad "
                        "samples)", self.id_column, groups, relative, unread[0][1])

    def __len__(self) -> int:
        return self.count

    def identity(self) -> dict:
        meta = self.index.meta
        # ids stored as binary are their text since 2026-11-28 (before, Python's b'...' literal):
        # said here so that a dump begun before is not resumed with ids of both forms
        ids = {"sample_ids": BINARY_IDS} if meta.get("binary_ids") else {}
        # (None where every file has the first's schema; a dump begun before it was kept has none)
        return {"kind": "parquet", "path": self.path, "rows": self.count, "files": meta["files"],
                "index_sha256": meta["sha256"], "schemas_sha256": meta.get("schemas_sha256"),
                "image_column": self.image_column, "id_column": self.id_column, "columns": self.columns, **ids}

    @property
    def largest_row_group(self) -> int:
        """The rows of the largest row group: a shard reads up to this many to use its own."""
        return max(self._rows, default=0)

    @property
    def repeated_ids(self) -> dict | None:
        """``{"count", "examples"}`` of the ids that appear more than once (with an id column)."""
        return self.index.meta.get("repeated_ids")

    def label_fields(self) -> list[pa.Field]:
        return list(self._fields)

    def _open(self, relative: str) -> tuple[pq.ParquetFile, pa.NativeFile]:
        handle = self.location.fs.open_input_file(f"{self._root}/{relative}")
        # a footer is read once per file and kept: on object storage each read is a round trip
        if relative not in self._footers:
            footer = pq.read_metadata(handle)
            # buffered reads, pages as they are decoded: pyarrow's pre-buffering would load a
            # whole row group at once, however large. Over the network the row groups of a file
            # whose groups are small enough to hold are pre-buffered: a group's columns come in
            # one request, not one or more each
            largest = max((sum(group.column(c).total_compressed_size for c in range(group.num_columns))
                           for group in map(footer.row_group, range(footer.num_row_groups))), default=0)
            self._footers[relative] = footer, self.location.on_network and largest <= PRE_BUFFER_LIMIT
        footer, pre_buffer = self._footers[relative]
        # a page that carries a CRC is checked against it: damaged bytes are a bad row group, not images
        return pq.ParquetFile(handle, metadata=footer, pre_buffer=pre_buffer, buffer_size=READ_BUFFER,
                              page_checksum_verification=True), handle

    def _values(self, table: pa.Table | pa.RecordBatch, field: pa.Field, relative: str) -> list:
        """A pass-through column's values in ``table``, from the file ``relative``: its own, else
        its folder's partition value, else nulls."""
        if field.name in table.schema.names:
            return table.column(field.name).to_pylist()
        value = _partitions(relative).get(field.name)
        if value is not None and pa.types.is_integer(field.type):
            value = int(value)
        return [value] * table.num_rows

    def _images(self, table: pa.Table) -> tuple[list, list | None]:
        """The encoded images, and where the column is a struct with a ``path`` field, the paths."""
        images = table.column(self.image_column)
        if not pa.types.is_struct(images.type):
            return images.to_pylist(), None
        paths = pc.struct_field(images, "path").to_pylist() if images.type.get_field_index("path") >= 0 else None
        return pc.struct_field(images, "bytes").to_pylist(), paths

    def stream(self, start: int, stop: int) -> Iterator[Sample | BadSample]:
        parts = self._parts(start, stop)
        if self.location.on_network:  # the next reads go on while the caller decodes these rows
            parts = read_ahead(parts, READ_AHEAD)
        try:
            for part, first, relative in parts:
                if isinstance(part, _Unread):
                    yield from (BadSample(i, str(i), part.reason) for i in range(first, first + part.rows))
                else:
                    yield from self._samples(part, first, relative)
        finally:
            parts.close()

    def _parts(self, start: int, stop: int) -> Iterator[tuple[pa.RecordBatch | _Unread, int, str]]:
        """Rows ``start`` to ``stop - 1`` as record batches of up to :data:`BATCH_ROWS` rows,
        each with the index of its first row and its file; rows of a damaged row group on a
        local disk as :class:`_Unread` (over the network the error may pass: it fails the
        shard, which is retried)."""
        stop = min(stop, self.count)
        wanted = [self.image_column] + ([self.id_column] if self.id_column else []) + self.columns
        g = max(0, bisect.bisect_right(self._firsts, start) - 1)
        opened: tuple[str, pq.ParquetFile, pa.NativeFile] | None = None  # this stream's own file
        try:
            while g < len(self._firsts) and self._firsts[g] < stop:
                first = self._firsts[g]
                lo, hi = max(start - first, 0), min(stop - first, self._rows[g])
                # a row group may be far larger than a shard: read on from where an earlier shard
                # stopped in it, else from its start (Parquet has no row offsets inside a group)
                reader = self._parked.take(g, lo) if lo else None
                if reader is not None:
                    position, batches, own = reader.row, reader.batches, reader.handle
                else:
                    if opened is None or opened[0] != self._files[g]:
                        if opened is not None:
                            opened[2].close()
                        opened = (self._files[g], *self._open(self._files[g]))
                    position, own = 0, None
                    batches = opened[1].iter_batches(BATCH_ROWS, row_groups=[self._groups[g]], columns=wanted,
                                                     use_threads=False)
                rows = self._rows[g]
                try:
                    for batch in batches:
                        end = position + batch.num_rows
                        part = None
                        if end > lo:
                            part = (batch.slice(max(lo - position, 0), min(hi, end) - max(lo, position)),
                                    first + max(lo, position), self._files[g])
                        if end >= hi:  # the last batch this shard needs from the group
                            # the read waits for a later shard (before the last part goes) where
                            # reading the group again up to here would cost more than this shard
                            if hi < rows and hi > stop - start:
                                rest = itertools.chain([batch.slice(hi - position)], batches) if end > hi else batches
                                if own is None:  # the stream's own file goes with it (the stream ends here)
                                    own, opened = opened[2], None
                                self._parked.put(_Reader(g, hi, rest, own))
                                own = None
                            if part is not None:
                                yield part
                            break
                        position = end
                        if part is not None:
                            yield part
                except (OSError, pa.ArrowInvalid) as exc:  # a damaged page: the file's fault on a local disk
                    where = f"row group {self._groups[g]} of {self._files[g]!r}"
                    if self.location.on_network:
                        raise OSError(f"cannot read {where}: {exc}") from exc
                    since = max(lo, position)
                    yield _Unread(hi - since, f"{where} cannot be read: {exc}"), first + since, self._files[g]
                finally:
                    if own is not None:
                        own.close()
                g += 1
        finally:
            if opened is not None:
                opened[2].close()

    def close(self) -> None:
        """Close the reads kept open inside row groups, and the index file."""
        self._parked.close()
        super().close()

    def _samples(self, table: pa.Table | pa.RecordBatch, first: int, relative: str) -> Iterator[Sample | BadSample]:
        # a column at a time, then a row at a time: this runs once per row of the dataset
        images, paths = self._images(table)
        indices = range(first, first + table.num_rows)
        ids = sample_ids(table.column(self.id_column)) if self.id_column else map(str, indices)
        names = [field.name for field in self._fields]
        rows = zip(*(self._values(table, field, relative) for field in self._fields)) if names else \
            itertools.repeat(())
        # the columns of this file of their field's type give values the field holds as they are
        exact = frozenset(field.name for field in self._fields if field.name in table.schema.names
                          and table.schema.field(field.name).type == field.type)
        for index, sample_id, image, values in zip(indices, ids, images, rows):
            if sample_id is None:
                yield BadSample(index, str(index), f"the id ({self.id_column}) is null")
            elif image is None:
                yield BadSample(index, sample_id, _no_bytes(paths[index - first] if paths else None))
            else:
                yield Sample(index, sample_id, image, dict(zip(names, values)), exact)
