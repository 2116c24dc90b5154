"""A folder of image files, local or on object storage; class sub-folders become labels.

The driver lists the folder once (:func:`~pipeline._sources._files.list_tree`): the files,
sorted by path, are the samples, and the listing is the source's index, kept in the dump so
that every actor numbers the files the same way without walking the tree. A file's id is its
path relative to the root (``cat/001.jpg``). Hidden files and folders (a name that starts with
``.``) are left out. When every file lies in a sub-folder, the sorted first-level folders are
the classes, numbered as torchvision's ``ImageFolder`` numbers them (one with no image too):
``label`` is the class index and ``class_name`` the folder.

On a local disk a sample's bytes are read by the thread that decodes it (so reads run as
parallel as decoding); on object storage or a network file system (NFS, Lustre, ...) a pool of
readers fetches the files ahead of the decoder, since each request waits on the network.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc

from ..config import FolderSpec
from ..errors import ConfigError
from ._base import BadSample, Deferred, Sample, StreamingSource, describe_error, is_sample_fault
from ._files import list_tree, missing, open_location, ordered_map, read_local
from ._index import Index, MemoryIndex, digest

log = logging.getLogger(__name__)

#: The suffixes of the files taken as images (any case): the still-image formats PIL reads.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".gif", ".tif",
                            ".tiff", ".webp", ".avif", ".jp2", ".j2k", ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
                            ".ico", ".pcx", ".qoi"})

#: Files fetched at once from object storage or a network file system, by all the shards being read.
REMOTE_READERS = 32


def _without_hidden(listing: pa.Table) -> tuple[pa.Table, int, str | None]:
    """The listing without the files whose name, or a folder's on their path, starts with ``.``
    (a version-control or notebook folder, macOS's ``._*`` resource copies: none is a sample);
    how many were left out, and the first of them.

    >>> kept, count, first = _without_hidden(pa.table({"path": ["a/._1.jpg", "a/1.jpg", ".git/x.png", "b.c/2.png"]}))
    >>> kept.column("path").to_pylist(), count, first
    (['a/1.jpg', 'b.c/2.png'], 2, 'a/._1.jpg')
    """
    paths = listing.column("path")
    # (two plain searches: a regex costs twice theirs, 76 against 37 ms per 1,000,000 paths)
    hidden = pc.or_(pc.starts_with(paths, "."), pc.match_substring(paths, "/."))
    count = pc.sum(hidden).as_py() or 0
    if not count:
        return listing, 0, None
    return listing.filter(pc.invert(hidden)), count, listing.filter(hidden).column("path")[0].as_py()


def _classes(paths: pa.ChunkedArray, folders: list[str]) -> list[str]:
    """The classes: when every file lies in a folder, the first-level ``folders`` (but hidden
    ones), sorted, as torchvision's ``ImageFolder`` numbers them, a folder with no image in it
    too (else a split where one class is empty would number the classes after it otherwise);
    none when some files lie at the top.

    >>> _classes(pa.chunked_array([["cat/1.png", "dog/2.png", "cat/3.png"]]), ["dog", "cat", ".cache"])
    ['cat', 'dog']
    >>> _classes(pa.chunked_array([["cat/1.png", "dog/2.png"]]), ["cat", "cow", "dog"])  # cow: no images
    ['cat', 'cow', 'dog']
    >>> _classes(pa.chunked_array([["cat/1.png", "2.png"]]), ["cat"])
    []
    """
    if not len(paths):
        return []
    nested = pc.match_substring(paths, "/")
    if not pc.all(nested).as_py():
        if pc.any(nested).as_py():  # files at the top beside folders of files: the labels they cost, said
            top = pc.sum(pc.invert(nested)).as_py()
            stray = pc.filter(paths, pc.invert(nested))[0].as_py()
            log.warning("%d of the %d files lie beside the folders, not in one (e.g. %r): so the folders are not "
                        "taken as classes and the samples have no label; move or remove them for class labels",
                        top, len(paths), stray)
        return []
    holding = set(pc.unique(pc.list_element(pc.split_pattern(paths, "/", max_splits=1), 0)).to_pylist())
    classes = sorted(holding | {name for name in folders if not name.startswith(".")})
    empty = [name for name in classes if name not in holding]
    if empty:
        log.warning("%d class folder(s) hold no image files (%s): each still takes its label number, as "
                    "torchvision's ImageFolder numbers the folders, so that another split numbers the classes alike",
                    len(empty), ", ".join(map(repr, empty[:5])) + (", ..." if len(empty) > 5 else ""))
    return classes


class FolderSource(StreamingSource):
    """The images under ``path`` (files with a suffix of :data:`IMAGE_SUFFIXES`), numbered by
    sorted relative path.

    Args:
        path: a local folder or a URI (``s3://bucket/prefix``, ``gs://...``, ``file://...``).
        index: the listing the driver made (actors); ``None`` lists the folder now.
    """

    def __init__(self, path: str, index: Index | None = None):
        self.location = open_location(str(path), FolderSpec.key("path"))
        if index is None:
            index = self._list()
        self.index = index
        self.classes: list[str] = list(index.meta["classes"])
        self._class_index = {name: i for i, name in enumerate(self.classes)}
        self._readers: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _list(self) -> MemoryIndex:
        try:
            kind = self.location.kind()
        except OSError as exc:
            raise ConfigError(FolderSpec.key("path"), f"cannot reach {self.location.shown!r}: "
                              f"{str(exc).replace(self.location.location, self.location.shown)}") from None
        if kind.name == "NotFound":
            raise ConfigError(FolderSpec.key("path"), missing(self.location, "a folder"))
        if kind.name != "Directory":
            raise ConfigError(FolderSpec.key("path"), f"{self.location.shown!r} is a file, not a folder of images")
        try:
            listing = list_tree(self.location, IMAGE_SUFFIXES)
        except OSError as exc:
            if not self.location.local:  # the network's: a rerun may pass
                raise
            # (a folder it may not read, a path too long: nothing has started, and a rerun meets it again)
            raise ConfigError(FolderSpec.key("path"), f"cannot list {self.location.shown!r}: {describe_error(exc)}; "
                              "make every folder under it readable, or point it at one that is") from None
        listing, hidden, first_hidden = _without_hidden(listing)
        if hidden:
            log.warning("%d image file(s) under %s have a hidden name or lie in a hidden folder (a name that starts "
                        "with '.', such as macOS's '._*' copies) and are left out, e.g. %r", hidden,
                        self.location.shown, first_hidden)
        if not listing.num_rows:
            also = f"; {hidden} hidden one(s) left out, e.g. {first_hidden!r}" if hidden else ""
            raise ConfigError(FolderSpec.key("path"), f"{self.location.shown!r} holds no image files "
                              f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))}{also})")
        classes = _classes(listing.column("path"), self.location.folders())
        return MemoryIndex(listing, {"classes": classes, "sha256": digest(listing, {"classes": classes})})

    def __len__(self) -> int:
        return len(self.index)

    def identity(self) -> dict:
        where = self.location.root if self.location.local else self.location.location
        return {"kind": "folder", "path": where, "files": len(self),
                "listing_sha256": self.index.meta["sha256"], "classes": self.classes}

    def label_fields(self) -> list[pa.Field]:
        if not self.classes:
            return []
        return [pa.field("label", pa.int64()), pa.field("class_name", pa.string())]

    def _labels(self, name: str) -> dict:
        if not self.classes:
            return {}
        folder = name.split("/", 1)[0]
        return {"label": self._class_index[folder], "class_name": folder}

    def _fetch(self, name: str) -> bytes | Exception:
        """The file's bytes; the error when it is the file's (missing, forbidden), else it raises."""
        try:
            return self.location.read(name)
        except OSError as exc:
            if is_sample_fault(exc):
                return exc
            raise

    def close(self) -> None:
        if self._readers is not None:
            self._readers.shutdown(wait=True)
            self._readers = None
        super().close()

    def stream(self, start: int, stop: int) -> Iterator[Sample | BadSample]:
        names = self.index.slice(start, stop).column("path").to_pylist()
        if not self.location.on_network:
            root = self.location.root.rstrip("/")
            for index, name in enumerate(names, start):
                path = f"{root}/{name}"
                yield Sample(index, name, Deferred(functools.partial(read_local, path), path), self._labels(name))
            return
        with self._lock:  # the shards at work stream from their own threads: one pool for them all
            if self._readers is None:
                self._readers = ThreadPoolExecutor(REMOTE_READERS, thread_name_prefix="actmap-fetch")
        fetched = ordered_map(self._readers, self._fetch, names, window=2 * REMOTE_READERS)
        for index, (name, future) in enumerate(zip(names, fetched), start):
            data = future.result()
            if isinstance(data, Exception):
                yield BadSample(index, name, describe_error(data))
            else:
                yield Sample(index, name, data, self._labels(name))
