"""A folder of image files; class sub-folders become labels.

Files are found recursively and sorted, so the index of a file is stable while the folder
does not change; its id is its path relative to the root (``cat/001.jpg``). When every file
lies in a sub-folder, the sorted first-level folder names are the classes: ``label`` is the
class index and ``class_name`` the folder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from ..errors import ConfigError
from ._base import BadSample, Sample, describe_error

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                            ".ppm", ".pgm", ".pbm", ".tga", ".ico"})


class FolderSource:
    """The images under ``root`` (any format PIL reads)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ConfigError("source.path", f"{str(self.root)!r} is not a folder")
        self.files = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise ConfigError("source.path", f"{str(self.root)!r} holds no image files "
                              f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        nested = all("/" in f for f in self.files)
        self.classes = sorted({f.split("/", 1)[0] for f in self.files}) if nested else []
        self._class_index = {name: i for i, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.files)

    def identity(self) -> dict:
        listing = hashlib.sha256("\n".join(self.files).encode()).hexdigest()
        return {"kind": "folder", "path": str(self.root.resolve()), "files": len(self.files),
                "listing_sha256": listing, "classes": self.classes}

    def label_fields(self) -> list[pa.Field]:
        if not self.classes:
            return []
        return [pa.field("label", pa.int64()), pa.field("class_name", pa.string())]

    def read(self, indices: Sequence[int]) -> list[Sample | BadSample]:
        samples: list[Sample | BadSample] = []
        for index in indices:
            name = self.files[index]
            try:
                data = (self.root / name).read_bytes()
            except OSError as exc:
                samples.append(BadSample(index, name, describe_error(exc)))
                continue
            labels = {}
            if self.classes:
                folder = name.split("/", 1)[0]
                labels = {"label": self._class_index[folder], "class_name": folder}
            samples.append(Sample(index, name, data, labels))
        return samples
