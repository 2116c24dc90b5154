"""WebDataset tar shards the tests read."""

from __future__ import annotations

import io
import json
import tarfile

from PIL import Image


def _image(fmt: str, value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (value, 0, 0)).save(buf, format=fmt)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, shards=3, per_shard=4, broken=()):
    """``shards`` tars of ``per_shard`` samples: an image (jpg or png), .cls, .txt and .json."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for s in range(shards):
        with tarfile.open(folder / f"train-{s:04d}.tar", "w") as tar:
            for _ in range(per_shard):
                key = f"sample{n:05d}"
                if n not in broken:
                    _add(tar, f"{key}.{'jpg' if n % 2 else 'png'}", _image("JPEG" if n % 2 else "PNG", n))
                _add(tar, f"{key}.cls", str(n % 3).encode())
                _add(tar, f"{key}.txt", f"caption {n}".encode())
                _add(tar, f"{key}.json", json.dumps({"score": n / 2, "tags": ["a", n], "ok": n % 2 == 0}).encode())
                n += 1
    return folder
