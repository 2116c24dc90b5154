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


class Annotated(Squares):
    """Dict items with a nested ``ann`` label: ``{"n": i, "boxes": [{"x": i}]}``, a box with a
    key ``"w"`` too from item ``wide_from`` on, and ``x`` a fraction in item ``fraction_at``;
    with ``segments``, ``ann["segments"]`` too, always None, and ``ann["n"]`` text in item
    ``text_at``; with ``meta``, a label ``meta`` that is an empty dict in every item."""

    def __init__(self, n: int = 16, size: int = 8, wide_from: int = 10, fraction_at: int = 12,
                 segments: bool = False, text_at: int = 10, meta: bool = False):
        super().__init__(n, size)
        self.wide_from, self.fraction_at, self.segments, self.text_at = wide_from, fraction_at, segments, text_at
        self.meta = meta

    def __getitem__(self, i: int):
        image, _ = super().__getitem__(i)
        box = {"x": i + 0.5 if i == self.fraction_at else i}
        ann = {"n": i, "boxes": [dict(box, w=2) if i >= self.wide_from else box]}
        if self.segments:
            ann.update(n="many" if i == self.text_at else i, segments=None)
        return {"image": image, "ann": ann, **({"meta": {}} if self.meta else {})}


class LateBad(Squares):
    """Squares whose item ``bad`` raises after ``delay`` seconds (a read that fails slowly): the
    shards beside its own have written batches by then."""

    def __init__(self, n: int = 20, size: int = 16, bad: int | None = None, delay: float = 3.0):
        super().__init__(n, size, bad)
        self.delay = delay

    def __getitem__(self, i: int):
        if i == self.bad:
            import time

            time.sleep(self.delay)
        return super().__getitem__(i)


class DictItems(Squares):
    """Items as dicts with an array label."""

    def __getitem__(self, i: int):
        image, target = super().__getitem__(i)
        return {"image": (image * 255).to(torch.uint8), "label": target,
                "box": np.array([i, i + 1, i + 2, i + 3], dtype=np.float32)}


class Targets(Squares):
    """``(image, target)`` items whose array target is ``shape`` of ``dtype`` (filled with the
    index), from item ``change_at`` on ``later_shape`` of ``later_dtype`` instead."""

    def __init__(self, n: int = 16, size: int = 8, shape: tuple = (2,), dtype: str = "float32",
                 change_at: int | None = None, later_shape: tuple | None = None, later_dtype: str | None = None):
        super().__init__(n, size)
        self.first, self.later = (tuple(shape), dtype), (tuple(later_shape or shape), later_dtype or dtype)
        self.change_at = n if change_at is None else change_at

    def __getitem__(self, i: int):
        image, _ = super().__getitem__(i)
        shape, dtype = self.later if i >= self.change_at else self.first
        return image, np.full(shape, i, dtype=dtype)


class Scored(Squares):
    """Dict items whose ``score`` is an int for even indices and a float for odd ones (or a
    string at index ``text_at``); item ``bad`` raises."""

    def __init__(self, n: int = 8, size: int = 8, text_at: int | None = None, bad: int | None = None):
        super().__init__(n, size, bad)
        self.text_at = text_at

    def __getitem__(self, i: int):
        image, _ = super().__getitem__(i)
        score = "high" if i == self.text_at else (i if i % 2 == 0 else i + 0.5)
        return {"image": image, "score": score}


class Labelled(Squares):
    """Dict items with a ``tag`` label: ``None`` before item ``tagged_from``, then the index plus
    ``offset`` (as a pair, an array, with ``pair``; with ``boxes``, a list of boxes, empty before
    ``tagged_from``, then one of the index and a fraction); the items before ``readable_from`` raise;
    item ``dropping`` raises a ``ConnectionResetError`` (a dropped connection) the first time
    this object reads it."""

    def __init__(self, n: int = 20, size: int = 8, tagged_from: int = 0, readable_from: int = 0, offset: int = 0,
                 dropping: int | None = None, pair: bool = False, boxes: bool = False):
        super().__init__(n, size)
        self.tagged_from, self.readable_from, self.offset, self.dropping = tagged_from, readable_from, offset, dropping
        self.pair, self.boxes = pair, boxes

    def __getitem__(self, i: int):
        if i < self.readable_from:
            raise ValueError(f"item {i} is corrupt")
        if i == self.dropping:
            self.dropping = None
            raise ConnectionResetError("the connection dropped")
        image, _ = super().__getitem__(i)
        tag = None if i < self.tagged_from else i + self.offset
        if self.boxes:
            return {"image": image, "tag": [] if tag is None else [[tag, tag + 0.5]]}
        return {"image": image, "tag": np.array([tag, tag]) if self.pair and tag is not None else tag}


class Drifting(Squares):
    """Dict items whose ``tag`` is the index, plus a half where the file ``floats`` exists when
    the dataset is built: a source whose items type their labels otherwise from run to run."""

    def __init__(self, n: int = 16, size: int = 8, floats: str = ""):
        super().__init__(n, size)
        self.as_float = bool(floats) and os.path.exists(floats)

    def __getitem__(self, i: int):
        image, _ = super().__getitem__(i)
        return {"image": image, "tag": i + 0.5 if self.as_float else i}


class LateKey(Squares):
    """Dict items with a ``score``, except item ``missing``; from item ``late_from`` on also a
    ``late`` label, which the first items (those that type the columns) do not have."""

    def __init__(self, n: int = 12, size: int = 8, late_from: int = 9, missing: int | None = None):
        super().__init__(n, size)
        self.late_from, self.missing = late_from, missing

    def __getitem__(self, i: int):
        image, _ = super().__getitem__(i)
        item = {"image": image} if i == self.missing else {"image": image, "score": float(i)}
        return {**item, "late": i} if i >= self.late_from else item


class Keyed(Squares):
    """Items as dicts with a label under each of ``keys`` (the index, as its string for ``sample_id``)."""

    def __init__(self, n: int = 8, size: int = 8, keys: tuple[str, ...] = ("index",)):
        super().__init__(n, size)
        self.keys = tuple(keys)

    def __getitem__(self, i: int):
        image, _ = super().__getitem__(i)
        return {"image": image, **{k: str(i) if k == "sample_id" else i for k in self.keys}}


class _Trips(Squares):
    """Squares whose item ``at`` trips the first ``times`` times it is read; each read of it adds
    a line to the file ``log`` (which counts them across processes and restarts)."""

    def __init__(self, n: int = 40, size: int = 16, at: int = 25, log: str = "", times: int = 1):
        super().__init__(n, size)
        self.at, self.log, self.times = at, log, times

    def _tripped(self, i: int) -> bool:
        if i != self.at:
            return False
        with open(self.log, "a") as f:
            f.write("read\n")
        return len(Path(self.log).read_text().splitlines()) <= self.times


class Dies(_Trips):
    """Kills its process when item ``at`` trips."""

    def __getitem__(self, i: int):
        if self._tripped(i):
            os._exit(1)
        return super().__getitem__(i)


class Fails(_Trips):
    """Gives a larger image when item ``at`` trips: with ``dump.shapes: fixed`` its layers change
    shape, and its shard fails (not a bad sample: the image itself is fine)."""

    def __getitem__(self, i: int):
        image, target = super().__getitem__(i)
        return (torch.nn.functional.pad(image, (0, 2, 0, 2)) if self._tripped(i) else image), target


class Away(_Trips):
    """Raises a ``ConnectionError`` when item ``at`` trips (storage away for a while): its shard
    fails, and is tried again after ``run.retry_delay``."""

    def __getitem__(self, i: int):
        if self._tripped(i):
            raise ConnectionError(f"connection reset reading item {i}")
        return super().__getitem__(i)


class Slow(Squares):
    """Squares that take ``delay`` seconds each to read: a run long enough to interrupt."""

    def __init__(self, n: int = 20, size: int = 16, delay: float = 0.02, bad: int | None = None):
        super().__init__(n, size, bad)
        self.delay = delay

    def __getitem__(self, i: int):
        import time

        time.sleep(self.delay)
        return super().__getitem__(i)


class WithWhite(Squares):
    """Squares where item ``white`` is all ones (white)."""

    def __init__(self, n: int = 8, size: int = 16, white: int = 2):
        super().__init__(n, size)
        self.white = white

    def __getitem__(self, i: int):
        image, target = super().__getitem__(i)
        return (torch.ones_like(image) if i == self.white else image), target


class Gated(Squares):
    """Squares whose item ``at`` waits until the file ``gate`` exists: a run that holds still
    where a test wants it, for as long as it wants."""

    def __init__(self, n: int = 40, size: int = 16, at: int = 20, gate: str = ""):
        super().__init__(n, size)
        self.at, self.gate = at, gate

    def __getitem__(self, i: int):
        if i == self.at:
            import time

            deadline = time.monotonic() + 300
            while not os.path.exists(self.gate) and time.monotonic() < deadline:
                time.sleep(0.02)
        return super().__getitem__(i)
