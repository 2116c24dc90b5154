"""Pass-through label values against the types of their columns.

A source types its scalar label columns once (a Parquet table from its schema, a WebDataset
from its first ``.json``, a user dataset from its first readable items). A later value of
another type would fail its whole batch when the column is built, and so its shard; here it
makes only its own sample bad, with a reason that names the field, the value's type and the
column's. A value fits when it is of the column's kind and converts to the column's type
without loss: no bool in a number column, no float in an integer column, no number in a text
column; ``None`` fits every column (a null). An array label fits its column when its dtype
converts to the column's without loss and, where the column has one shape, it has that shape.

>>> label_problem("label", "cat", pa.int64())
"label 'label' holds 'cat' (type str); its column holds int64"
>>> label_problem("score", 3, pa.float64()) is None, label_problem("score", None, pa.int64()) is None
(True, True)
>>> label_problem("label", 2.5, pa.int64())
"label 'label' holds 2.5 (type float); its column holds int64"
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from ._records import BadSample
from ._sources._base import ArraySpec, Sample


def _is_text(column: pa.DataType) -> bool:
    return pa.types.is_string(column) or pa.types.is_large_string(column)


def _is_bytes(column: pa.DataType) -> bool:
    return pa.types.is_binary(column) or pa.types.is_large_binary(column) or pa.types.is_fixed_size_binary(column)


#: The Python values each kind of column takes (other types: whatever converts).
_KINDS: tuple[tuple[Any, tuple[type, ...]], ...] = (
    (pa.types.is_boolean, (bool,)),
    (pa.types.is_integer, (numbers.Integral,)),
    (pa.types.is_floating, (numbers.Real,)),
    (_is_text, (str,)),
    (_is_bytes, (bytes,)),
)


def _of_kind(value: Any, column: pa.DataType) -> bool:
    if value is None:
        return True
    for is_kind, kinds in _KINDS:
        if is_kind(column):  # a bool is an Integral to Python, not to a number column
            return isinstance(value, kinds) and (isinstance(value, bool) == pa.types.is_boolean(column))
    return True  # dates, decimals...: the conversion decides


#: What pyarrow refuses a value with: a conversion that fails.
_REFUSALS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError, OverflowError)


def _is_nested(column: pa.DataType) -> bool:
    return pa.types.is_nested(column) and not pa.types.is_union(column)


def _nested_problem(value: Any, column: pa.DataType) -> str | None:
    """What of a list, struct or map ``value`` the ``column`` would not hold as it is
    (``None``: it holds all of it; where pyarrow refuses it, pyarrow's reason). Inside those, pyarrow
    converts a 2.5 in an integer field to 2 and drops a key the struct lacks, without a word:
    the value converted is compared with the value given (a whole float and its integer, NaN
    and NaN, a missing key and a null are the same).

    >>> box = pa.struct([("x", pa.int64()), ("y", pa.int64())])
    >>> _nested_problem({"x": 8.75, "y": 1}, box)
    "['x'] holds 8.75 (type float), which the column would hold as 8"
    >>> _nested_problem({"x": 1, "w": 3.0}, box)
    "it has the key 'w', which the column's struct lacks"
    >>> _nested_problem([[1, 2.0], [float("nan")]], pa.list_(pa.list_(pa.float32()))) is None
    True
    """
    try:
        converted = pa.array([value], type=column).to_pylist()[0]
    except _REFUSALS as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None if _same(value, converted) else _difference(value, converted, "")


def _difference(given: Any, held: Any, at: str) -> str | None:
    """Where the value ``held`` (pyarrow's of ``given``) differs from ``given``, at its part ``at``."""
    if isinstance(given, Mapping):
        try:
            pairs = dict(held) if isinstance(held, list) else held  # (a map's (key, value) pairs)
        except (TypeError, ValueError):
            pairs = held
        if isinstance(pairs, Mapping):
            for key, item in given.items():
                name = key.decode("utf-8", "replace") if isinstance(key, bytes) else key  # (as pyarrow names it)
                if name not in pairs:
                    return f"{at or 'it'} has the key {key!r}, which the column's struct lacks"
                if (found := _difference(item, pairs[name], f"{at}[{key!r}]")) is not None:
                    return found
            return None
    elif isinstance(given, (list, tuple)) or (isinstance(given, np.ndarray) and given.ndim):
        items = given.tolist() if isinstance(given, np.ndarray) else given
        parts = list(held.values()) if isinstance(held, Mapping) else held  # (a tuple given for a struct)
        if isinstance(parts, (list, tuple)) and len(parts) == len(items):
            if _same_numbers(items, parts):
                return None
            for i, (item, part) in enumerate(zip(items, parts)):
                if (found := _difference(item, part, f"{at}[{i}]")) is not None:
                    return found
            return None
    elif _same(given, held):
        return None
    return (f"{at or 'it'} holds {_shown(given)} (type {type(given).__name__}), which the column would hold as "
            f"{_shown(held)}")


def _same_numbers(given: Sequence[Any], held: Sequence[Any]) -> bool:
    """Whether a flat list of numbers is held as it is, at once (:func:`_same` on each: floats
    held as floats are; integers and bools equal to the bit); ``False`` where they are not
    all numbers, for a look at each."""
    try:
        given_array, held_array = np.asarray(given), np.asarray(held)
    except (TypeError, ValueError):
        return False
    if given_array.dtype.kind not in "biuf" or held_array.dtype.kind not in "biuf" or given_array.ndim != 1:
        return False
    return held_array.dtype.kind == "f" or bool(np.array_equal(given_array, held_array))


def _same(given: Any, held: Any) -> bool:
    if isinstance(held, float) and isinstance(given, (float, np.floating)):  # (NaN; a column of less precision)
        return True
    try:
        return bool(given == held)
    except (TypeError, ValueError):
        return False


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


#: The builtin types whose values fit each kind of column without a closer look: a batch's values
#: are checked by type first (a few ns each), and one by one only when some are of other types.
_PLAIN: tuple[tuple[Any, frozenset[type]], ...] = (
    (pa.types.is_boolean, frozenset({bool})),
    (pa.types.is_integer, frozenset({int})),
    (pa.types.is_floating, frozenset({int, float})),
    (_is_text, frozenset({str})),
    (_is_bytes, frozenset({bytes})),
)


def _all_of_kind(values: Sequence[Any], column: pa.DataType) -> bool:
    for is_kind, plain in _PLAIN:
        if is_kind(column):
            if all(value is None or type(value) in plain for value in values):
                return True
            break
    return all(_of_kind(value, column) for value in values)


def _all_fit(values: Sequence[Any], column: pa.DataType) -> bool:
    """Whether every one of ``values`` fits ``column``, judged at once: one conversion, and for
    lists, structs and maps the values it gives compared with these (:func:`_nested_problem`;
    a Parquet column's come back the same). ``False`` sends each value to
    :func:`label_problem`, which judges it alone the same way (a NaN, a missing key or a
    tuple for a struct is no difference there)."""
    if _is_nested(column):
        try:
            return pa.array(values, type=column).to_pylist() == values
        except _REFUSALS:  # (arrays compared too)
            return False
    return _all_of_kind(values, column) and _converts(values, column)


def _converts(values: Sequence[Any], column: pa.DataType) -> bool:
    try:
        pa.array(values, type=column)
    except _REFUSALS:
        return False
    return True


def label_problem(name: str, value: Any, column: pa.DataType) -> str | None:
    """Why ``value`` cannot go into the label column ``name`` of type ``column`` (``None``: it fits).

    >>> label_problem("box", {"x": 8.75}, pa.struct([("x", pa.int64())]))
    "label 'box' holds {'x': 8.75} (type dict); its column holds struct<x: int64>: ['x'] holds 8.75 (type float), which the column would hold as 8"
    """
    if _is_nested(column):
        detail = _nested_problem(value, column)
        if detail is None:
            return None
    elif _of_kind(value, column) and _converts([value], column):
        return None
    else:
        detail = ""
    return (f"label {name!r} holds {_shown(value)} (type {type(value).__name__}); its column holds {column}"
            + (f": {detail}" if detail else ""))


def array_problem(name: str, value: Any, spec: ArraySpec) -> str | None:
    """Why ``value`` cannot go into the array label column ``name`` (``None``: it fits): an
    array whose dtype converts to the column's without loss, of its shape where it has one.

    >>> spec = ArraySpec(np.dtype("float32"), (2,))
    >>> array_problem("target", np.zeros(2, np.int16), spec) is None
    True
    >>> array_problem("target", np.zeros(2, np.float64), spec)
    "label 'target' holds an array of float64; its column holds float32 (the first items')"
    >>> array_problem("target", np.zeros((3, 2), np.float32), spec)
    "label 'target' holds an array of shape (3, 2); its column holds shape (2,) (the first items')"
    """
    if not isinstance(value, np.ndarray):
        held = "nothing" if value is None else f"{value!r:.40} (type {type(value).__name__})"
        return f"label {name!r} holds {held}; its column holds arrays of {spec.dtype}"
    if not np.can_cast(value.dtype, spec.dtype, "safe"):
        return f"label {name!r} holds an array of {value.dtype}; its column holds {spec.dtype} (the first items')"
    if spec.shape is not None and value.shape != spec.shape:
        return (f"label {name!r} holds an array of shape {value.shape}; its column holds shape {spec.shape} "
                "(the first items')")
    return None


def split_unfit(samples: Sequence[Sample], fields: Sequence[pa.Field],
                arrays: Mapping[str, ArraySpec] | None = None) -> tuple[list[Sample], list[BadSample]]:
    """``samples`` whose labels all fit the columns ``fields`` and the array columns ``arrays``,
    and the others as bad samples (the reason names the first label that does not fit). One
    conversion per column checks a batch whose values all fit; a label every sample's source
    took from a column of its field's type (:attr:`Sample.exact`) is not checked."""
    problems: dict[int, str] = {}
    for name, spec in (arrays or {}).items():
        for position, sample in enumerate(samples):
            if position not in problems and (problem := array_problem(name, sample.labels.get(name), spec)):
                problems[position] = problem
    for field in fields:
        if all(field.name in s.exact for s in samples):
            continue  # (taken from a column of this type)
        values = [s.labels.get(field.name) for s in samples]
        if _all_fit(values, field.type):
            continue
        for position, value in enumerate(values):
            if position not in problems:
                problem = label_problem(field.name, value, field.type)
                if problem is not None:
                    problems[position] = problem
    good = [s for i, s in enumerate(samples) if i not in problems]
    bad = [BadSample(samples[i].index, samples[i].sample_id, reason) for i, reason in sorted(problems.items())]
    return good, bad
