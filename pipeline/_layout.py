"""The on-disk contract: every name and path rule of a dump, defined here and nowhere else.

A dump at ``OUT`` holds one Hive-style folder per layer, ``OUT/layer=<layer id>/``, with one
Parquet file per (layer, shard); the files' columns are ``sample_id``, ``index``, the
``activation`` (plus ``activation_shape`` when shapes vary) and the source's pass-through
columns; the schema metadata is JSON under the key ``actmap``. Files are written under hidden
temporary names and renamed when complete. ``OUT/_actmap/`` holds the manifest, one record per
finished shard, and the index of the source the run numbered its samples by (Parquet readers
skip folders that start with ``_``).

>>> layer_file("backbone.body.layer3", 2)
'layer=backbone.body.layer3/part-00002.parquet'
>>> partition_layer("layer=a%2Fb"), partition_layer("_actmap")
('a/b', None)
>>> shape_column(ACTIVATION), shard_record_path(7)
('activation_shape', '_actmap/shards/00007.json')
>>> is_temporary("layer=x/.part-00001.parquet.0123456789ab.tmp"), is_data_file("layer=x/part-00001.parquet")
(True, True)
>>> file_shard("layer=x/part-00001.parquet"), is_owned("layer=x/notes.txt"), is_owned("_actmap/anything")
(1, False, True)
"""

from __future__ import annotations

import posixpath
import re
import urllib.parse
import uuid
from collections.abc import Iterable

# -- columns ----------------------------------------------------------------------------------

SAMPLE_ID = "sample_id"
INDEX = "index"
ACTIVATION = "activation"
#: The Hive partition key: a reader of the whole dump sees the layer id as this column.
PARTITION_KEY = "layer"
_SHAPE_SUFFIX = "_shape"


def shape_column(column: str) -> str:
    """The companion column that holds each row's shape of a variable-shape tensor column."""
    return column + _SHAPE_SUFFIX


def shape_columns(tensor_columns: Iterable[str]) -> set[str]:
    """The shape companions of ``tensor_columns`` (what a reader decodes with them, not beside)."""
    return {shape_column(c) for c in tensor_columns}


#: Output columns a pass-through label may not take the name of.
RESERVED_COLUMNS = frozenset({SAMPLE_ID, INDEX, PARTITION_KEY, ACTIVATION, shape_column(ACTIVATION)})

# -- schema metadata ----------------------------------------------------------------------------

#: The Parquet schema metadata key of the JSON that describes the tensor columns.
METADATA_KEY = b"actmap"
TENSOR_FORMAT = "actmap.tensor/1"

# -- files ------------------------------------------------------------------------------------

_PARTITION_PREFIX = PARTITION_KEY + "="
_DATA_SUFFIX = ".parquet"
_TEMPORARY_SUFFIX = ".tmp"
_DATA_NAME = re.compile(r"part-(\d{5,})" + re.escape(_DATA_SUFFIX))
_TEMPORARY_NAME = re.compile(r"\.(.+)\.[0-9a-f]+" + re.escape(_TEMPORARY_SUFFIX))


def partition_dir(layer: str) -> str:
    """The folder of a layer, ``layer=<id>`` (characters outside ids are quoted)."""
    return _PARTITION_PREFIX + urllib.parse.quote(layer, safe="._-")


def partition_layer(entry: str) -> str | None:
    """The layer id of a partition folder's name (the inverse of :func:`partition_dir`);
    ``None`` for any other name."""
    if not entry.startswith(_PARTITION_PREFIX):
        return None
    return urllib.parse.unquote(entry[len(_PARTITION_PREFIX):])


def layer_file(layer: str, shard_id: int) -> str:
    """Where shard ``shard_id``'s rows of ``layer`` live, relative to the output root.

    A pure function of (layer, shard): a retried shard overwrites its own file.
    """
    return f"{partition_dir(layer)}/part-{shard_id:05d}{_DATA_SUFFIX}"


def is_hidden(path: str) -> bool:
    """Whether a name is hidden (``.`` first): never part of the dump."""
    return posixpath.basename(path).startswith(".")


def file_shard(path: str) -> int | None:
    """The shard whose rows a data file (``.../part-00003.parquet``) holds; ``None`` for any
    other name."""
    match = _DATA_NAME.fullmatch(posixpath.basename(path))
    return int(match.group(1)) if match else None


def is_data_file(path: str) -> bool:
    """Whether ``path`` is named as a finished data file (not a temporary one)."""
    return file_shard(path) is not None


def temporary_name(relative: str) -> str:
    """A hidden temporary name beside ``relative``, unique to one writer."""
    folder, name = posixpath.split(relative)
    return posixpath.join(folder, f".{name}.{uuid.uuid4().hex[:12]}{_TEMPORARY_SUFFIX}")


def temporary_target(path: str) -> str | None:
    """The file a temporary file of :func:`temporary_name` was to become (``None``: ``path`` is
    no such temporary file)."""
    folder, name = posixpath.split(path)
    match = _TEMPORARY_NAME.fullmatch(name)
    return posixpath.join(folder, match.group(1)) if match else None


def is_temporary(path: str) -> bool:
    """Whether ``path`` is named as a temporary file of :func:`temporary_name` (of a write that
    finished or not)."""
    return temporary_target(path) is not None


def is_owned(path: str) -> bool:
    """Whether a dump writes ``path`` (relative to the root): anything in its own folder
    (``_actmap/``), and in a layer's folder its data files and their temporary files. A dump
    deletes nothing else, and a folder holding anything else is no dump.

    >>> [is_owned(p) for p in ("layer=a/part-00000.parquet", "layer=a/.part-00000.parquet.0123456789ab.tmp",
    ...                        "layer=a/mine.parquet", "notes.txt", ".git/HEAD", "layer=a")]
    [True, True, False, False, False, False]
    """
    top, _, rest = path.partition("/")
    if top == META_DIR:
        return True
    if partition_layer(top) is None or "/" in rest:
        return False
    return is_data_file(temporary_target(rest) or rest)


# -- the run's own folder -------------------------------------------------------------------------

META_DIR = "_actmap"
MANIFEST_PATH = f"{META_DIR}/manifest.json"
MANIFEST_FORMAT = "actmap.manifest/1"
#: The format of a manifest with a layer whose maps are pooled as (batch, height, width,
#: channels): a version before layouts were recorded would pool that layer's maps otherwise, so
#: it refuses to resume such a dump by its format (it knows ``MANIFEST_FORMAT`` alone).
MANIFEST_FORMAT_POOLED_LAST = "actmap.manifest/2"
#: The formats this version resumes.
MANIFEST_FORMATS = (MANIFEST_FORMAT, MANIFEST_FORMAT_POOLED_LAST)
SHARDS_DIR = f"{META_DIR}/shards"
_RECORD_SUFFIX = ".json"
#: The source's frozen index (a folder's listing, Parquet row groups, tar members), if it has one.
SOURCE_INDEX_PATH = f"{META_DIR}/source-index.parquet"
#: Who runs on the dump now (one run at a time): host, process, start, lease.
LOCK_PATH = f"{META_DIR}/lock.json"


def shard_record_path(shard_id: int) -> str:
    """Where the record of a finished shard lives, relative to the output root."""
    return f"{SHARDS_DIR}/{shard_id:05d}{_RECORD_SUFFIX}"


def is_shard_record(path: str) -> bool:
    """Whether ``path`` (relative to the root) is a shard record."""
    return posixpath.dirname(path) == SHARDS_DIR and path.endswith(_RECORD_SUFFIX) and not is_hidden(path)


def record_shard(path: str) -> int | None:
    """The shard a record file is of (``_actmap/shards/00007.json`` -> 7); ``None`` when its
    name is not a shard number."""
    stem = posixpath.basename(path)[:-len(_RECORD_SUFFIX)]
    return int(stem) if is_shard_record(path) and stem.isdigit() else None
