"""A Parquet table (one file or a folder of files) with an encoded-image column.

The other columns (all, or those named in ``columns``) pass through to every output row with
their Arrow types: ids, labels, masks, anything. ``id_column`` gives the sample ids; without it
the id is the row's index. An image column may hold the encoded bytes, or a struct with a
``bytes`` field (as Hugging Face datasets write them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.dataset as ds

from ..errors import ConfigError, close_matches
from ._base import BadSample, Sample

class ParquetSource:
    """The rows of the Parquet data at ``path``."""

    def __init__(self, path: str, image_column: str = "image", id_column: str | None = None,
                 columns: Sequence[str] | None = None):
        try:
            self.dataset = ds.dataset(path, format="parquet")
            self.count = self.dataset.count_rows()
        except (OSError, pa.ArrowInvalid) as exc:
            raise ConfigError("source.path", f"cannot open Parquet data at {path!r}: {exc}") from None
        self.path = path
        schema = self.dataset.schema
        names = schema.names
        for key, name in (("source.image_column", image_column), ("source.id_column", id_column)):
            if name is not None and name not in names:
                raise ConfigError(key, f"no column {name!r} in {path!r}; {close_matches(name, names)}")
        image_type = schema.field(image_column).type
        if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
                or (pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0)):
            raise ConfigError("source.image_column", f"column {image_column!r} has type {image_type}; "
                              "expected binary (encoded image files) or a struct with a 'bytes' field")
        if columns is None:
            columns = [n for n in names if n not in (image_column, id_column)]
        for name in columns:
            if name not in names:
                raise ConfigError("source.columns", f"no column {name!r} in {path!r}; "
                                  f"{close_matches(name, names)}")
        self.image_column, self.id_column = image_column, id_column
        self.columns = list(columns)
        self._fields = [schema.field(n) for n in self.columns]

    def __len__(self) -> int:
        return self.count

    def identity(self) -> dict:
        files = sorted(self.dataset.files)
        schema = self.dataset.schema.remove_metadata().to_string()
        return {"kind": "parquet", "path": self.path, "rows": self.count, "files": len(files),
                "schema_sha256": hashlib.sha256(schema.encode()).hexdigest(),
                "image_column": self.image_column, "id_column": self.id_column,
                "columns": self.columns}

    def label_fields(self) -> list[pa.Field]:
        return list(self._fields)

    def read(self, indices: Sequence[int]) -> list[Sample | BadSample]:
        wanted = [self.image_column] + ([self.id_column] if self.id_column else []) + self.columns
        table = self.dataset.take(pa.array(indices, type=pa.int64()), columns=wanted)
        images = table.column(self.image_column)
        if pa.types.is_struct(images.type):
            images = pa.chunked_array([c.field("bytes") for c in images.chunks], images.type.field("bytes").type)
        images = images.to_pylist()
        ids = table.column(self.id_column).to_pylist() if self.id_column else None
        labels = {name: table.column(name).to_pylist() for name in self.columns}
        samples: list[Sample | BadSample] = []
        for row, index in enumerate(indices):
            sample_id = str(ids[row]) if ids is not None else str(index)
            if images[row] is None:
                samples.append(BadSample(index, sample_id, "the image value is null"))
                continue
            samples.append(Sample(index, sample_id, images[row],
                                  {name: values[row] for name, values in labels.items()}))
        return samples
