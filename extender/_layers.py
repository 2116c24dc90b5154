"""Layer ids: resolving them, reporting unknown ones, and listing a model's layers.

A *layer id* is the name under which :meth:`torch.nn.Module.named_modules` lists a
sub-module, for example ``'layer1.0.conv1'``; the empty string ``''`` names the
whole model. It may end in selectors that pick one element of the layer's output, such as
``'encoder.layer.3[0]'`` (see :mod:`extender._selectors`). Every class of :mod:`extender`
speaks this one vocabulary.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ._selectors import Selection, describe_output, element_ids, format_keys

logger = logging.getLogger(__name__)

__all__ = ["LayerInfo", "UnknownLayerError", "format_layers", "list_layers"]

_HOW_TO_LIST = "list the valid ids with extender.list_layers(model)"


class UnknownLayerError(KeyError):
    """A layer id that names no sub-module of the model.

    It is a :class:`KeyError`, so code that catches ``KeyError`` keeps working. The
    message names the id and the closest valid ids (or says how to list them).

    Attributes:
        layer_id: The id that was asked for.
        model_name: The class name of the model.
        suggestions: Up to three valid ids that look like it, best first: the same id under
            or without a wrapper's prefix (``'module.0'`` for ``'0'`` in ``DataParallel``),
            then close spellings.

    It survives pickling and :func:`copy.deepcopy` (to travel from a worker process).

    Example:
        >>> import torch
        >>> from extender import UnknownLayerError, ActivationMapGrabber
        >>> model = torch.nn.Sequential()
        >>> model.add_module('conv', torch.nn.Conv2d(3, 4, 1))
        >>> model.add_module('head', torch.nn.Linear(4, 2))
        >>> ActivationMapGrabber(model, ['cnv'])
        Traceback (most recent call last):
        ...
        extender.UnknownLayerError: Unknown layer id 'cnv' in Sequential; did you mean 'conv'? (...)
    """

    def __init__(self, layer_id: str, model_name: str, suggestions: Iterable[str] = ()) -> None:
        self.layer_id = layer_id
        self.model_name = model_name
        self.suggestions = list(suggestions)
        if self.suggestions:
            close = ", ".join(repr(s) for s in self.suggestions)
            message = (
                f"Unknown layer id {layer_id!r} in {model_name}; did you mean {close}? "
                f"({_HOW_TO_LIST})"
            )
        else:
            message = f"Unknown layer id {layer_id!r} in {model_name}; {_HOW_TO_LIST}"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        # rebuilt from its own arguments (the default passes the message alone), notes included
        return type(self), (self.layer_id, self.model_name, self.suggestions), self.__dict__

    def __str__(self) -> str:
        # KeyError quotes its argument; the message reads better without the quotes.
        return str(self.args[0])


# Shown as ``extender.UnknownLayerError`` in tracebacks, its public home.
UnknownLayerError.__module__ = "extender"


def check_layer_id(layer_id: object) -> str:
    """Return ``layer_id`` if it has the type of a layer id, else raise.

    Raises:
        ValueError: If ``layer_id`` is None.
        TypeError: If ``layer_id`` is not a str.
    """
    if layer_id is None:
        raise ValueError(
            "Layer id must be a str naming a sub-module as model.named_modules() does "
            "('' for the whole model), got None"
        )
    if not isinstance(layer_id, str):
        raise TypeError(
            "Layer id must be a str naming a sub-module as model.named_modules() does, "
            f"got {type(layer_id).__name__}: {layer_id!r}"
        )
    return layer_id


def resolve_selections(model: torch.nn.Module, layer_ids: Iterable[object]) -> list[tuple[torch.nn.Module, Selection]]:
    """Look up several layer ids at once, selectors included; raise on the first bad one.

    An id that is a ``named_modules()`` name names that module; otherwise a trailing run of
    ``[key]`` selectors is split off and the rest must be a module name. A module reachable
    under a second attribute name (``self.dec = self.enc``), which ``named_modules()`` lists
    under its first name only, may be named by either, as for
    :meth:`torch.nn.Module.get_submodule`; its hook runs on every call of the module,
    whichever name the model calls it by.

    Returns:
        For each id, in order, the sub-module to hook and the selection to apply to its output.

    Raises:
        ValueError: If an id is None.
        TypeError: If an id is not a str.
        UnknownLayerError: If an id names no sub-module; the suggestions keep its selectors.
    """
    ids = [check_layer_id(i) for i in layer_ids]
    modules = dict(model.named_modules())
    found = []
    for layer_id in ids:
        module = _submodule(model, modules, layer_id)
        selection = Selection(layer_id, layer_id) if module is not None else Selection.of(layer_id)
        if module is None and selection.keys:
            module = _submodule(model, modules, selection.module_id)
        if module is None:
            suffix = format_keys(selection.keys)
            near = _close_ids(selection.module_id, [k for k in modules if k])
            raise UnknownLayerError(layer_id, type(model).__name__, [n + suffix for n in near])
        found.append((module, selection))
    return found


def _submodule(model: torch.nn.Module, modules: dict[str, torch.nn.Module], module_id: str) -> torch.nn.Module | None:
    """The module ``module_id`` names, under its ``named_modules()`` name or another path of
    registered sub-modules to it; None when there is none."""
    if module_id in modules:
        return modules[module_id]
    module: torch.nn.Module | None = model
    for name in module_id.split("."):
        children = module._modules  # (a TorchScript module's is no dict: no .get)
        module = children[name] if name in children else None
        if module is None:
            return None
    return module


def _close_ids(module_id: str, valid: list[str]) -> list[str]:
    """Up to three valid ids like ``module_id``: first the same id under a wrapper's prefix
    (``'module.0'`` for ``'0'``, as ``DataParallel`` names it) or without one, then close spellings.

    >>> _close_ids('0', ['module', 'module.0', 'module.1'])
    ['module.0']
    >>> _close_ids('module.layer3', ['layer3', 'layer3.0'])
    ['layer3']
    """
    same = [v for v in valid if v.endswith("." + module_id) or module_id.endswith("." + v)]
    same.sort(key=lambda v: v.count("."))
    close = difflib.get_close_matches(module_id, valid, n=3)
    return list(dict.fromkeys(same + close))[:3]


def resolve_layers(model: torch.nn.Module, layer_ids: Iterable[object]) -> list[torch.nn.Module]:
    """Look up several layer ids at once; raise on the first bad one.

    Args:
        model: The model whose ``named_modules()`` define the valid ids.
        layer_ids: The ids to look up (with or without output selectors).

    Returns:
        The sub-modules, in the order of ``layer_ids``.

    Raises:
        ValueError: If an id is None.
        TypeError: If an id is not a str.
        UnknownLayerError: If an id names no sub-module.
    """
    return [module for module, _ in resolve_selections(model, layer_ids)]


def resolve_layer(model: torch.nn.Module, layer_id: object) -> torch.nn.Module:
    """Return the sub-module of ``model`` that ``layer_id`` names (see :func:`resolve_layers`)."""
    return resolve_layers(model, [layer_id])[0]


@dataclass(frozen=True)
class LayerInfo:
    """One layer of a model, as :func:`list_layers` reports it.

    Attributes:
        id: The layer id (``''`` is the whole model).
        type_name: The class name of the sub-module, e.g. ``'Conv2d'``.
        output_shape: The shape of the layer's output (batch dimension included) when it is
            a single tensor; None for other outputs or when no example input was given.
        output_summary: A readable description of the output of any type, e.g.
            ``'(1, 8, 4, 4)'`` for a tensor or ``"tuple[(1, 3), (1, 5)]"``; None when no
            example input was given or the layer did not run.
        calls: How often the layer ran in the example forward (0: not at all, more than 1:
            a module reused within one forward); None when no example input was given.
    """

    id: str
    type_name: str
    output_shape: tuple[int, ...] | None = None
    output_summary: str | None = None
    calls: int | None = None

    @property
    def shown_id(self) -> str:
        """The id as printed: ``''`` for the whole model, else the id itself."""
        return self.id if self.id else "''"

    @property
    def note(self) -> str:
        """A short remark on how often the layer ran, or ``''`` when there is nothing to say."""
        if self.calls == 0:
            return "(not called)"
        if self.calls is not None and self.calls > 1:
            return f"(called {self.calls} times; last call shown)"
        return ""

    def __str__(self) -> str:
        parts = [self.shown_id, self.type_name, self.output_summary or "", self.note]
        return "  ".join(p for p in parts if p)


def _call_model(model: torch.nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def list_layers(model: torch.nn.Module, example_input: Any = None) -> list[LayerInfo]:
    """List the layer ids of ``model``, optionally with the shape of each layer's output.

    The ids come in ``named_modules()`` order; the first entry is always ``''``, the whole
    model. With an ``example_input`` the model runs once under :func:`torch.no_grad`
    with temporary hooks on every sub-module (removed afterwards, even on errors), each placed
    before the module's other hooks, so that a wrapper (a stump) that ends the forward at a
    layer does not hide that layer's call. For that
    forward every sub-module is put in eval mode and each one's own mode is restored
    afterwards, so batch-norm statistics are not touched and detection models return
    detections rather than asking for targets. A layer whose output is a tuple, list, dict
    or ``ModelOutput`` is followed by one entry per tensor inside it, with the id that
    selects it (``'encoder[last_hidden_state]'``, ``'attn[0]'``; type ``Tensor``). A
    scripted sub-module (``torch.jit.script``) takes no hooks: it and the modules inside it are
    listed without an output or a count.

    Args:
        model: The model to inspect.
        example_input: An input for the model; a tuple is unpacked into several positional
            arguments (wrap a tuple that is itself the single input in another tuple).

    Returns:
        One :class:`LayerInfo` per layer. Print them with :func:`format_layers`.

    Example:
        >>> import torch
        >>> from extender import list_layers, format_layers
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
        >>> [info.id for info in list_layers(model)]
        ['', '0', '1']
        >>> print(format_layers(list_layers(model, torch.rand(2, 3, 6, 6))))
        layer id  type        output        calls
        ''        Sequential  (2, 8, 4, 4)  1
        0         Conv2d      (2, 8, 4, 4)  1
        1         ReLU        (2, 8, 4, 4)  1
    """
    named = list(model.named_modules())
    if example_input is None:
        return [LayerInfo(name, type(module).__name__) for name, module in named]

    # Describe each output as soon as it appears, so no activation is kept alive.
    seen: dict[str, tuple[tuple[int, ...] | None, str, list[tuple[str, tuple[int, ...]]]]] = {}
    calls: dict[str, int] = {name: 0 for name, _ in named}

    def make_hook(name: str):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            calls[name] += 1
            if isinstance(output, torch.Tensor):
                seen[name] = (tuple(output.shape), describe_output(output), [])
            else:
                elements = [(keys, tuple(t.shape)) for keys, t in element_ids(output)]
                seen[name] = (None, describe_output(output), elements)

        return hook

    modes = [(module, module.training) for _, module in named]
    handles, unhooked = [], set()
    try:
        for name, module in named:
            try:
                # first of the module's hooks: a wrapper's hook that ends the forward there
                # (a stump's) would otherwise keep it from counting a call that happened
                handles.append(module.register_forward_hook(make_hook(name), prepend=True))
            except RuntimeError:  # a TorchScript module takes no hooks: listed without an output
                if not isinstance(module, torch.jit.ScriptModule):
                    raise
                unhooked.add(name)
        for module, _ in modes:
            module.training = False
        with torch.no_grad():
            _call_model(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training

    infos = []
    for name, module in named:
        shape, summary, elements = seen.get(name, (None, None, []))
        infos.append(LayerInfo(name, type(module).__name__, shape, summary, None if name in unhooked else calls[name]))
        for keys, element_shape in elements:
            infos.append(LayerInfo(name + keys, "Tensor", element_shape, str(element_shape), calls[name]))
    logger.debug("listed %d layers of %s", len(infos), type(model).__name__)
    return infos


def _align(rows: list[list[str]]) -> Iterator[str]:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        yield "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()


def format_layers(layers: Iterable[LayerInfo]) -> str:
    """Format :func:`list_layers` results as an aligned table, one line per layer.

    The columns are the layer id (``''`` for the whole model) and the module type; when the
    layers carry example outputs, also the output (shape or description) and how often the
    layer ran in the example forward (0: not at all).

    Example:
        >>> import torch
        >>> from extender import list_layers, format_layers
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3))
        >>> print(format_layers(list_layers(model)))
        layer id  type
        ''        Sequential
        0         Linear
    """
    layers = list(layers)
    with_outputs = any(info.calls is not None for info in layers)
    header = ["layer id", "type"] + (["output", "calls"] if with_outputs else [])
    rows = [header]
    for info in layers:
        row = [info.shown_id, info.type_name]
        if with_outputs:
            row += [info.output_summary or "-", "-" if info.calls is None else str(info.calls)]
        rows.append(row)
    return "\n".join(_align(rows))
