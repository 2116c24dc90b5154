"""ModelExtender: extra modules attached to intermediate layers of a model."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ._grabber import map_tensors
from ._hooks import HooksHandle, _ForwardState
from ._layers import resolve_layers

logger = logging.getLogger(__name__)

__all__ = ["ModelExtender"]

Extensions = Mapping[str, Mapping[str, torch.nn.Module]]


def _as_is(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class ModelExtender(HooksHandle):
    """Wrap a model and attach further modules ("extensions") to some of its layers.

    Each extension has a name, unique over all layers, and is applied to the output of the
    layer it is attached to. Calling the wrapper returns ``(model_output, ext_outputs)``
    where ``ext_outputs`` is a fresh dict ``{name: extension(layer_output)}`` for the
    extensions whose layer ran, ordered as :attr:`name_registrations` lists them. Gradients
    flow from the extension outputs into the extensions and into the model.

    The extensions always get a copy of their layer's output (:meth:`torch.Tensor.clone`,
    through which gradients flow as well), with or without gradients: an extension that
    changes its input in place (``ReLU(inplace=True)``) never changes the model's own
    output, and the model, which may change that output in place later (a batch norm
    followed by ``ReLU(inplace=True)`` in torchvision's ResNets), never changes an extension
    output that shares its input's memory (``Flatten``, a slice). The copy costs one memory
    copy of each hooked layer's output per call.

    The extensions run in the grad mode the call began with, whatever the model's forward
    switched to by the time it reached their layer: under a ``torch.no_grad()`` block of the
    model's own (a frozen backbone) they still compute with gradients when the call had them,
    so they get trained; gradients from them stop at that layer, as the model's own do. Under
    :func:`torch.inference_mode` they run without gradients.

    The extensions live in the child ``extension_models`` (a :class:`torch.nn.ModuleDict`),
    so ``parameters()``, ``state_dict()``, ``.to()`` and ``.train()``/``.eval()`` of the
    wrapper cover them along with the model. A layer called several times in one forward
    feeds its extensions on every call; the output of the last call is returned.

    Args:
        model: The model to extend; it becomes the child ``wrapped_model``.
        extensions: ``{layer_id: {name: module}}``: for each layer id (see
            :func:`extender.list_layers`) the modules to attach, by name.
        return_main_output: If False, calling the wrapper returns only the dict of extension
            outputs (the model still runs in full). An attribute, settable later.

    Extension names must be non-empty str without ``'.'`` that do not clash with an
    attribute of :class:`torch.nn.ModuleDict` (such as ``'keys'``).

    Example:
        >>> import torch
        >>> from extender import ModelExtender
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        >>> extended = ModelExtender(model, {'1': {'probe': torch.nn.Linear(4, 2)}})
        >>> out, ext = extended(torch.rand(5, 3))
        >>> out.shape, ext['probe'].shape
        (torch.Size([5, 1]), torch.Size([5, 2]))
        >>> extended.return_main_output = False
        >>> list(extended(torch.rand(5, 3)))
        ['probe']
    """

    def __init__(
        self,
        model: torch.nn.Module,
        extensions: Extensions | None = None,
        *,
        return_main_output: bool = True,
    ) -> None:
        super().__init__(model)
        self.extension_models = torch.nn.ModuleDict()
        self.return_main_output = bool(return_main_output)
        # Layer id -> names of its extensions, both in registration order.
        self._registrations: dict[str, list[str]] = {}
        try:
            self.register_extensions(extensions or {})
        except BaseException:
            self.remove()
            raise

    # ---------------------------------------------------------------- registrations

    @property
    def name_registrations(self) -> dict[str, list[str]]:
        """``{layer_id: [extension names]}``, in registration order (a copy)."""
        return {layer: list(names) for layer, names in self._registrations.items()}

    @property
    def extensions(self) -> dict[str, dict[str, torch.nn.Module]]:
        """``{layer_id: {name: extension module}}``, in registration order (a copy)."""
        return {
            layer: {name: self.extension_models[name] for name in names}
            for layer, names in self._registrations.items()
        }

    def _check_name(self, name: object, layer_id: str, new: dict[str, str]) -> str:
        if not isinstance(name, str):
            raise TypeError(
                f"Extension names must be str, got {type(name).__name__}: {name!r} "
                f"(for layer {layer_id!r})"
            )
        if name in self.extension_models:
            raise ValueError(f"Tried to overwrite module under existing name: {name}")
        if name in new:
            raise ValueError(
                f"Extension name {name!r} is given for layers {new[name]!r} and {layer_id!r}; "
                "extension names must be unique across all layers"
            )
        if not name:
            raise ValueError(f"Extension names must not be empty (for layer {layer_id!r})")
        if "." in name:
            raise ValueError(f"Extension name {name!r} must not contain '.'")
        if hasattr(self.extension_models, name):
            raise ValueError(
                f"Extension name {name!r} clashes with an attribute of torch.nn.ModuleDict; "
                "choose another name"
            )
        return name

    def register_extensions(self, extensions: Extensions) -> None:
        """Attach further extensions, given as ``{layer_id: {name: module}}``.

        Everything is checked before anything changes, so a failing call leaves the
        registrations as they were.

        Raises:
            ValueError: If a name is already registered (``Tried to overwrite module under
                existing name: NAME``), given twice, empty, contains ``'.'`` or clashes with
                a ``ModuleDict`` attribute, or if an extension is not a ``torch.nn.Module``.
            TypeError: If the arguments are not mappings, a name is not a str, or a layer is a
                TorchScript module (which takes no hooks).
            UnknownLayerError: If a layer id names no layer of the model.
        """
        if not isinstance(extensions, Mapping):
            raise TypeError(
                "extensions must be a mapping {layer_id: {name: module}}, "
                f"got {type(extensions).__name__}"
            )
        resolve_layers(self.wrapped_model, extensions.keys())
        new: dict[str, str] = {}  # name -> layer id
        for layer_id, named in extensions.items():
            if not isinstance(named, Mapping):
                raise TypeError(
                    f"The extensions of layer {layer_id!r} must be a mapping {{name: module}}, "
                    f"got {type(named).__name__}"
                )
            for name, module in named.items():
                self._check_name(name, layer_id, new)
                if not isinstance(module, torch.nn.Module):
                    raise ValueError(
                        f"Extension {name!r} must be a torch.nn.Module, "
                        f"got {type(module).__name__}"
                    )
                new[name] = layer_id

        # hooks first: a layer that takes none (a TorchScript part) fails before anything is attached
        hooked = [layer_id for layer_id, named in extensions.items() if named and layer_id not in self._layer_hooks]
        try:
            for layer_id in hooked:
                self._register_layer(layer_id)
        except BaseException:
            for layer_id in hooked:
                if layer_id in self._layer_hooks:
                    self._unregister_layer(layer_id)
            raise
        for layer_id, named in extensions.items():
            for name, module in named.items():
                self.extension_models[name] = module
                self._registrations.setdefault(layer_id, []).append(name)
            logger.debug("attached %s to layer %r", list(named), layer_id)

    def unregister_extension(self, name: str) -> None:
        """Detach the extension ``name``; the last one of a layer takes the layer's hook along.

        Raises:
            KeyError: If no extension of that name is registered.
        """
        for layer_id, names in self._registrations.items():
            if name in names:
                break
        else:
            raise KeyError(f"Tried to unregister extension of unknown name {name}")
        names.remove(name)
        del self.extension_models[name]
        if not names:
            del self._registrations[layer_id]
            self._unregister_layer(layer_id)

    def remove(self) -> None:
        """Take every hook off the model and unregister every extension.

        The extension modules themselves are left as they are. Safe to call twice.
        """
        for name in [n for names in self._registrations.values() for n in names]:
            del self.extension_models[name]
        self._registrations.clear()
        super().remove()

    # -------------------------------------------------------------------- forward

    def _record(self, state: _ForwardState, layer_id: str, output: Any) -> None:
        names = self._registrations.get(layer_id, ())
        if not names:
            return
        grad = state.grad_enabled and not torch.is_inference_mode_enabled()
        # the extensions' own saved tensors are kept as they are: under non-reentrant activation
        # checkpointing (Hugging Face's gradient checkpointing) a layer inside a checkpointed
        # part would otherwise have them counted, and its recomputation, which runs no
        # extension, would not match
        with torch.set_grad_enabled(grad), torch.autograd.graph.saved_tensors_hooks(_as_is, _as_is):
            output = map_tensors(torch.Tensor.clone, output)
            for name in names:
                try:
                    state.records[name] = self.extension_models[name](output)
                except Exception as exc:  # (a head that does not fit its layer's output, say)
                    exc.add_note(f"in the extension {name!r} on layer {layer_id!r}")
                    raise

    def _finish(self, model_output: Any, state: _ForwardState) -> Any:
        records = state.records
        ext_outputs = {
            name: records[name]
            for layer_id in state.layer_ids
            for name in self._registrations.get(layer_id, ())
            if name in records
        }
        if self.return_main_output:
            return model_output, ext_outputs
        return ext_outputs
