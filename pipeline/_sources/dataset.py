"""Any map-style ``torch.utils.data.Dataset``, named as ``package.module:callable``.

The callable (a class or a factory) is called with ``source.kwargs``. An item may be an image
(tensor, PIL image or ``(H, W, C)`` uint8 array), a pair ``(image, target)``, or a dict with an
``image`` key whose other keys are labels. An integer target becomes ``label``; a tensor or
array target becomes an array column named ``target``. Ids are the indices.

The label columns are those of the first readable items (up to 8): a key that first appears
in a later item is left out, with a warning that names it; an item without a key has a null.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from .._targets import import_target
from ..config import DatasetSpec
from ..errors import ConfigError
from ._base import ArraySpec, BadSample, RandomAccessSource, Sample, array_spec, describe_error

log = logging.getLogger(__name__)

_TARGET = DatasetSpec.key("target")
#: How many of the first items type the label columns.
_TYPED_FROM = 8


def _as_label(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.ndim == 0 else value.detach().cpu().numpy()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _to_image(value: Any) -> Any:
    if isinstance(value, (torch.Tensor, np.ndarray, bytes)):
        return value
    if hasattr(value, "convert"):  # a PIL image
        return np.asarray(value.convert("RGB"))
    raise TypeError(f"cannot use {type(value).__name__} as an image; expected a tensor, "
                    "a PIL image, an (H, W, C) uint8 array or encoded bytes")


class DatasetSource(RandomAccessSource):
    """The items of the dataset that ``target(**kwargs)`` returns."""

    def __init__(self, target: str, kwargs: Mapping[str, Any] | None = None):
        factory = import_target(target, _TARGET)
        if not callable(factory):
            raise ConfigError(_TARGET, f"{target!r} is not callable")
        self.target, self.kwargs = target, dict(kwargs or {})
        try:
            self.dataset = factory(**self.kwargs)
            self.count = len(self.dataset)
        except Exception as exc:
            raise ConfigError(_TARGET, f"{target!r}(**{self.kwargs!r}) failed: "
                              f"{describe_error(exc)}") from None
        if not self.count:
            raise ConfigError(_TARGET, f"{target!r}(**{self.kwargs!r}) has no items (its len is 0): nothing to dump")
        self._fields: list[pa.Field] | None = None
        self._arrays: dict[str, ArraySpec] = {}
        self._names: set[str] = set()  # the labels the first items have: scalars and arrays
        self._left_out: set[str] = set()  # later labels, not stored (warned about once each)

    def __len__(self) -> int:
        return self.count

    def identity(self) -> dict:
        name = type(self.dataset).__module__ + "." + type(self.dataset).__qualname__
        kwargs = repr(sorted(self.kwargs.items()))
        return {"kind": "dataset", "target": self.target, "class": name, "length": self.count,
                "kwargs_sha256": hashlib.sha256(kwargs.encode()).hexdigest()}

    def _split(self, item: Any) -> tuple[Any, dict]:
        if isinstance(item, Mapping):
            if "image" not in item:
                raise KeyError(f"a dict item needs an 'image' key, got keys {sorted(item)}")
            return item["image"], {k: _as_label(v) for k, v in item.items() if k != "image"}
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise ValueError(f"a tuple item must be (image, target), got {len(item)} elements")
            target = _as_label(item[1])
            return item[0], ({"target": target} if isinstance(target, np.ndarray) else {"label": target})
        return item, {}

    def label_fields(self) -> list[pa.Field]:
        """The scalar labels' fields, typed from the first readable items (up to a few, so an
        item that cannot be read is left to be recorded as bad, and an integer label in one item
        and a float in another make a float column)."""
        if self._fields is None:
            values: dict[str, list] = {}
            arrays: dict[str, list[np.ndarray]] = {}
            for index in range(min(self.count, _TYPED_FROM)):
                try:
                    _, labels = self._split(self.dataset[index])
                except Exception:  # recorded as a bad sample when its shard reads it
                    continue
                self._names.update(labels)
                for name, value in labels.items():
                    (arrays if isinstance(value, np.ndarray) else values).setdefault(name, []).append(value)
            self._fields = [self._field(name, seen) for name, seen in values.items() if name not in arrays]
            self._arrays = {name: array_spec(seen) for name, seen in arrays.items()}
        return self._fields

    def array_labels(self) -> dict[str, ArraySpec]:
        """The array labels' dtypes and shapes (``None``: the first items' differ), from the
        same first items as :meth:`label_fields`."""
        self.label_fields()
        return self._arrays

    def _known(self, labels: dict) -> dict:
        """``labels`` without the keys the first items lack (their columns do not exist)."""
        if self._fields is None:
            self.label_fields()
        late = labels.keys() - self._names
        for name in late - self._left_out:
            self._left_out.add(name)
            log.warning("the label %r of %r first appears after the first %d items, which make the label "
                        "columns: it is not stored", name, self.target, _TYPED_FROM)
        return {k: v for k, v in labels.items() if k not in late} if late else labels

    def _field(self, name: str, values: list[Any]) -> pa.Field:
        try:
            return pa.field(name, pa.array(values).type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
            kinds = sorted({type(v).__name__ for v in values})
            raise ConfigError(_TARGET, f"the label {name!r} of {self.target!r} holds values of "
                              f"types {', '.join(kinds)} in the first items, which make no one column: "
                              f"{describe_error(exc)}") from None

    def read(self, indices: Sequence[int]) -> list[Sample | BadSample]:
        samples: list[Sample | BadSample] = []
        for index in indices:
            try:
                image, labels = self._split(self.dataset[index])
                samples.append(Sample(index, str(index), _to_image(image), self._known(labels)))
            except Exception as exc:  # a bad item must not end the run
                samples.append(BadSample(index, str(index), describe_error(exc)))
        return samples
