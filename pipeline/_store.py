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

    def __init__(self, location: str):
        self.location = location
        self.fs, self.root = _split_location(location)

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative)

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
            return []
        if info.type != pafs.FileType.Directory:
            raise NotADirectoryError(f"{self.location!r} is a file, not a folder")
        return sorted(posixpath.basename(i.path) for i in
                      self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False)))

    def list_files(self, relative: str) -> list[str]:
        """The files under ``relative`` (at any depth), relative to the root."""
        base = self.path(relative)
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        return sorted(posixpath.relpath(i.path, self.root) for i in infos
                      if i.type == pafs.FileType.File)

    def clear(self) -> None:
        """Delete everything in the root folder."""
        if self.entries():
            self.fs.delete_dir_contents(self.root)

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
