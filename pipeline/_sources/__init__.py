"""The sources a dump reads from; :func:`open_source` builds the one a config names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._records import BadSample
from ..config import SourceKind, SourceSpec
from ._base import Deferred, RawImage, Sample, Source, describe_error, is_sample_fault
from ._index import Index, IndexFile, MemoryIndex, write_index
from .dataset import DatasetSource
from .folder import FolderSource
from .generated import GeneratedSource
from .parquet import ParquetSource
from .webdataset import WebDatasetSource

__all__ = ["BadSample", "DatasetSource", "Deferred", "FolderSource", "GeneratedSource", "Index", "IndexFile",
           "MemoryIndex", "ParquetSource", "RawImage", "Sample", "Source", "WebDatasetSource", "describe_error",
           "is_sample_fault", "open_source", "write_index"]


def open_source(spec: SourceSpec, index: Index | None = None) -> Source:
    """The source a config's ``source`` section describes.

    Args:
        spec: the ``source`` section.
        index: the index the driver made of the source (the workers' view, frozen for the run);
            ``None`` makes it now (the driver). Sources without one ignore it.
    """
    return _OPENERS[spec.kind](spec, index)


#: How each kind's section becomes its source.
_OPENERS: dict[SourceKind, Callable[[Any, Index | None], Source]] = {
    SourceKind.GENERATED: lambda spec, index: GeneratedSource(spec.count, spec.image_size, spec.seed),
    SourceKind.FOLDER: lambda spec, index: FolderSource(spec.path, index=index),
    SourceKind.PARQUET: lambda spec, index: ParquetSource(spec.path, spec.image_column, spec.id_column,
                                                          spec.columns, index=index),
    SourceKind.WEBDATASET: lambda spec, index: WebDatasetSource(
        list(spec.path) if isinstance(spec.path, tuple) else spec.path, index=index,
        image_extensions=spec.image_extensions),
    SourceKind.DATASET: lambda spec, index: DatasetSource(spec.target, spec.kwargs),
}
