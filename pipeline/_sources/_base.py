"""What every source gives: samples with a stable id, and a description of itself."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, Union

import numpy as np
import pyarrow as pa
import torch

from .._records import BadSample

#: An image as a source hands it over: encoded file bytes (decoded by the actor, on its GPU
#: where it has one), a ``uint8`` or float ``(C, H, W)`` tensor, or an ``(H, W, C)`` uint8 array.
RawImage = Union[bytes, torch.Tensor, np.ndarray]


@dataclasses.dataclass
class Sample:
    """One sample: its position ``index`` in the source, its stable ``sample_id``, the image,
    and its labels (values for the pass-through columns, named as in ``Source.label_fields``)."""

    index: int
    sample_id: str
    image: RawImage
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)


class Source(Protocol):
    """A map-style collection of samples, opened by each actor for its own shards."""

    def __len__(self) -> int: ...

    def identity(self) -> dict:
        """A JSON description that changes when the samples change (kept in the manifest)."""

    def label_fields(self) -> list[pa.Field]:
        """The Arrow fields of the scalar pass-through columns (array labels are tensor columns)."""

    def read(self, indices: Sequence[int]) -> list[Sample | BadSample]:
        """The samples at ``indices``, in order; a sample that cannot be read is a ``BadSample``."""


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a bad sample."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
