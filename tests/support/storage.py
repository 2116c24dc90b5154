"""Test data on other filesystems, and what a read costs."""

from __future__ import annotations

from pathlib import Path


def upload(local: str | Path, uri: str) -> None:
    """Copy the local folder ``local`` to ``uri`` (a folder or prefix on any pyarrow filesystem)."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    fs.create_dir(root, recursive=True)
    pafs.copy_files(str(local), root, destination_filesystem=fs)


def bytes_read() -> int:
    """Bytes this process has read through read() and pread() so far (Linux ``/proc/self/io``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")
