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
    return _nested_problem(value, column) is None  # lists, structs; dates, decimals...: the conversion decides


def _is_list(column: pa.DataType) -> bool:
    return pa.types.is_list(column) or pa.types.is_large_list(column) or pa.types.is_fixed_size_list(column)


def _nested_problem(value: Any, column: pa.DataType, at: str = "") -> str | None:
    """What in a list or struct ``value`` does not fit the ``column`` without loss (``None``:
    all of it fits, or it is no list or struct: the conversion judges it): pyarrow converts a
    2.5 inside them to an integer field as 2, and drops a key the struct lacks, without a word.

    >>> _nested_problem({"x": 8.75, "y": 1}, pa.struct([("x", pa.int64()), ("y", pa.int64())]))
    "['x'] holds 8.75 (type float), not int64"
    >>> _nested_problem({"x": 1, "w": 3.0}, pa.struct([("x", pa.int64())]))
    "it has the key 'w', which the column's struct lacks"
    >>> _nested_problem([[1, 2], [3]], pa.list_(pa.list_(pa.int64()))) is None
    True
    """
    if value is None:
        return None
    if pa.types.is_struct(column) and isinstance(value, Mapping):
        names = [column.field(i).name for i in range(column.num_fields)]
        extra = next((key for key in value if key not in names), None)
        if extra is not None:
            return f"{at or 'it'} has the key {extra!r}, which the column's struct lacks"
        parts = [(value.get(name), column.field(i).type, f"{at}[{name!r}]") for i, name in enumerate(names)]
    elif _is_list(column) and isinstance(value, (list, tuple, np.ndarray)):
        items = value.tolist() if isinstance(value, np.ndarray) else value
        parts = [(item, column.value_type, f"{at}[{i}]") for i, item in enumerate(items)]
    else:
        return None
    for item, kind, where in parts:
        if not _of_kind(item, kind) and not (pa.types.is_struct(kind) or _is_list(kind)):
            return f"{where} holds {_shown(item)} (type {type(item).__name__}), not {kind}"
        if (problem := _nested_problem(item, kind, where)) is not None:
            return problem
    return None


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
    """Whether every one of ``values`` fits ``column``, judged at once: one conversion, and
    for lists and structs the values it gives compared with these (the parts of those convert
    with loss, see :func:`_nested_problem`; a Parquet column's values come back the same).
    ``False`` sends each value to :func:`label_problem`, which is exact."""
    if pa.types.is_struct(column) or _is_list(column):
        try:
            return pa.array(values, type=column).to_pylist() == values
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):  # (an array compared)
            return False
    return _all_of_kind(values, column) and _converts(values, column)


def _converts(values: Sequence[Any], column: pa.DataType) -> bool:
    try:
        pa.array(values, type=column)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        return False
    return True


def label_problem(name: str, value: Any, column: pa.DataType) -> str | None:
    """Why ``value`` cannot go into the label column ``name`` of type ``column`` (``None``: it fits).

    >>> label_problem("box", {"x": 8.75}, pa.struct([("x", pa.int64())]))
    "label 'box' holds {'x': 8.75} (type dict); its column holds struct<x: int64>: ['x'] holds 8.75 (type float), not int64"
    """
    if _of_kind(value, column) and _converts([value], column):
        return None
    detail = _nested_problem(value, column)
    return (f"label {name!r} holds {_shown(value)} (type {type(value).__name__}); its column holds {column}"
            + ("" if detail is None else f": {detail}"))


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
    conversion per column checks a batch whose values all fit."""
    problems: dict[int, str] = {}
    for name, spec in (arrays or {}).items():
        for position, sample in enumerate(samples):
            if position not in problems and (problem := array_problem(name, sample.labels.get(name), spec)):
                problems[position] = problem
    for field in fields:
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
