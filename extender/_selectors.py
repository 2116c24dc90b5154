"""Output selectors: a layer id that picks one element of what a layer returns.

Many layers return more than one tensor: attention modules return ``(output, weights)``,
Hugging Face encoders return a ``ModelOutput``. A layer id may end in one or more selectors
in square brackets, each applied to the result of the one before:

* ``[name]`` picks the value under ``name`` of a dict or ``ModelOutput``, or the field
  ``name`` of a named tuple or dataclass;
* ``[i]`` (an integer, negative from the end) picks element ``i`` of a tuple or list, or the
  ``i``-th value of a dict or ``ModelOutput`` in its order (``ModelOutput`` leaves out its
  ``None`` fields, as its own ``to_tuple()`` does).

The part before the first ``[`` is a ``named_modules()`` id (``''``, the whole model, gives
ids such as ``'[last_hidden_state]'``). An id that is itself a module name always names
that module, so no existing id changes its meaning.

>>> split_layer_id('encoder.layer.3[0]')
('encoder.layer.3', (0,))
>>> split_layer_id('[last_hidden_state][-1]')
('', ('last_hidden_state', -1))
>>> split_layer_id('layer3') is None
True
>>> Selection.of('x[0][b]').apply(({'a': 1, 'b': 2}, 3))
2
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["OutputSelectionError", "Selection", "describe_output", "element_ids", "split_layer_id"]

Key = int | str

_WITH_SELECTORS = re.compile(r"^(?P<module>[^\[\]]*)(?P<selectors>(?:\[[^\[\]]+\])+)$")
_SELECTOR = re.compile(r"\[([^\[\]]+)\]")
_INTEGER = re.compile(r"^-?\d+$")

#: ``element_ids`` lists at most this many elements of each container, this many levels deep.
MAX_LISTED, MAX_DEPTH = 8, 3


class OutputSelectionError(LookupError):
    """A selector of a layer id that does not fit the layer's output.

    Raised during the forward, when the layer's output is known. The message names the layer
    id, the selector at fault, what the output holds and the selectors that would be valid.
    """


OutputSelectionError.__module__ = "extender"


def split_layer_id(layer_id: str) -> tuple[str, tuple[Key, ...]] | None:
    """Split ``'module.id[k1][k2]'`` into the module id and its keys; None without selectors."""
    match = _WITH_SELECTORS.match(layer_id)
    if match is None:
        return None
    keys = tuple(int(k) if _INTEGER.match(k) else k for k in _SELECTOR.findall(match["selectors"]))
    return match["module"], keys


def format_keys(keys: tuple[Key, ...]) -> str:
    """The selector text of ``keys``: ``(0, 'b')`` gives ``'[0][b]'``."""
    return "".join(f"[{k}]" for k in keys)


def _fields(value: Any) -> list[str] | None:
    """The field names of a named tuple or dataclass instance, else None."""
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return list(value._fields)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [f.name for f in dataclasses.fields(value)]
    return None


def _positions(count: int) -> list[str]:
    if count > MAX_LISTED:
        return [f"[0] to [{count - 1}]"]
    return [f"[{i}]" for i in range(count)]


def _valid_keys(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        return [f"[{k}]" for k in value.keys()] + _positions(len(value))
    names = [f"[{n}]" for n in _fields(value) or []]
    if isinstance(value, (tuple, list)):
        names += _positions(len(value))
    return names


def _pick(value: Any, key: Key) -> Any:
    """One step of a selection; raises ``LookupError`` or ``TypeError`` when it does not fit."""
    if isinstance(value, Mapping):
        for candidate in (key, str(key)):
            if candidate in value:
                return value[candidate]
        if isinstance(key, int):
            return list(value.values())[key]
        raise KeyError(key)
    if isinstance(key, int) and isinstance(value, (tuple, list)):
        return value[key]
    if isinstance(key, str) and key in (_fields(value) or []):
        return getattr(value, key)
    raise TypeError(key)


@dataclasses.dataclass(frozen=True)
class Selection:
    """What a layer id asks of its layer: the module's id and the keys to apply to its output.

    >>> Selection.of('encoder.layer.3[0]')
    Selection(layer_id='encoder.layer.3[0]', module_id='encoder.layer.3', keys=(0,))
    """

    layer_id: str
    module_id: str
    keys: tuple[Key, ...] = ()

    @classmethod
    def of(cls, layer_id: str) -> Selection:
        """The selection a layer id spells (no keys for an id without selectors)."""
        split = split_layer_id(layer_id)
        return cls(layer_id, *split) if split else cls(layer_id, layer_id)

    def apply(self, output: Any) -> Any:
        """Apply the keys to a layer's ``output``, one after the other.

        Raises:
            OutputSelectionError: When a key does not fit (no such key or position, or an
                output that is not a container); the message lists the valid selectors.
        """
        value = output
        for depth, key in enumerate(self.keys):
            try:
                value = _pick(value, key)
            except (LookupError, TypeError):
                valid = _valid_keys(value)
                if valid:
                    hint = f"valid: {', '.join(valid)}"
                else:
                    hint = (f"a {type(value).__name__} has no elements to select; use "
                            f"{self.module_id + format_keys(self.keys[:depth])!r} itself")
                raise OutputSelectionError(
                    f"Layer id {self.layer_id!r}: the output of {self.module_id!r}"
                    f"{format_keys(self.keys[:depth])} is {describe_output(value)}, which has no "
                    f"element [{key}]; {hint}"
                ) from None
        return value


def describe_output(value: Any, depth: int = 0) -> str:
    """A short readable description of a layer output: shapes for tensors, else types.

    >>> describe_output((torch.zeros(1, 2), None, {'a': torch.zeros(3)}))
    "tuple[(1, 2), None, dict{'a': (3,)}]"
    """
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    if value is None:
        return "None"
    if depth >= 3 and isinstance(value, (tuple, list, Mapping)):
        return f"{type(value).__name__}[...]"
    if isinstance(value, (tuple, list)):
        items = [describe_output(v, depth + 1) for v in value[:4]]
        if len(value) > 4:
            items.append(f"... ({len(value) - 4} more)")
        return f"{type(value).__name__}[{', '.join(items)}]"
    if isinstance(value, Mapping):
        keys = list(value.keys())
        items = [f"{k!r}: {describe_output(value[k], depth + 1)}" for k in keys[:4]]
        if len(keys) > 4:
            items.append(f"... ({len(keys) - 4} more)")
        return f"{type(value).__name__}{{{', '.join(items)}}}"
    return type(value).__name__


def element_ids(output: Any, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """The selectors of the tensors inside a non-tensor ``output``, with each tensor.

    Looks into tuples, lists, dicts and ``ModelOutput`` s (by key), named tuples (by position)
    and dataclasses (by field), at most :data:`MAX_LISTED` elements each and :data:`MAX_DEPTH`
    levels deep.

    >>> [(s, tuple(t.shape)) for s, t in element_ids((torch.zeros(2), {'a': torch.zeros(3)}))]
    [('[0]', (2,)), ('[1][a]', (3,))]
    """
    if depth >= MAX_DEPTH:
        return
    if isinstance(output, Mapping):
        items = [(k, v) for k, v in output.items()]
    elif isinstance(output, (tuple, list)):
        items = list(enumerate(output))
    elif _fields(output) is not None:
        items = [(n, getattr(output, n)) for n in _fields(output)]
    else:
        return
    for key, value in items[:MAX_LISTED]:
        if "[" in str(key) or "]" in str(key):
            continue  # a key no selector can spell
        if isinstance(value, torch.Tensor):
            yield f"[{key}]", value
        else:
            for inner, tensor in element_ids(value, depth + 1):
                yield f"[{key}]{inner}", tensor
