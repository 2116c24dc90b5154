"""The base of every wrapper: forward hooks on chosen layers and their lifetime."""

from __future__ import annotations

import logging
import sys
import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from ._layers import check_layer_id, resolve_selections
from ._selectors import Selection

logger = logging.getLogger(__name__)

__all__ = ["HooksHandle"]


class _StopForward(Exception):
    """Raised inside a hook to end the model's forward early; caught by the wrapper.

    It carries the state of the forward it belongs to, so that nested wrappers only ever
    catch their own.
    """

    def __init__(self, state: _ForwardState) -> None:
        super().__init__("forward stopped early once every wanted layer had run")
        self.state = state


#: The devices whose autocast state a forward that stops early puts back as it found it.
_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_state() -> tuple[tuple[bool, torch.dtype], ...]:
    return tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES)


class _ForwardState:
    """What the hooks collect during one forward of one wrapper, in one thread.

    It also keeps the grad mode and autocast state the forward began with: a forward that
    stops early skips the model code after the stop, which may have set them back.
    """

    __slots__ = ("owner", "layer_ids", "records", "pending", "stopped", "grad_enabled", "autocast")

    def __init__(self, owner: HooksHandle, layer_ids: tuple[str, ...], stop_early: bool) -> None:
        self.owner = owner
        self.grad_enabled = torch.is_grad_enabled()
        self.autocast = _autocast_state()
        self.layer_ids = layer_ids
        self.records: dict[str, Any] = {}
        # The layers still to run before the forward may stop; None when it never stops.
        self.pending: set[str] | None = set(layer_ids) if stop_early else None
        self.stopped = False

    def restore_modes(self) -> None:
        """Set the grad mode and autocast state back to what they were when the forward began."""
        torch.set_grad_enabled(self.grad_enabled)
        if _autocast_state() != self.autocast:
            for device, (enabled, dtype) in zip(_AUTOCAST_DEVICES, self.autocast):
                torch.set_autocast_enabled(device, enabled)
                torch.set_autocast_dtype(device, dtype)


# One stack of running forwards per thread: the hooks find the state of their own wrapper
# here, so two threads (or two nested wrappers) never see each other's outputs, and calling
# the wrapped model directly, outside any wrapper forward, records nothing.
_active = threading.local()


def _active_states() -> list[_ForwardState]:
    try:
        return _active.states
    except AttributeError:
        _active.states = []
        return _active.states


def _compiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` is what ``torch.compile(model)`` returns (an ``OptimizedModule``), or
    a module compiled in place (``model.compile()``)."""
    if getattr(module, "_compiled_call_impl", None) is not None:
        return True
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # (none exists before dynamo is loaded)
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


def _remove_all(hooks: dict[str, RemovableHandle]) -> None:
    for handle in hooks.values():
        handle.remove()
    hooks.clear()


class HooksHandle(torch.nn.Module):
    """Base class: a model wrapper with forward hooks on some of the model's layers.

    It keeps the model as its child ``wrapped_model`` and one forward hook per registered
    layer (see :attr:`registered_submodules`). Calling the wrapper calls the model with the
    same positional and keyword arguments; what the hooks collect lives only for that one
    call, so nothing is shared between calls or threads, and an exception in the model
    leaves no stale outputs behind. Hooks record only during the wrapper's own forward and
    in the thread that called it: calling the model directly records nothing, and a model
    that runs sub-modules in other threads (``DataParallel``) is not supported.
    Sub-classes decide what is collected and returned.

    Hook lifetime:

    * :meth:`remove` takes every hook off the model (safe to call again); the wrapper is
      a context manager that calls it on exit, also when an exception is raised;
    * a constructor that fails (say, one bad id among several) leaves no hook behind;
    * a wrapper that is garbage collected takes its hooks off the model too;
    * a copy of the wrapper (:func:`copy.deepcopy`, pickle) holds its own copy of the
      model, whose hooks report to the copy; :func:`copy.copy` is refused, since its copy
      would share this wrapper's hooks.

    The hooks refer to their wrapper, so pickling or deep-copying the *model* while a wrapper
    is attached copies the wrapper along (its extensions, a stump's ``modification``): call
    :meth:`remove` first, or save the model's ``state_dict()``.

    A wrapper that stops the forward early (``stop_early``, the stumps) ends it inside its
    hook on the last layer it waits for: forward hooks that layer got after it (another
    wrapper's, the user's own) do not run. Put those on first, or attach modules to a stump's
    layer with :class:`~extender.ExtendedModelStump`. The model code after that layer does
    not run either: ``finally`` and ``with`` blocks do (the stop is an exception), and the
    grad mode (:func:`torch.set_grad_enabled`) and autocast state are set back to what they
    were when the call began, but any other clean-up the model does after that point is
    skipped.

    A model compiled with ``torch.compile`` is refused, since its compiled code does not call
    hooks placed after its first call, and so are layers inside a compiled sub-module: wrap
    the model itself and compile the wrapper (``torch.compile(ActivationMapGrabber(model, ids))``).

    The wrapper never changes the model's mode, device or ``requires_grad`` by itself.
    Being a :class:`torch.nn.Module` with the model as a child, ``wrapper.eval()``,
    ``wrapper.train()`` and ``wrapper.to(...)`` act on the wrapped model, just as they
    would on any parent module.

    Example:
        >>> import torch
        >>> from extender import ActivationMapGrabber, HooksHandle
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
        >>> with ActivationMapGrabber(model, ['0']) as grabber:
        ...     isinstance(grabber, HooksHandle), grabber.registered_submodules
        ...     out, maps = grabber(torch.rand(4, 2))
        (True, ['0'])
        >>> grabber.registered_submodules, len(model[0]._forward_hooks)
        ([], 0)
    """

    def __init__(self, model: torch.nn.Module) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if _compiled(model) and hasattr(model, "_orig_mod"):
            raise TypeError(
                f"model is a torch.compile'd {type(model._orig_mod).__name__}, whose compiled code "
                "ignores hooks placed after its first call; wrap the model itself (model._orig_mod) "
                f"and compile the wrapper if you like: torch.compile({type(self).__name__}(model._orig_mod, ...))"
            )
        if _compiled(model):
            raise TypeError(
                f"model is a {type(model).__name__} compiled in place (model.compile()), whose compiled code "
                "ignores hooks placed after its first call; wrap a model that is not compiled, and compile "
                f"the wrapper if you like: {type(self).__name__}(model, ...).compile()"
            )
        super().__init__()
        self.wrapped_model = model
        # Layer id -> handle of its forward hook, in registration order.
        self._layer_hooks: dict[str, RemovableHandle] = {}
        self._hooks_finalizer = weakref.finalize(self, _remove_all, self._layer_hooks)

    def __getstate__(self) -> dict[str, Any]:
        # The finalizer is tied to this object; a copy (pickle, deepcopy) gets its own.
        state = self.__dict__.copy()
        state.pop("_hooks_finalizer", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._hooks_finalizer = weakref.finalize(self, _remove_all, self._layer_hooks)

    def __copy__(self) -> HooksHandle:
        # a shallow copy would share the model and this wrapper's hooks (which report to this
        # wrapper), and take them off the model when it is collected
        raise TypeError(f"a {type(self).__name__} cannot be copied shallowly: the copy would share the model's "
                        "hooks; use copy.deepcopy (a copy with its own model) or wrap the model again")

    # ----------------------------------------------------------------- bookkeeping

    @property
    def registered_submodules(self) -> list[str]:
        """The ids of the layers that carry a hook, in registration order (a copy)."""
        return list(self._layer_hooks)

    def _register_layer(self, layer_id: str) -> None:
        """Put a hook on the layer ``layer_id``; a layer that already has one is left alone.

        An id with output selectors (``'attn[0]'``) hooks its module and records the
        selected element only.
        """
        ((layer, selection),) = resolve_selections(self.wrapped_model, [layer_id])
        if layer_id in self._layer_hooks:
            return
        parts = selection.module_id.split(".") if selection.module_id else []
        for depth in range(1, len(parts)):
            part = ".".join(parts[:depth])
            if _compiled(self.wrapped_model.get_submodule(part)):
                raise TypeError(
                    f"Layer {layer_id!r} lies inside {part!r}, a torch.compile'd module whose compiled "
                    f"code ignores hooks placed after its first call; hook {part!r} itself, or wrap the "
                    "uncompiled model and compile the wrapper"
                )
        hook = _LayerHook(self, layer_id, selection if selection.keys else None)
        try:
            self._layer_hooks[layer_id] = layer.register_forward_hook(hook)
        except RuntimeError as exc:
            if not isinstance(layer, torch.jit.ScriptModule):
                raise
            raise TypeError(f"Layer {layer_id!r} is a TorchScript module ({type(layer).__name__}), which takes no "
                            "hooks; choose a layer outside the scripted part") from exc
        logger.debug("%s: hooked layer %r", type(self).__name__, layer_id)

    def _unregister_layer(self, layer_id: str) -> None:
        """Take the hook off the layer ``layer_id``.

        Raises:
            KeyError: If the layer carries no hook of this wrapper.
        """
        check_layer_id(layer_id)
        if layer_id not in self._layer_hooks:
            raise KeyError(
                f"Layer {layer_id!r} is not registered; registered layers: "
                f"{self.registered_submodules}"
            )
        self._layer_hooks.pop(layer_id).remove()
        logger.debug("%s: unhooked layer %r", type(self).__name__, layer_id)

    def _register_all(self, layer_ids: Iterable[str]) -> None:
        """Register several layers; on any error, remove every hook of this wrapper."""
        try:
            for layer_id in layer_ids:
                self._register_layer(layer_id)
        except BaseException:
            self.remove()
            raise

    # -------------------------------------------------------------- hook lifetime

    def remove(self) -> None:
        """Take every hook of this wrapper off the model.

        Afterwards no layer is registered and the wrapper passes calls straight to the
        model; layers may be registered again. Calling it twice is harmless.
        """
        _remove_all(self._layer_hooks)

    def __enter__(self) -> HooksHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    # ---------------------------------------------------------------- the forward

    def _stops_early(self) -> bool:
        """Whether the forward ends as soon as every registered layer has run once."""
        return False

    def _record(self, state: _ForwardState, layer_id: str, output: Any) -> None:
        """Store what the hook of ``layer_id`` saw in ``state.records``."""
        raise NotImplementedError

    def _finish(self, model_output: Any, state: _ForwardState) -> Any:
        """Build the wrapper's return value from the model output and ``state.records``.

        ``model_output`` is None when the forward was stopped early.
        """
        raise NotImplementedError

    def _on_layer_output(self, layer_id: str, output: Any, selection: Selection | None = None) -> None:
        """Called by the hook of ``layer_id`` with that layer's output (and the id's selectors)."""
        state = self._find_state()
        if state is None or state.stopped or layer_id not in state.layer_ids:
            return
        if selection is not None:
            output = selection.apply(output)
        self._record(state, layer_id, output)
        if state.pending is not None:
            state.pending.discard(layer_id)
            if not state.pending:
                state.stopped = True
                raise _StopForward(state)

    def _find_state(self) -> _ForwardState | None:
        for state in reversed(_active_states()):
            if state.owner is self:
                return state
        return None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped model with ``*args`` and ``**kwargs`` and collect the hooks' findings."""
        state = _ForwardState(self, tuple(self._layer_hooks), self._stops_early())
        if state.pending is not None and not state.pending:
            # Stopping as soon as all of no layers have run means not running at all.
            return self._finish(None, state)
        states = _active_states()
        states.append(state)
        try:
            model_output = self.wrapped_model(*args, **kwargs)
        except _StopForward as stop:
            if stop.state is not state:
                raise
            state.restore_modes()
            model_output = None
        finally:
            states.remove(state)
        if state.pending is not None:
            # Early exit promises no model output, whether or not the stop happened.
            model_output = None
        return self._finish(model_output, state)


class _LayerHook:
    """The forward hook of one layer: reports the layer's output to its wrapper.

    It holds only a weak reference to the wrapper, so the model never keeps its wrapper
    alive. It pickles (and deep-copies) as a reference to its wrapper, so a copied wrapper
    comes with a copied model whose hooks report to the copy. ``selection`` (for an id with
    output selectors) is applied by the wrapper, only while the wrapper runs a forward.
    """

    __slots__ = ("_owner", "layer_id", "selection")

    def __init__(self, owner: HooksHandle | None, layer_id: str, selection: Selection | None = None) -> None:
        self._owner = weakref.ref(owner) if owner is not None else None
        self.layer_id = layer_id
        self.selection = selection

    @property
    def owner(self) -> HooksHandle | None:
        """The wrapper this hook reports to; None once it is gone."""
        return self._owner() if self._owner is not None else None

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        owner = self.owner
        if owner is not None:
            owner._on_layer_output(self.layer_id, output, self.selection)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_LayerHook, (self.owner, self.layer_id, self.selection))
