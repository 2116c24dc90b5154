"""The sources a dump reads from; :func:`open_source` builds the one a config names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._records import BadSample
from ..config import SourceKind, SourceSpec
from ._base import RawImage, Sample, Source, describe_error
from .dataset import DatasetSource
from .folder import FolderSource
from .generated import GeneratedSource
from .parquet import ParquetSource

__all__ = ["BadSample", "DatasetSource", "FolderSource", "GeneratedSource", "ParquetSource",
           "RawImage", "Sample", "Source", "describe_error", "open_source"]


def open_source(spec: SourceSpec) -> Source:
    """The source a config's ``source`` section describes."""
    return _OPENERS[spec.kind](spec)


#: How each kind's section becomes its source.
_OPENERS: dict[SourceKind, Callable[[Any], Source]] = {
    SourceKind.GENERATED: lambda spec: GeneratedSource(spec.count, spec.image_size, spec.seed),
    SourceKind.FOLDER: lambda spec: FolderSource(spec.path),
    SourceKind.PARQUET: lambda spec: ParquetSource(spec.path, spec.image_column, spec.id_column, spec.columns),
    SourceKind.DATASET: lambda spec: DatasetSource(spec.target, spec.kwargs),
}
