"""The sources a dump reads from; :func:`open_source` builds the one a config names."""

from __future__ import annotations

from ..config import SourceKind, SourceSpec
from ._base import BadSample, Deferred, RawImage, Sample, Source, describe_error
from .dataset import DatasetSource
from .folder import FolderSource
from ._index import Index, IndexFile, MemoryIndex, write_index
from .generated import GeneratedSource
from .parquet import ParquetSource
from .webdataset import WebDatasetSource

__all__ = ["BadSample", "DatasetSource", "Deferred", "Index", "IndexFile", "MemoryIndex", "FolderSource", "GeneratedSource", "ParquetSource",
           "RawImage", "Sample", "Source", "WebDatasetSource", "describe_error", "open_source", "write_index"]


def open_source(spec: SourceSpec, index: Index | None = None) -> Source:
    """The source a config's ``source`` section describes.

    Args:
        spec: the ``source`` section.
        index: the index the driver made of the source (the actors' view, frozen for the run);
            ``None`` makes it now (the driver). Sources without one ignore it.
    """
    if spec.kind is SourceKind.GENERATED:
        return GeneratedSource(spec.count, spec.image_size, spec.seed)
    if spec.kind is SourceKind.FOLDER:
        return FolderSource(spec.path, index=index)
    if spec.kind is SourceKind.PARQUET:
        return ParquetSource(spec.path, spec.image_column, spec.id_column, spec.columns, index=index)
    if spec.kind is SourceKind.WEBDATASET:
        return WebDatasetSource(list(spec.path) if isinstance(spec.path, tuple) else spec.path, index=index)
    return DatasetSource(spec.target, spec.kwargs)
