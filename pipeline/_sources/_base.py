"""What every source gives: samples with a stable id, and a description of itself."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, Union

import numpy as np
import pyarrow as pa
import torch

from .._records import BadSample


@dataclasses.dataclass(frozen=True)
class Deferred:
    """An image not read (or not made) yet: the thread that decodes it loads it first, so the
    reads of a batch run in parallel with no extra hand-off. ``load()`` gives the encoded bytes,
    or the pixels of an image made on demand (the generated source); each call gives the same.
    ``path`` is the local file's path when there is one: a GPU decoder reads it straight into a
    tensor."""

    load: Callable[[], bytes]
    path: str | None = None


#: An image as a source hands it over: encoded file bytes, a ``uint8`` or float ``(C, H, W)``
#: tensor, or an ``(H, W, C)`` uint8 array, given now or loaded by the decoding thread
#: (:class:`Deferred`); files are decoded by the actor, on its GPU where it has one.
RawImage = Union[bytes, Deferred, torch.Tensor, np.ndarray]


@dataclasses.dataclass
class Sample:
    """One sample: its position ``index`` in the source, its stable ``sample_id``, the image,
    and its labels (values for the pass-through columns, named as in ``Source.label_fields``);
    ``exact``: the labels whose values the source took from a column of their field's type,
    which holds them as they are (their check is skipped)."""

    index: int
    sample_id: str
    image: RawImage
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)
    exact: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """What an array label's column holds: one dtype, and one shape (``None``: any)."""

    dtype: np.dtype
    shape: tuple[int, ...] | None


def array_spec(arrays: Sequence[np.ndarray]) -> ArraySpec:
    """The column the first items' arrays make: the dtype that holds them all, their shape if
    they share one.

    >>> array_spec([np.zeros(2, np.int32), np.ones(2, np.float32)])
    ArraySpec(dtype=dtype('float64'), shape=(2,))
    >>> array_spec([np.zeros((4, 3)), np.zeros((1, 3))]).shape is None
    True
    """
    shapes = {a.shape for a in arrays}
    return ArraySpec(np.result_type(*(a.dtype for a in arrays)), shapes.pop() if len(shapes) == 1 else None)


class Source(Protocol):
    """A numbered collection of samples, opened by each actor for its own shards.

    A shard is a range of indices, read once, in order, by :meth:`stream`; :meth:`read` gets
    a few samples anywhere (the trial sample, pictures of a dump).
    """

    def __len__(self) -> int: ...

    def identity(self) -> dict:
        """A JSON description that changes when the samples change (kept in the manifest)."""

    def label_fields(self) -> list[pa.Field]:
        """The Arrow fields of the scalar pass-through columns (array labels are tensor columns)."""

    def stream(self, start: int, stop: int) -> Iterator[Sample | BadSample]:
        """Samples ``start`` to ``stop - 1``, in order; one that cannot be read is a ``BadSample``."""

    def read(self, indices: Sequence[int]) -> list[Sample | BadSample]:
        """The samples at ``indices``, in order."""


def runs(indices: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Consecutive ``[start, stop)`` runs of ``indices`` (in the order given).

    >>> list(runs([3, 4, 5, 9, 1, 2]))
    [(3, 6), (9, 10), (1, 3)]
    """
    for _, group in itertools.groupby(enumerate(indices), key=lambda p: p[1] - p[0]):
        values = [v for _, v in group]
        yield values[0], values[-1] + 1


class StreamingSource:
    """A source read in ranges: :meth:`read` of scattered indices streams each run of them."""

    def stream(self, start: int, stop: int) -> Iterator[Sample | BadSample]:
        raise NotImplementedError

    def read(self, indices: Sequence[int]) -> list[Sample | BadSample]:
        return [s for start, stop in runs(list(indices)) for s in self.stream(start, stop)]

    def close(self) -> None:
        """Let go of the index file, if the source reads one."""
        close = getattr(getattr(self, "index", None), "close", None)
        if close is not None:
            close()


class RandomAccessSource:
    """A source whose samples are each cheap to reach: :meth:`stream` reads them one by one,
    as they are asked for (a slow item holds back only its own batch)."""

    chunk = 1

    def read(self, indices: Sequence[int]) -> list[Sample | BadSample]:
        raise NotImplementedError

    def stream(self, start: int, stop: int) -> Iterator[Sample | BadSample]:
        for first in range(start, stop, self.chunk):
            yield from self.read(range(first, min(first + self.chunk, stop)))


def is_sample_fault(exc: BaseException) -> bool:
    """Whether an error belongs to the sample and would come again: a file that is missing or
    may not be read, bytes that are no image. Such a sample is recorded as bad. Other I/O errors
    (a dropped connection, a full disk) and running out of memory may pass: they fail the shard,
    which is retried, rather than marking good samples bad for good.

    >>> is_sample_fault(FileNotFoundError("x.png")), is_sample_fault(ConnectionResetError()), is_sample_fault(ValueError())
    (True, False, True)
    >>> is_sample_fault(ImportError("cannot import name 'InterpolationMode'"))
    False
    """
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return True
    return not isinstance(exc, (OSError, MemoryError, ImportError))  # a module that failed to load: not the image's


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a bad sample."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
