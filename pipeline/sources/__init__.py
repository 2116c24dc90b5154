"""The sources a dump reads from; :func:`open_source` builds the one a config names."""

from __future__ import annotations

from ..config import SourceKind, SourceSpec
from ._base import BadSample, RawImage, Sample, Source, describe_error
from .dataset import DatasetSource
from .folder import FolderSource
from .generated import GeneratedSource
from .parquet import ParquetSource

__all__ = ["BadSample", "DatasetSource", "FolderSource", "GeneratedSource", "ParquetSource",
           "RawImage", "Sample", "Source", "describe_error", "open_source"]


def open_source(spec: SourceSpec) -> Source:
    """The source a config's ``source`` section describes."""
    if spec.kind is SourceKind.GENERATED:
        return GeneratedSource(spec.count, spec.image_size, spec.seed)
    if spec.kind is SourceKind.FOLDER:
        return FolderSource(spec.path)
    if spec.kind is SourceKind.PARQUET:
        return ParquetSource(spec.path, spec.image_column, spec.id_column, spec.columns)
    return DatasetSource(spec.target, spec.kwargs)
