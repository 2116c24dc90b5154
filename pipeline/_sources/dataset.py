"""Any map-style ``torch.utils.data.Dataset``, named as ``package.module:callable``.

The callable (a class or a factory) is called with ``source.kwargs``. An item may be an image
(tensor, PIL image or ``(H, W, C)`` uint8 array), a pair ``(image, target)``, or a dict with an
``image`` key whose other keys are labels. An integer target becomes ``label``; a tensor or
array target becomes an array column named ``target``. Ids are the indices.

The label columns are those of the first readable items (up to 8): a key that first appears
in a later item is left out, with a warning that names it; an item without a key has a null.
A label that is ``None`` (or a list empty) in all of them is typed by the later items that hold
a value (up to 64 more are looked at); a key of a nested dict that first appears in a later
item is left out, with a warning, as a label is. The driver types the columns once and the workers take its
types, so every file of a dump has the same columns.

An item whose ``__getitem__`` raises is a bad sample that says why, unless the error may pass
(a dropped connection, a timeout, memory running out): that fails the shard, which is retried.
"""

from __future__ import annotations

import base64
import functools
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
#: How many of the first readable items type the label columns, and how many items are read
#: at most to find them (a dataset whose first items fail is typed from later ones).
_TYPED_FROM = 8
_TRIED_AT_MOST = 64
#: Items read further to type a label that is ``None`` in all of the first readable ones.
_LOOKED_FURTHER = 64


#: Words in the names of HTTP clients' errors (requests', urllib3's, http.client's) that may pass.
_PASSING_NAMES = ("Connection", "Timeout", "IncompleteRead", "ChunkedEncoding")


def _may_pass(exc: BaseException, seen: frozenset[int] = frozenset()) -> bool:
    """Whether an error of ``__getitem__`` may pass (it fails the shard, which is retried, not
    the sample): a dropped connection, a timeout or a body cut short, as Python's own errors or
    an HTTP client's (by their names), also where one wraps it (its ``raise ... from`` cause,
    its ``reason``, its arguments: urllib3's ``ProtocolError('Connection aborted.', RemoteDisconnected(...))``); an
    HTTP error of the server's (5xx, 429); memory running out. A missing file, an HTTP 404 or a
    broken image (PIL's ``OSError`` s) is the item's.

    >>> [_may_pass(e) for e in (ConnectionResetError(), TimeoutError(), MemoryError(), OSError("image file is truncated"))]
    [True, True, True, False]
    >>> import urllib.error
    >>> _may_pass(urllib.error.URLError(ConnectionRefusedError())), _may_pass(urllib.error.HTTPError("u", 404, "", {}, None))
    (True, False)
    >>> _may_pass(OSError("Connection aborted.", ConnectionResetError())), _may_pass(ValueError("a", "b"))
    (True, False)
    """
    if isinstance(exc, (ConnectionError, TimeoutError, MemoryError)):
        return True
    names = [kind.__name__ for kind in type(exc).__mro__]
    if any(word in name for word in _PASSING_NAMES for name in names):
        return True
    status = getattr(exc, "code", None) or getattr(getattr(exc, "response", None), "status_code", None)
    if any("HTTPError" in name for name in names) and isinstance(status, int):
        return status >= 500 or status == 429
    seen = seen | {id(exc)}
    inner = [exc.__cause__, getattr(exc, "reason", None), *exc.args]  # (not the context: an error met while handling one)
    return any(isinstance(e, BaseException) and id(e) not in seen and _may_pass(e, seen) for e in inner)


def _as_label(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.ndim == 0 else value.detach().cpu().numpy()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _to_image(value: Any) -> Any:
    if isinstance(value, (torch.Tensor, np.ndarray, bytes)):
        return value
    if hasattr(value, "convert"):  # a PIL image (16-bit and float ones scaled as arrays of their types)
        from .._images import pil_pixels  # (which imports this package)

        return pil_pixels(value)
    raise TypeError(f"cannot use {type(value).__name__} as an image; expected a tensor, "
                    "a PIL image, an (H, W, C) uint8 array or encoded bytes")



def _typed(values: list) -> pa.DataType | None:
    """The type pyarrow gives ``values`` (``None`` where they make no one type: said later)."""
    try:
        return pa.array(values).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        return None


def _untyped(values: list) -> bool:
    """Whether ``values`` leave a part of their column's type open: all ``None``, or lists
    empty in every one (a detection dataset whose first images have no boxes), at any depth.

    >>> _untyped([None, None]), _untyped([[], []]), _untyped([[], [[1.0, 2.0]]]), _untyped([{"a": None}]), _untyped([{}])
    (True, True, False, True, True)
    """
    def has_null(kind: pa.DataType) -> bool:
        return (pa.types.is_null(kind) or (pa.types.is_struct(kind) and not kind.num_fields)
                or any(has_null(kind.field(i).type) for i in range(kind.num_fields)))

    kind = _typed(values)
    return kind is not None and has_null(kind)


def _fills(before: pa.DataType | None, after: pa.DataType | None) -> bool:
    """Whether the type ``after`` is ``before`` with parts of it that were null (or structs
    without fields) typed, and nothing else changed: a later value only types what the first
    items left open.

    >>> box = pa.struct([("x", pa.int64()), ("seg", pa.null())])
    >>> _fills(box, pa.struct([("x", pa.int64()), ("seg", pa.list_(pa.float64()))]))
    True
    >>> _fills(box, pa.struct([("x", pa.float64()), ("seg", pa.null())])), _fills(pa.list_(pa.null()), None)
    (False, False)
    """
    if before is None or after is None:
        return False
    if pa.types.is_null(before) or (pa.types.is_struct(before) and not before.num_fields):
        return True
    if pa.types.is_struct(before) and pa.types.is_struct(after):
        return ([f.name for f in before] == [f.name for f in after]
                and all(_fills(b.type, a.type) for b, a in zip(before, after)))
    if pa.types.is_list(before) and pa.types.is_list(after):
        return _fills(before.value_type, after.value_type)
    return before == after


def _holds_nothing(kind: pa.DataType | None) -> bool:
    """Whether a column of ``kind`` has a struct without fields in it, which Parquet cannot write."""
    return kind is not None and ((pa.types.is_struct(kind) and not kind.num_fields)
                                 or any(_holds_nothing(kind.field(i).type) for i in range(kind.num_fields)))


def _has_struct(kind: pa.DataType) -> bool:
    return pa.types.is_struct(kind) or any(_has_struct(kind.field(i).type) for i in range(kind.num_fields))


def _without_late_keys(value: Any, kind: pa.DataType, found: list[str], at: str) -> Any:
    """``value`` without the keys of its dicts that its column's structs lack (they name them
    in ``found``, as ``at['key']``): a key first seen after the items that typed the column is
    left out, as a label is. Other values are left for the column's check.

    >>> found = []
    >>> _without_late_keys([{"x": 1, "w": 2}], pa.list_(pa.struct([("x", pa.int64())])), found, "box")
    [{'x': 1}]
    >>> found
    ["box[]['w']"]
    """
    if pa.types.is_struct(kind) and isinstance(value, Mapping):
        fields = {kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)}
        names = {key: key.decode("utf-8", "replace") if isinstance(key, bytes) else key for key in value}  # (pyarrow's)
        found.extend(f"{at}[{key!r}]" for key, name in names.items() if name not in fields)
        return {key: _without_late_keys(item, fields[names[key]], found, f"{at}[{key!r}]")
                for key, item in value.items() if names[key] in fields}
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) \
            and isinstance(value, (list, tuple)):
        return [_without_late_keys(item, kind.value_type, found, f"{at}[]") for item in value]
    return value

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
        and a float in another make a float column); a label ``None`` in all of them from the
        first later item that holds one. Where the driver typed them (:meth:`use_label_types`),
        its types."""
        if self._fields is None:
            values: dict[str, list] = {}
            arrays: dict[str, list[np.ndarray]] = {}
            readable = 0
            for index in range(min(self.count, _TRIED_AT_MOST)):
                labels = self._labels_of(index)
                if labels is None:  # recorded as a bad sample when its shard reads it
                    continue
                self._names.update(labels)
                for name, value in labels.items():
                    (arrays if isinstance(value, np.ndarray) else values).setdefault(name, []).append(value)
                readable += 1
                if readable == _TYPED_FROM:
                    break
            unset = [name for name, seen in values.items() if name not in arrays and _untyped(seen)]
            for index in range(index + 1, min(self.count, index + 1 + _LOOKED_FURTHER)) if unset else ():
                labels = self._labels_of(index) or {}
                for name in [n for n in unset if labels.get(n) is not None]:
                    value = labels[name]  # (an array makes an array column, as in the first items)
                    if isinstance(value, np.ndarray):
                        arrays.setdefault(name, []).append(value)
                    elif _fills(_typed(values[name]), _typed(values[name] + [value])):
                        values[name].append(value)  # (others are left to be judged as bad samples)
                    if name in arrays or not _untyped(values[name]):
                        unset.remove(name)
                if not unset:
                    break
            for name in unset:
                kind = _typed(values[name])
                if _holds_nothing(kind):
                    log.warning("the label %r of %r holds empty dicts only in every item looked at (the first %d "
                                "readable ones and up to %d more): a column of %s holds nothing, and it is not stored",
                                name, self.target, _TYPED_FROM, _LOOKED_FURTHER, kind)
                    del values[name]
                else:
                    log.warning("the label %r of %r is None, or None or empty in a part, in every item looked at (the "
                                "first %d readable ones and up to %d more): its column holds %s, and an item that "
                                "gives it a value there is a bad sample", name, self.target, _TYPED_FROM,
                                _LOOKED_FURTHER, kind)
            self._fields = [self._field(name, seen) for name, seen in values.items() if name not in arrays]
            self._arrays = {name: array_spec(seen) for name, seen in arrays.items()}
        return self._fields

    def _labels_of(self, index: int) -> dict | None:
        """The labels of item ``index``, or ``None`` where it cannot be read; an error that may
        pass is raised (labels typed without the items a network blip hid would be kept)."""
        try:
            return self._split(self.dataset[index])[1]
        except Exception as exc:
            if _may_pass(exc):
                raise
            return None

    def label_types(self) -> dict:
        """How :meth:`label_fields` typed the labels, as plain data for :meth:`use_label_types`
        (typed once, by the driver: a worker typing them again from items that fail now and
        then, or that changed, would write files of other columns)."""
        fields = self.label_fields()
        return {"fields": base64.b64encode(pa.schema(fields).serialize().to_pybytes()).decode(),
                "names": sorted(self._names),
                "arrays": {name: [spec.dtype.str, None if spec.shape is None else list(spec.shape)]
                           for name, spec in self._arrays.items()}}

    def use_label_types(self, types: Mapping[str, Any]) -> None:
        """Type the labels as :meth:`label_types` gave (the driver's), reading no item."""
        self._fields = list(pa.ipc.read_schema(pa.py_buffer(base64.b64decode(types["fields"]))))
        self._names = set(types["names"])
        self.__dict__.pop("_structured", None)
        self._arrays = {name: ArraySpec(np.dtype(dtype), None if shape is None else tuple(shape))
                        for name, (dtype, shape) in types["arrays"].items()}

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
            log.warning("the label %r of %r is in none of the items that made the label columns (the first %d "
                        "readable ones): it is not stored", name, self.target, _TYPED_FROM)
        labels = {k: v for k, v in labels.items() if k not in late} if late else labels
        for field in self._structured:
            if labels.get(field.name) is not None:
                found: list[str] = []
                labels[field.name] = _without_late_keys(labels[field.name], field.type, found, field.name)
                for key in set(found) - self._left_out:
                    self._left_out.add(key)
                    log.warning("the label %s of %r is in none of the items that typed its column (the first %d "
                                "readable ones): it is not stored", key, self.target, _TYPED_FROM)
        return labels

    @functools.cached_property
    def _structured(self) -> list[pa.Field]:
        """The label fields with a struct in their type, whose values' keys are checked."""
        return [field for field in self.label_fields() if _has_struct(field.type)]

    def _field(self, name: str, values: list[Any]) -> pa.Field:
        try:
            return pa.field(name, pa.array(values).type)
        except OverflowError:  # integers over int64's range: unsigned ones (a hash, a uint64 id) fit uint64
            if all(v is None or (isinstance(v, int) and 0 <= v < 2**64) for v in values):
                return pa.field(name, pa.uint64())
            raise ConfigError(_TARGET, f"the label {name!r} of {self.target!r} holds integers beyond 64 bits in "
                              "the first items, which no column holds; give them as text") from None
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
                if _may_pass(exc):
                    raise  # (the shard fails and is retried, its items read again)
                samples.append(BadSample(index, str(index), describe_error(exc)))
        return samples
