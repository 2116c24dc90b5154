"""The output store: a folder on any filesystem pyarrow opens, written atomically.

Files appear only complete: each is written under a hidden temporary name (``.`` prefix,
ignored by Parquet readers) and moved to its final name when done.

>>> import tempfile
>>> store = OutputStore(tempfile.mkdtemp())
>>> store.write_json("meta/x.json", {"a": 1})
>>> store.read_json("meta/x.json")
{'a': 1}
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

import pyarrow.fs as pafs

from ._layout import temporary_name


def _split_location(location: str) -> tuple[pafs.FileSystem, str]:
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location)).replace(os.sep, "/")


class OutputStore:
    """The dump's root folder ``location``: a local path or a URI (``s3://``, ``gs://``, ...)."""

    def __init__(self, location: str | os.PathLike):
        if not isinstance(location, (str, os.PathLike)) or isinstance(location, bytes):
            raise TypeError(f"a dump's location is a path (str or pathlib.Path) or a URI, got {location!r}")
        self.location = os.fspath(location)
        if not isinstance(self.location, str):
            raise TypeError(f"a dump's location is a path (str or pathlib.Path) or a URI, got {location!r}")
        self.fs, self.root = _split_location(self.location)

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative)

    def relative(self, path: str) -> str:
        """The path of the full ``path`` relative to the root (the inverse of :meth:`path`)."""
        return posixpath.relpath(path, self.root)

    def temporary(self, relative: str) -> str:
        """A hidden temporary name beside ``relative``, unique to this writer (a full path)."""
        return self.path(temporary_name(relative))

    def make_dirs(self, relative: str) -> None:
        self.fs.create_dir(self.path(relative), recursive=True)

    def publish(self, temporary: str, relative: str) -> None:
        """Move a finished temporary file to its final name (replacing an older one)."""
        self.fs.move(temporary, self.path(relative))

    def delete_file(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def size(self, relative: str) -> int:
        return self.fs.get_file_info(self.path(relative)).size

    def entries(self) -> list[str]:
        """The names in the root folder (empty if it does not exist)."""
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.NotFound:
            if self.local:  # a folder to be made under a file cannot be
                above = posixpath.dirname(self.root)
                while above != posixpath.dirname(above) and not os.path.exists(above):
                    above = posixpath.dirname(above)
                if os.path.isfile(above):
                    raise NotADirectoryError(f"{self.location!r} lies under {above!r}, which is a file, not a folder")
            return []
        if info.type != pafs.FileType.Directory:
            raise NotADirectoryError(f"{self.location!r} is a file, not a folder")
        return sorted(posixpath.basename(i.path) for i in
                      self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False)))

    def sizes(self, relative: str) -> dict[str, int]:
        """The files under ``relative`` (at any depth), relative to the root, with their sizes:
        one listing, however many files."""
        base = self.path(relative)
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return {}
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        return {self.relative(i.path): i.size for i in sorted(infos, key=lambda i: i.path)
                if i.type == pafs.FileType.File}

    def list_files(self, relative: str) -> list[str]:
        """The files under ``relative`` (at any depth), relative to the root."""
        return list(self.sizes(relative))

    def is_dir(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type == pafs.FileType.Directory

    @property
    def root_exists(self) -> bool:
        return self.fs.get_file_info(self.root).type != pafs.FileType.NotFound

    def delete_root(self) -> None:
        """Delete the root folder, which must be empty."""
        self.fs.delete_dir(self.root)

    def delete_dir(self, relative: str) -> None:
        """Delete the folder ``relative`` if it is there (with what it holds)."""
        if self.is_dir(relative):
            self.fs.delete_dir(self.path(relative))

    @property
    def local(self) -> bool:
        """Whether the store is on this machine's filesystem."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def write_json(self, relative: str, doc: Any) -> None:
        """Write a JSON document atomically."""
        self.make_dirs(posixpath.dirname(relative) or ".")
        tmp = self.temporary(relative)
        with self.fs.open_output_stream(tmp) as out:
            out.write(json.dumps(doc, indent=1, sort_keys=True).encode())
        self.publish(tmp, relative)

    def read_json(self, relative: str) -> Any:
        with self.fs.open_input_stream(self.path(relative)) as f:
            return json.loads(f.read())

    def create_json(self, relative: str, doc: Any) -> bool:
        """Write a JSON document only if ``relative`` does not exist yet; whether it was written.

        On a local disk the document is written under a temporary name and hard-linked to
        ``relative``, which fails if it exists: of two writers one wins, and no reader sees
        half a document. Object stores offer pyarrow no conditional write: there it is a check,
        then a write (the lock reads it back after a while: :mod:`pipeline._lock`).
        """
        if not self.local:
            if self.exists(relative):
                return False
            self.write_json(relative, doc)
            return True
        self.make_dirs(posixpath.dirname(relative) or ".")
        tmp = self.temporary(relative)
        with open(tmp, "wb") as out:
            out.write(json.dumps(doc, indent=1, sort_keys=True).encode())
        try:
            os.link(tmp, self.path(relative))
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
