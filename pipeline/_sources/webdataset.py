"""WebDataset tar shards: samples are the runs of tar members that share a key.

``source.path`` is one pattern or a list of them, local or URIs: a path, a glob
(``/data/train-*.tar``) or a brace range (``s3://bucket/train-{0000..0099}.tar``). In each tar,
consecutive members with the same key (the name up to the first dot of its file name) are one
sample, as WebDataset groups them: ``000123.jpg`` is its image (the first of ``jpg``,
``jpeg``, ``png``, ``webp`` and the other image suffixes it holds, in any case; or of
``source.image_extensions``, as WebDataset's ``"jpg;png"``), ``000123.cls`` becomes ``label`` (an
integer), ``000123.txt`` becomes ``caption`` (UTF-8 text), and the fields of ``000123.json`` become columns
of their own: every field any ``.json`` member has (a ``label`` or ``caption`` field too, where
no ``.cls`` or ``.txt`` file gives that column), typed by its first value that is not null (an
integer field that also holds fractions is a float; lists and objects are kept as JSON text; a
value of another type makes its sample bad). ``sample_id`` is the key. As in WebDataset, a
member without an extension, or whose file name starts with a dot, belongs to no sample; a hard
link stands for the file it links to; a symbolic link, which holds no data in a tar, is left out
with a warning. A header that does not parse is an error naming the tar and the byte (tarfile
would end the tar there, dropping every sample after it).

The driver reads the tar headers once (on a local disk it seeks from header to header; on
object storage it streams each tar once, several at a time, and on a network file system it
seeks in several tars at a time), and the ``.json`` members for
their fields, and indexes every sample's members by offset. A shard then reads, from each tar it touches, the one byte range that holds its
samples (in pieces of at most :data:`READ_BYTES`): sequential reads, no extraction to disk, and
the same sample ids and indices on every actor and every rerun.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from .._layout import RESERVED_COLUMNS
from ..config import WebDatasetSpec, comparable_location
from ..errors import ConfigError
from .._secrets import redact, with_credentials
from ._base import BadSample, Sample, StreamingSource, describe_error, is_sample_fault
from ._files import Location, glob_names, is_utf8, no_match, open_location
from ._ids import repeated_ids
from ._index import Index, MemoryIndex, digest

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")
#: The most bytes read at once from one tar.
READ_BYTES = 64 << 20
#: Tars on object storage or a network file system indexed at once by the driver.
INDEX_THREADS = 16
#: Unused bytes between two samples' members above which they are read apart.
SKIP_BYTES = 1 << 20
#: A tar's record (tar's default blocking factor, 20): an archive is padded with zeros to whole ones.
RECORD_BYTES = 20 * tarfile.BLOCKSIZE
#: The side files that become columns.
SIDE_FILES = frozenset({"cls", "txt", "json"})

_MEMBER = pa.struct([("ext", pa.string()), ("offset", pa.int64()), ("size", pa.int64())])
_INDEX_SCHEMA = pa.schema([("tar", pa.int32()), ("key", pa.string()), ("members", pa.list_(_MEMBER))])
_JSON_TYPES = {bool: "bool", int: "int64", float: "double", str: "string"}
#: The side files whose columns a ``.json`` field of the same name cannot take.
_SIDE_COLUMNS = {"cls": "label", "txt": "caption"}
_PATH = WebDatasetSpec.key("path")
_IMAGES = WebDatasetSpec.key("image_extensions")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
#: The first bytes of the compressed files a ``.tar`` name may hide.
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def expand_braces(pattern: str) -> list[str]:
    """The names a brace pattern stands for, as bash expands its lists (nested too) and numeric
    ranges (either way; zero-padded when an end is); a brace that is neither stays as it is
    (letter ranges, steps and escapes are not expanded).

    >>> expand_braces("train-{00..02}.tar")
    ['train-00.tar', 'train-01.tar', 'train-02.tar']
    >>> expand_braces("{a,b}/x-{8..10}.tar")
    ['a/x-8.tar', 'a/x-9.tar', 'a/x-10.tar', 'b/x-8.tar', 'b/x-9.tar', 'b/x-10.tar']
    >>> expand_braces("x{a,{b,c}}{2..1}{}.tar")
    ['xa2{}.tar', 'xa1{}.tar', 'xb2{}.tar', 'xb1{}.tar', 'xc2{}.tar', 'xc1{}.tar']
    >>> expand_braces("a{b{1,2}")
    ['a{b1', 'a{b2']
    """
    for start, char in enumerate(pattern):
        if char != "{":
            continue
        depth, commas = 0, []
        for end in range(start, len(pattern)):
            depth += {"{": 1, "}": -1}.get(pattern[end], 0)
            if depth == 1 and pattern[end] == ",":
                commas.append(end)
            if depth == 0:
                break
        else:
            continue  # not closed: a literal brace
        inner, head, tail = pattern[start + 1:end], pattern[:start], pattern[end + 1:]
        if commas:
            bounds = [start, *commas, end]
            choices = [pattern[a + 1:b] for a, b in zip(bounds, bounds[1:])]
        elif (numbers := _RANGE.fullmatch(inner)) is not None:
            low, high = numbers.group(1), numbers.group(2)
            padded = any(len(n.lstrip("-")) > 1 and n.lstrip("-").startswith("0") for n in (low, high))
            width = max(len(low), len(high)) if padded else 0
            step = 1 if int(high) >= int(low) else -1
            choices = [str(n).zfill(width) for n in range(int(low), int(high) + step, step)]
        else:
            continue  # a literal brace
        return [name for choice in choices for name in expand_braces(head + choice + tail)]
    return [pattern]


def split_key(name: str) -> tuple[str, str]:
    """A member's (key, extension), split at the first dot of its file name.

    >>> split_key("a/b/000123.seg.png"), split_key("README")
    (('a/b/000123', 'seg.png'), ('README', ''))
    """
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def split_tar(tar: str) -> tuple[str, str]:
    """A tar's (folder, file name); a URI's query (``?endpoint_override=...``) stays with the
    folder, and its file name is percent-decoded, as pyarrow decodes the rest of it.

    >>> split_tar("s3://bucket/train/x-0001.tar?scheme=http")
    ('s3://bucket/train?scheme=http', 'x-0001.tar')
    >>> split_tar("x.tar"), split_tar("s3://bucket/train-0?.tar"), split_tar("file:///data/a%20b.tar")
    (('.', 'x.tar'), ('s3://bucket', 'train-0?.tar'), ('file:///data', 'a b.tar'))
    """
    uri = "://" in tar
    base, mark, query = tar.rpartition("?") if uri else ("", "", "")
    if not mark or "=" not in query or "/" in query:  # no query: a `?` of a glob
        base, mark, query = tar, "", ""
    folder, _, name = base.rpartition("/")
    return (folder or ".") + mark + query, urllib.parse.unquote(name) if uri else name


def _resolve(patterns: Sequence[str]) -> dict[str, int]:
    """The tar files the patterns name, in the order given (each glob sorted), each with the
    number of the pattern that named it; a tar named twice (a local one by any path to it) is
    read once."""
    tars: list[tuple[str, int]] = []
    for number, pattern in enumerate(patterns):
        for name in expand_braces(pattern):
            folder, base = split_tar(name)
            globbed = folder.partition("?")[0] if "://" in folder else folder  # a URI's query is no glob
            if any(c in globbed for c in "*?[") and _kind(folder) != "Directory":
                raise ConfigError(_PATH, f"{redact(name)!r}: a glob matches file names, not folders; name the "
                                  "folders with a brace pattern ('{a,b}/*.tar') or a list")
            if not any(c in base for c in "*?[") or _is_file(folder, base):  # a tar named `x[1].tar` is read as named
                tars.append((name, number))
                continue
            location = open_location(folder, _PATH)
            try:
                entries = location.fs.get_file_info(pafs.FileSelector(location.root))
            except (OSError, FileNotFoundError) as exc:
                raise ConfigError(_PATH, f"cannot list {redact(folder)!r} for {redact(name)!r}: {exc}") from None
            files = [e.base_name for e in entries if e.type == pafs.FileType.File]
            found = glob_names(files, base)
            if not found:
                why = no_match(base, files, [e.base_name for e in entries if e.type == pafs.FileType.Directory])
                raise ConfigError(_PATH, f"{redact(name)!r} matches no file" + (f": {why}" if why else ""))
            tars += [(_join(folder, f), number) for f in found]
    unique: dict[str, int] = {}
    seen: set[str] = set()
    for tar, number in tars:
        same = _same_tar(tar)
        if same not in seen:  # (a local tar by any spelling of its path)
            seen.add(same)
            unique[tar] = number
    if len(unique) < len(tars):
        log.warning("%d tar(s) are named more than once by %s and are read once", len(tars) - len(unique), _PATH)
    return unique


def _same_tar(tar: str) -> str:
    """What tells ``tar`` from others: a local one's resolved path (a ``file://`` URI's as pyarrow
    opens it, percent-decoded), else the URI."""
    if tar.startswith("file://"):
        tar = pafs.FileSystem.from_uri(tar)[1]
    return tar if "://" in tar else os.path.realpath(tar)


def _is_file(folder: str, name: str) -> bool:
    """Whether ``folder`` holds a file named ``name`` (one request, on object storage)."""
    location = open_location(folder, _PATH)
    try:
        return location.fs.get_file_info(location.path(name)).type == pafs.FileType.File
    except OSError:
        return False


def _kind(folder: str) -> str:
    """What ``folder`` is (``Directory``, ``NotFound``, ...); a config error where it cannot be told."""
    try:
        return open_location(folder, _PATH).kind().name
    except OSError as exc:
        raise ConfigError(_PATH, f"cannot look at {redact(folder)!r}: {exc}") from None


def _join(folder: str, name: str) -> str:
    """The tar ``name`` in ``folder`` (in a URI, percent-encoded where it has to be: ``split_tar``
    decodes it)."""
    if "://" not in folder:
        return f"{folder}/{name}" if folder != "." else name
    base, mark, query = folder.partition("?")
    return f"{base}/{urllib.parse.quote(name)}{mark}{query}"


class _Fields:
    """The columns of ``.json`` members, field by field in order of first appearance: each
    typed by its first value that is not null (int and float together: float)."""

    def __init__(self) -> None:
        self.kinds: dict[str, str | None] = {}

    def add(self, data: bytes) -> None:
        try:
            doc = json.loads(data)
        except ValueError:  # its sample is bad: said when it is read
            return
        if not isinstance(doc, dict):
            return
        for field, value in doc.items():
            self._note(field, None if value is None else _JSON_TYPES.get(type(value), "json"))

    def merge(self, other: _Fields) -> None:
        for field, kind in other.kinds.items():
            self._note(field, kind)

    def _note(self, field: str, kind: str | None) -> None:
        known = self.kinds.get(field)
        if known is None:
            self.kinds[field] = kind
        elif {known, kind} == {"int64", "double"}:
            self.kinds[field] = "double"

    def columns(self, taken: Mapping[str, str]) -> list[tuple[str, str]]:
        """``(field, type)`` of the columns; ``taken``: the names other columns have, and why."""
        out = []
        for field, kind in self.kinds.items():
            if field in taken:
                log.warning("the .json field %r is not passed through: %s", field, taken[field])
            else:
                out.append((field, kind or "string"))
        return out


def _headers(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members of ``tar`` one by one, none kept: a ``TarFile`` keeps each member it has
    read (about 1 KB each), so the driver indexing 16 tars of 8,000 members at once held
    100 MB of them."""
    while (member := tar.next()) is not None:
        tar.members.clear()
        yield member


def _members(location: Location, name: str,
             images: Sequence[str]) -> tuple[list[tuple[str, int, int]], _Fields, tuple[str, str] | None]:
    """``(member name, data offset, size)`` of the files in one tar, from its headers (a hard
    link as the file it links to; names that are not UTF-8 left out), the fields of its
    ``.json`` members, and what its end has to say (:func:`_check_end`)."""
    fields, files, strays, linked, symbolic, sparse = _Fields(), {}, [], [], [], []
    out: list[tuple[str, int, int]] = []

    def walk(tar: tarfile.TarFile, read) -> None:
        for member in _headers(tar):
            if member.issparse() and _used(_extension(member.name), images):
                sparse.append(member.name)  # (its data is not its file's bytes as they lie: the holes are left out)
                continue
            if member.isfile():
                place = (member.offset_data, member.size)
                files[member.name] = place
            elif member.islnk() and member.linkname in files:
                place = files[member.linkname]
            else:
                if member.issym() and _used(_extension(member.name), images):
                    symbolic.append(f"{member.name} -> {member.linkname}")
                continue
            if not is_utf8(member.name):
                strays.append(member.name)
                continue
            out.append((member.name, *place))
            if _extension(member.name) == "json":
                if member.isfile():
                    fields.add(read(member, *place))
                elif _extension(member.linkname) != "json":  # (a .json target was read as itself)
                    linked.append(place)  # read after the walk: a stream cannot go back

    if location.local:
        with open(location.path(name), "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            walk(tar, lambda member, offset, size: (f.seek(offset), f.read(size))[1])  # tarfile seeks back itself
            end = tar.offset
    else:
        with location.fs.open_input_stream(location.path(name)) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            walk(tar, lambda member, offset, size: tar.extractfile(member).read())
            end = tar.offset
    said = _check_end(location, name, end, len(out))
    if sparse:
        raise tarfile.TarError(f"{len(sparse):,} member(s) are stored sparse (tar --sparse, -S), e.g. {sparse[0]!r}: "
                               "their bytes in the tar leave out the files' holes, and members are read here as they "
                               "lie; archive the files again without --sparse")
    for place in linked:
        fields.add(location.read_range(name, *place))
    if strays:
        log.warning("%d member name(s) in %s are not UTF-8 and are left out, e.g. %r", len(strays), name, strays[0])
    if symbolic:
        log.warning("%d member(s) in %s are symbolic links, which hold no data in a tar, and are left out, e.g. "
                    "%r; archive the files they point to with tar --dereference (-h)", len(symbolic), name,
                    symbolic[0])
    return out, fields, said


def _check_end(location: Location, name: str, end: int, files: int) -> tuple[str, str] | None:
    """Raise :class:`tarfile.HeaderError` unless the tar ends at byte ``end``, where tarfile
    stopped reading ``name``: it stops quietly at a header it cannot read, and a block of zeros
    is the end of an archive; anything else is damage, or a tar cut short inside a header, that
    would drop every sample after it. A tar without that block (cut short between members?),
    and data after it (tars joined with ``cat``), are to be said: ``(kind, warning)``, which
    the index says once per kind, however many tars."""
    # (one read: the end-of-archive blocks, the zeros to the end of the record, a header after it)
    rest = location.read_range(name, end, RECORD_BYTES + 3 * tarfile.BLOCKSIZE)
    block = rest[:tarfile.BLOCKSIZE]
    if not block:  # (tar writes them; a tar cut short between two members lacks them too)
        return "unended", (f"{name} ends without the end-of-archive blocks that tar writes after the last member: it "
                           f"may be cut short, after its {files:,} files; if so, fetch it again")
    if block.count(0) == len(block):
        if rest.count(0) < len(rest):
            return "joined", (f"{name} holds data after its end-of-archive blocks, from byte "
                              f"{end + len(rest) - len(rest.lstrip(bytes(1))):,}, which is not read: tars joined with "
                              f"cat read as the first of them; join them with tar --concatenate (-A), or list them "
                              f"apart in {_PATH}")
        return None
    if len(block) < tarfile.BLOCKSIZE:
        raise tarfile.HeaderError(f"it ends inside the header at byte {end:,}, {len(block)} bytes into its "
                                  f"{tarfile.BLOCKSIZE}, as a tar cut short does (a download or copy that did not "
                                  f"finish), so the {files:,} files before it are all that could be read: fetch it "
                                  f"again, or leave it out of {_PATH}")
    raise tarfile.HeaderError(f"the header at byte {end:,} is damaged (its checksum or fields do not parse), "
                              f"so the {files:,} files before it are all that could be read")


def _extension(name: str) -> str:
    return name.rpartition("/")[2].partition(".")[2].lower()


def _used(ext: str, images: Sequence[str]) -> bool:
    """Whether a member with this extension is read: an image (one of ``images``) or a side
    file of a column."""
    return ext.lower() in images or ext.lower() in SIDE_FILES


def _several_images(table: pa.Table, images: Sequence[str]) -> tuple[int, str | None]:
    """How many samples of an index hold more than one image member (one whose extension is in
    ``images``), and the key of the first.

    >>> rows = _samples_of(0, [("a.jpg", 512, 1), ("a.png", 1024, 1), ("b.png", 1536, 1), ("b.cls", 2048, 1)])
    >>> _several_images(rows, IMAGE_EXTENSIONS), _several_images(rows, ["png"])
    ((1, 'a'), (0, None))
    """
    members = table.column("members").combine_chunks()
    image = pc.is_in(pc.utf8_lower(pc.list_flatten(members).field("ext")), value_set=pa.array(images, pa.string()))
    counts = pc.value_counts(pc.filter(pc.list_parent_indices(members), image))
    several = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if not len(several):
        return 0, None
    return len(several), table.column("key")[pc.min(several).as_py()].as_py()


def _samples_of(number: int, members: list[tuple[str, int, int]]) -> pa.Table:
    """The index rows of tar ``number``: its members grouped by key, consecutive ones together
    (``tar``, ``key``, ``members``: ``[{"ext", "offset", "size"}, ...]``). A member without an
    extension, or whose file name starts with a dot, is no sample's (as in WebDataset). The
    columns are built flat, with no Python object per member: the driver's memory while it
    indexes is the Arrow rows', not several times theirs in objects.

    >>> rows = _samples_of(3, [("a.jpg", 512, 10), ("a.cls", 1536, 1), (".hidden", 2560, 1), ("b.png", 3584, 9)])
    >>> rows.column("key").to_pylist(), rows.column("tar").to_pylist(), rows.column("members").to_pylist()[1]
    (['a', 'b'], [3, 3], [{'ext': 'png', 'offset': 3584, 'size': 9}])
    """
    keys: list[str] = []
    starts: list[int] = []  # where each sample's members begin in the flat columns
    exts: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    for name, offset, size in members:
        key, ext = split_key(name)
        if not ext or key.endswith("/") or not key:
            continue
        if not keys or keys[-1] != key:
            keys.append(key)
            starts.append(len(exts))
        exts.append(ext)
        offsets.append(offset)
        sizes.append(size)
    flat = pa.StructArray.from_arrays([pa.array(exts, pa.string()), pa.array(offsets, pa.int64()),
                                       pa.array(sizes, pa.int64())], fields=list(_MEMBER))
    grouped = pa.ListArray.from_arrays(pa.array(starts + [len(exts)], pa.int32()), flat)
    return pa.table([pa.array(np.full(len(keys), number, np.int32)), pa.array(keys, pa.string()), grouped],
                    schema=_INDEX_SCHEMA)


def _unreadable(location: Location, name: str, exc: Exception) -> str:
    """Why a tar cannot be read, with what to do where the cause is known."""
    if location.local and Path(location.path(name)).is_dir():
        return f"{exc}: it is a folder; name its tar files ('{location.path(name).rstrip('/')}/*.tar')"
    try:
        head = location.read_range(name, 0, 6)
    except OSError:
        return str(exc)
    kind = next((k for magic, k in _COMPRESSED.items() if head.startswith(magic)), None)
    if kind is None and "unexpected end of data" in str(exc):
        size = location.fs.get_file_info(location.path(name)).size
        return (f"{exc}: it ends inside a member, at byte {size:,}, as a tar cut short does (a download or copy "
                f"that did not finish): fetch it again, or leave it out of {_PATH}")
    if kind is None:
        return str(exc)
    return (f"it is {kind}-compressed; shards are read by byte range, which a compressed tar does not "
            "allow: decompress it (the images in it are compressed already)")


class WebDatasetSource(StreamingSource):
    """The samples of WebDataset tar shards (see the module docstring).

    Args:
        path: one pattern or a list (paths, globs, brace ranges; local or URIs).
        index: the driver's index of the tars (actors); ``None`` reads the headers now.
        image_extensions: a sample's image is its member with the first of these extensions
            it holds (``source.image_extensions``); default :data:`IMAGE_EXTENSIONS`.
    """

    def __init__(self, path: str | Sequence[str], index: Index | None = None,
                 image_extensions: Sequence[str] | None = None):
        self.patterns = [path] if isinstance(path, str) else list(path)
        self.image_extensions = tuple(e.lower() for e in image_extensions) if image_extensions else IMAGE_EXTENSIONS
        side = [e for e in self.image_extensions if e in SIDE_FILES]
        if side:
            raise ConfigError(_IMAGES, f"{side[0]!r} is a side file's extension (.cls gives the label, .txt the "
                              "caption, .json more columns), not an image's; name the images' extensions, such as "
                              "[jpg, png]")
        self._rank = {ext: rank for rank, ext in enumerate(self.image_extensions)}
        if index is None:
            index = self._index()
        self.index = index
        meta = index.meta
        # the index keeps the tars without the credentials their URIs may carry: those of the
        # pattern each came from are put back
        origins = meta.get("origins") or [None] * len(meta["tars"])
        self.tars: list[str] = [tar if origin is None else with_credentials(tar, self.patterns[origin])
                                for tar, origin in zip(meta["tars"], origins)]
        self._json_fields: list[tuple[str, str]] = [tuple(f) for f in meta["json_fields"]]
        self._has = {e.lower() for e in meta["extensions"]}
        self._locations: dict[str, Location] = {}
        if image_extensions and not self._has & set(self.image_extensions):
            raise ConfigError(_IMAGES, f"no member of the tars has the extension {' or '.join(self.image_extensions)}; "
                              f"theirs: {', '.join(sorted(self._has)) or 'none'}")

    # -- the driver's index ------------------------------------------------------------------------

    def _location(self, tar: str) -> tuple[Location, str]:
        folder, name = split_tar(tar)
        if folder not in self._locations:
            self._locations[folder] = open_location(folder, _PATH)
        return self._locations[folder], name

    def _index(self) -> MemoryIndex:
        self._locations = {}
        named = _resolve(self.patterns)
        tars = list(named)
        if not tars:
            raise ConfigError(_PATH, f"{self.patterns!r} names no tar file")

        def walk(number: int) -> tuple[pa.Table, _Fields, tuple[str, str] | None]:
            location, name = self._location(tars[number])
            try:
                members, fields, said = _members(location, name, self.image_extensions)
            except (OSError, tarfile.TarError) as exc:
                raise ConfigError(_PATH, f"cannot read the tar {redact(tars[number])!r}: "
                                  f"{_unreadable(location, name, exc)}") from None
            return _samples_of(number, members), fields, said

        # tars on object storage or a network file system (NFS, Lustre, ...) are indexed side by
        # side, since each read waits on the network; those on local disks by one thread: the
        # headers are parsed in Python, and threads only contend for the interpreter (80,000
        # samples in 20 local tars: 3.4 s on one thread, 12.4 s on 16)
        remote = any(self._location(tar)[0].on_network for tar in tars)
        with ThreadPoolExecutor(min(INDEX_THREADS, len(tars)) if remote else 1) as pool:
            per_tar = list(pool.map(walk, range(len(tars))))
        fields = _Fields()
        said: dict[str, list[str]] = {}
        for _, found, note in per_tar:
            fields.merge(found)
            if note is not None:
                said.setdefault(note[0], []).append(note[1])
        for warnings in said.values():  # once a kind, however many tars
            log.warning("%s%s", warnings[0], f" (so do {len(warnings) - 1:,} more tars)" if len(warnings) > 1 else "")
        table = pa.concat_tables([rows for rows, _, _ in per_tar]).combine_chunks()
        if not table.num_rows:
            raise ConfigError(_PATH, f"the tars {tars[:3]}{' ...' if len(tars) > 3 else ''} hold no files")
        extensions = sorted(pc.unique(pc.list_flatten(table.column("members")).combine_chunks().field("ext")).to_pylist())
        side = {e.lower() for e in extensions}
        taken = {name: "every dump has that column" for name in RESERVED_COLUMNS}
        taken.update({column: f"the .{ext} files give that column" for ext, column in _SIDE_COLUMNS.items()
                      if ext in side})
        # each tar spelled one way (a local one by its absolute path), without credentials: a
        # rerun that names the same tars another way resumes the dump, and every actor, wherever
        # it runs, reads the driver's tars
        stored = [redact(comparable_location(tar)) for tar in tars]
        meta = {"tars": stored, "extensions": extensions, "samples": table.num_rows,
                "repeated_ids": repeated_ids(lambda: iter(table.column("key").chunks), table.num_rows),
                "json_fields": fields.columns(taken) if "json" in side else []}
        spelled = [redact(tar) for tar in tars]
        if spelled != stored:  # the digest of the versions that kept the tars as spelled: their dumps resume
            meta["sha256_as_spelled"] = digest(table, {**meta, "tars": spelled})
        meta["sha256"] = digest(table, {k: v for k, v in meta.items() if k != "sha256_as_spelled"})
        if stored != tars:
            meta["origins"] = list(named.values())
        several, example = _several_images(table, self.image_extensions)
        if several:  # (kept apart from the digest: the index of a dump begun before this is the same)
            meta["several_images"] = several
            log.warning("%d sample(s) hold more than one image member (e.g. %r): each gives the first of them in the "
                        "order %s (%s chooses)", several, example, ", ".join(self.image_extensions), _IMAGES)
        self.index = MemoryIndex(table, meta)
        return self.index

    # -- what it is --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.index)

    def identity(self) -> dict:
        # the patterns spelled one way (but one that starts with braces, '{/a,/b}/x-*.tar', whose
        # alternatives each spell their own; ranges are not expanded: the tars are in the digest)
        paths = [p if p.startswith("{") else comparable_location(p) for p in self.patterns]
        identity = {"kind": "webdataset", "path": paths, "tars": len(self.tars), "samples": len(self),
                    "index_sha256": self.index.meta["sha256"]}
        # what the versions that kept the patterns and tars as spelled made of them: their dumps resume
        earlier = {"path": self.patterns} if self.patterns != paths else {}
        if "sha256_as_spelled" in self.index.meta:
            earlier["index_sha256"] = self.index.meta["sha256_as_spelled"]
        if earlier:
            identity["earlier"] = earlier
        if self.index.meta.get("several_images"):
            # the image of a sample of several was the first in its tar before: a dump begun then
            # must not be resumed with images chosen the other way
            identity["image_member"] = "the first in the order " + ", ".join(self.image_extensions)
        if any(e != e.lower() and e.lower() in SIDE_FILES for e in self.index.meta["extensions"]):
            # side files named in capitals gave no column before they were read in any case: a
            # dump begun then must not be resumed with columns its first shards lack
            identity["columns"] = [f.name for f in self.label_fields()]
        return identity

    @property
    def repeated_ids(self) -> dict | None:
        found = self.index.meta.get("repeated_ids")
        return found and dict(found, hint="a key repeats when two tars hold it, or when a sample's files are not "
                              "next to each other in its tar (`tar --sort=name` writes them in order)")

    def label_fields(self) -> list[pa.Field]:
        fields = []
        if "cls" in self._has:
            fields.append(pa.field("label", pa.int64()))
        if "txt" in self._has:
            fields.append(pa.field("caption", pa.string()))
        for name, kind in self._json_fields:
            fields.append(pa.field(name, pa.string() if kind == "json" else pa.type_for_alias(kind)))
        return fields

    # -- reading -----------------------------------------------------------------------------------

    def _reads(self, tars: list[int], used: list[list[dict]]) -> Iterator[tuple[list[tuple[int, dict]], int, bytes | Exception]]:
        """The byte ranges to read for ``used`` (each row's members, in row order): one read per
        run of members in one tar with small gaps between them (members no column uses, such as
        a video beside the image, are skipped), at most :data:`READ_BYTES`. Yields each read's
        ``[(row, member), ...]``, the offset it starts at, and its bytes (or the error, when it
        is the file's). A hard link's member may lie anywhere before: it is read apart."""
        run: list[tuple[int, dict]] = []
        low = high = 0
        for row, members in enumerate(used):
            for member in sorted(members, key=lambda m: m["offset"]):
                start, end = member["offset"], member["offset"] + member["size"]
                if run and (tars[run[0][0]] != tars[row] or start - high > SKIP_BYTES or low - end > SKIP_BYTES
                            or max(high, end) - min(low, start) > READ_BYTES):
                    yield run, low, self._read(tars[run[0][0]], low, high)
                    run = []
                low, high = (min(low, start), max(high, end)) if run else (start, end)
                run.append((row, member))
        if run:
            yield run, low, self._read(tars[run[0][0]], low, high)

    def _read(self, tar: int, low: int, high: int) -> bytes | Exception:
        location, name = self._location(self.tars[tar])
        try:
            return location.read_range(name, low, high - low)
        except OSError as exc:
            if not is_sample_fault(exc):
                raise  # may pass: the shard fails and is retried
            return exc

    def stream(self, start: int, stop: int) -> Iterator[Sample | BadSample]:
        rows = self.index.slice(start, stop)
        keys = rows.column("key").to_pylist()
        members = rows.column("members").to_pylist()
        used = [[m for m in ms if _used(m["ext"], self._rank)] for ms in members]
        parts: list[dict[str, bytes]] = [{} for _ in keys]
        failed: dict[int, Exception] = {}
        done = 0  # the rows before it have been yielded

        def ready(row: int) -> bool:  # (two members with one extension fill one part)
            return row in failed or len(parts[row]) == len({m["ext"].lower() for m in used[row]})

        for run, low, data in self._reads(rows.column("tar").to_pylist(), used):
            for row, member in run:
                if isinstance(data, Exception):
                    failed[row] = data
                else:
                    parts[row][member["ext"].lower()] = data[member["offset"] - low:member["offset"] - low + member["size"]]
            while done < len(keys) and ready(done):  # the rows complete now, in order
                yield self._row(start + done, keys[done], parts[done], members[done], failed.get(done))
                parts[done] = {}
                done += 1
        for row in range(done, len(keys)):  # rows with no member to read
            yield self._row(start + row, keys[row], parts[row], members[row], failed.get(row))

    def _row(self, index: int, key: str, parts: dict[str, bytes], members: list[dict],
             error: Exception | None) -> Sample | BadSample:
        if error is not None:
            return BadSample(index, key, describe_error(error))
        return self._sample(index, key, parts, [m["ext"] for m in members])

    def _sample(self, index: int, key: str, parts: dict[str, bytes], exts: list[str]) -> Sample | BadSample:
        seen = [e.lower() for e in exts]
        twice = sorted({e for e in seen if seen.count(e) > 1 and _used(e, self._rank)})
        if twice:
            return BadSample(index, key, f"its tar holds {', '.join(f'{key}.{e}' for e in twice)} more than once "
                             "(which one is meant is unknown)")
        image_ext = min((e for e in parts if e in self._rank), key=self._rank.__getitem__, default=None)
        if image_ext is None:
            return BadSample(index, key, f"no image member (members: {', '.join(sorted(exts)) or 'none'}; "
                             f"looked for {', '.join(self.image_extensions)})")
        labels: dict = {}
        side = "cls"
        try:  # a caption that is not UTF-8 makes its sample bad, as in WebDataset: no character is guessed
            if "cls" in self._has:
                labels["label"] = int(parts["cls"].decode().strip()) if "cls" in parts else None
            side = "txt"
            if "txt" in self._has:
                labels["caption"] = parts["txt"].decode("utf-8") if "txt" in parts else None
            side = "json"
            doc = json.loads(parts["json"]) if "json" in parts else None
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError too
            what = {"cls": "an integer", "txt": "UTF-8 text", "json": "JSON"}[side]
            return BadSample(index, key, f"its {side} member is not {what}: {describe_error(exc)}")
        for name, kind in self._json_fields:  # a value of another type than its column's: a bad sample
            value = doc.get(name) if isinstance(doc, dict) else None
            labels[name] = json.dumps(value) if kind == "json" and value is not None else value
        return Sample(index, key, bytes(parts[image_ext]), labels)
