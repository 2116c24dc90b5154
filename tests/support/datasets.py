"""Map-style datasets the tests name as ``support.datasets:<factory>``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


class Squares(torch.utils.data.Dataset):
    """``n`` float images in [0, 1] whose target is the index modulo 3; item ``bad`` raises."""

    def __init__(self, n: int = 20, size: int = 16, bad: int | None = None):
        self.n, self.size, self.bad = n, size, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i == self.bad:
            raise ValueError(f"item {i} is corrupt")
        g = torch.Generator().manual_seed(i)
        return torch.rand(3, self.size, self.size, generator=g), i % 3


class DictItems(Squares):
    """Items as dicts with an array label."""

    def __getitem__(self, i: int):
        image, target = super().__getitem__(i)
        return {"image": (image * 255).to(torch.uint8), "label": target,
                "box": np.array([i, i + 1, i + 2, i + 3], dtype=np.float32)}


class Keyed(Squares):
    """Items as dicts with a label under each of ``keys`` (the index, as its string for ``sample_id``)."""

    def __init__(self, n: int = 8, size: int = 8, keys: tuple[str, ...] = ("index",)):
        super().__init__(n, size)
        self.keys = tuple(keys)

    def __getitem__(self, i: int):
        image, _ = super().__getitem__(i)
        return {"image": image, **{k: str(i) if k == "sample_id" else i for k in self.keys}}


class DiesOnce(Squares):
    """Kills its process the first time item ``die_at`` is read (``marker`` records that it did)."""

    def __init__(self, n: int = 40, size: int = 16, die_at: int = 25, marker: str = ""):
        super().__init__(n, size)
        self.die_at, self.marker = die_at, marker

    def __getitem__(self, i: int):
        if i == self.die_at and not Path(self.marker).exists():
            Path(self.marker).write_text("died")
            os._exit(1)
        return super().__getitem__(i)


class Slow(Squares):
    """Squares that take ``delay`` seconds each to read: a run long enough to interrupt."""

    def __init__(self, n: int = 20, size: int = 16, delay: float = 0.02):
        super().__init__(n, size)
        self.delay = delay

    def __getitem__(self, i: int):
        import time

        time.sleep(self.delay)
        return super().__getitem__(i)
