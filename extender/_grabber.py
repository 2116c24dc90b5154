"""ActivationMapGrabber: the model's output plus the outputs of chosen layers."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

import torch

from ._hooks import HooksHandle, _ForwardState
from ._layers import resolve_layers

__all__ = ["ActivationMapGrabber"]


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], value: Any) -> Any:
    """Apply ``fn`` to every tensor in ``value``, looking into tuples, lists, dicts and
    dataclasses.

    Containers are rebuilt with their own type (named tuples, ``OrderedDict``, ``defaultdict``,
    sub-classes of list and dict, and dataclass instances included); anything else is returned
    as it is.

    >>> import collections
    >>> out = map_tensors(torch.Tensor.clone, collections.defaultdict(list, a=torch.zeros(1)))
    >>> type(out).__name__, out.default_factory, out['a']
    ('defaultdict', <class 'list'>, tensor([0.]))
    """
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        items = [map_tensors(fn, v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, list):
        items = [map_tensors(fn, v) for v in value]
        if type(value) is list:
            return items
        mapped = copy.copy(value)  # a subclass: its own attributes kept
        mapped[:] = items
        return mapped
    if isinstance(value, Mapping):
        mapped = {k: map_tensors(fn, v) for k, v in value.items()}
        try:
            return type(value)(mapped)
        except TypeError:  # (a defaultdict, whose first argument is its default factory)
            if not isinstance(value, MutableMapping):
                return mapped
        rebuilt = copy.copy(value)
        rebuilt.update(mapped)
        return rebuilt
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # a copy whose fields are set as they are (frozen or not): no __init__ or __post_init__ runs again
        mapped = copy.copy(value)
        for field in dataclasses.fields(value):
            if hasattr(value, field.name):
                object.__setattr__(mapped, field.name, map_tensors(fn, getattr(value, field.name)))
        return mapped
    return value


class ActivationMapGrabber(HooksHandle):
    """Wrap a model so that it also returns the outputs of some of its layers.

    Calling the wrapper returns a tuple ``(model_output, layer_outputs)``, where
    ``layer_outputs`` is a fresh dict ``{layer_id: output}`` holding exactly the registered
    layers that ran during this call, in registration order. Outputs may be tensors or any
    tuple, list or dict the layer returns.

    Args:
        model: The model to wrap; it becomes the child ``wrapped_model``.
        module_ids: Layer ids as :meth:`torch.nn.Module.named_modules` spells them (``''`` is
            the whole model), registered in this order; see :func:`extender.list_layers`.
        stop_early: End the model's forward as soon as every registered layer has run once;
            the rest of the model is not computed and ``model_output`` is then always None.
            With no layer registered the model is not called at all.
        detach: Return the layer outputs detached from the autograd graph
            (:meth:`torch.Tensor.detach`, which shares memory with the model's tensor).
            By default they keep their graph, so a loss on them backpropagates into the model.
        clone: Return copies (:meth:`torch.Tensor.clone`) of the layer outputs. Needed only
            for a layer whose output the model later changes in place, such as a batch norm
            followed by ``ReLU(inplace=True)`` or ``out += identity`` in torchvision ResNets;
            without it such a layer's stored output shows the changed values.
        all_calls: For every registered layer return a list with the output of each call
            instead of only the last call's output (see below).

    A module called several times in one forward, such as the single ``relu`` of a
    torchvision ResNet ``BasicBlock``, by default gives the output of its LAST call. With
    ``all_calls=True`` every registered layer gives a list of its outputs, one per call, in
    call order (a list of one for layers run once). With ``stop_early=True`` the forward ends
    once every registered layer has run at least once, so later calls never happen.

    The options are attributes and may be changed after construction.

    Example:
        >>> import torch
        >>> from extender import ActivationMapGrabber
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> grabber = ActivationMapGrabber(model, ['1', '0'])
        >>> out, maps = grabber(torch.rand(5, 4))
        >>> out.shape, list(maps), maps['0'].shape
        (torch.Size([5, 2]), ['1', '0'], torch.Size([5, 8]))
        >>> grabber.stop_early = True  # the last Linear is no longer computed
        >>> grabber(torch.rand(5, 4))[0] is None
        True
        >>> grabber.remove()
    """

    def __init__(
        self,
        model: torch.nn.Module,
        module_ids: Iterable[str] = (),
        *,
        stop_early: bool = False,
        detach: bool = False,
        clone: bool = False,
        all_calls: bool = False,
    ) -> None:
        super().__init__(model)
        if isinstance(module_ids, str):
            raise TypeError(
                f"module_ids must be a list of layer ids, not a single str; "
                f"use [{module_ids!r}]"
            )
        if not isinstance(module_ids, Iterable):
            raise TypeError(f"module_ids must be a list of layer ids, got {module_ids!r}")
        module_ids = list(module_ids)
        # Check every id before the first hook is placed.
        resolve_layers(model, module_ids)
        self.stop_early = bool(stop_early)
        self.detach = bool(detach)
        self.clone = bool(clone)
        self.all_calls = bool(all_calls)
        self._register_all(module_ids)

    def extra_repr(self) -> str:
        return (
            f"registered_submodules={self.registered_submodules}, stop_early={self.stop_early}, "
            f"detach={self.detach}, clone={self.clone}, all_calls={self.all_calls}"
        )

    def register_submodule(self, module_id: str) -> None:
        """Register the layer ``module_id``; it goes last in the output dict.

        Registering a layer that is already registered changes nothing.

        Raises:
            UnknownLayerError: If the model has no such layer.
            ValueError: If ``module_id`` is None.
            TypeError: If ``module_id`` is not a str.
        """
        self._register_layer(module_id)

    def unregister_submodule(self, module_id: str) -> None:
        """Unregister the layer ``module_id`` and take its hook off the model.

        Raises:
            KeyError: If the layer is not registered.
        """
        self._unregister_layer(module_id)

    def _stops_early(self) -> bool:
        return self.stop_early

    def _record(self, state: _ForwardState, layer_id: str, output: Any) -> None:
        if self.detach:
            output = map_tensors(torch.Tensor.detach, output)
        if self.clone:
            output = map_tensors(torch.Tensor.clone, output)
        if self.all_calls:
            state.records.setdefault(layer_id, []).append(output)
        else:
            state.records[layer_id] = output

    def _finish(self, model_output: Any, state: _ForwardState) -> tuple[Any, dict[str, Any]]:
        records = state.records
        return model_output, {i: records[i] for i in state.layer_ids if i in records}
