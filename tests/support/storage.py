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


def on_network_mount(monkeypatch, folder: str | Path, kind: str = "nfs") -> None:
    """Have the sources take the local ``folder`` for a mount of a network file system ``kind``
    (as ``/proc/self/mounts`` would say)."""
    from pipeline._sources import _files

    table = Path(folder).parent / f".{Path(folder).name}.mounts"
    table.write_text(f"/dev/sda1 / ext4 rw 0 0\nhost:/export {Path(folder).resolve()} {kind} rw 0 0\n")
    real = _files.network_mount
    monkeypatch.setattr(_files, "network_mount", lambda path: real(path, str(table)))
