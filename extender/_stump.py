"""ModelStump and ExtendedModelStump: a model cut off right after one layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._hooks import HooksHandle, _ForwardState, _LayerHook
from ._layers import check_layer_id, resolve_layer

__all__ = ["ExtendedModelStump", "ModelStump"]


class ModelStump(HooksHandle):
    """Wrap a model so that it returns the output of one layer, its *stump head*.

    The model's forward always stops right after the stump head has run, so the rest of
    the model is never computed. The output is the layer's output as it is (batch
    dimension kept, autograd graph kept). A stump head called several times per forward
    (a reused ``relu``) gives the output of its FIRST call, since the forward ends there.

    Args:
        model: The model to wrap; it becomes the child ``wrapped_model``.
        stump_head: The layer id (see :func:`extender.list_layers`) of the last layer to
            compute; ``''`` gives the whole model's output.

    Raises:
        UnknownLayerError: If the model has no layer ``stump_head``.
        RuntimeError: On a call during which the stump head did not run, ran in another
            thread, or was stopped at by another wrapper whose hook on it came first (the
            message says which of the last).

    Example:
        >>> import torch
        >>> from extender import ModelStump
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(512, 2))
        >>> stump = ModelStump(model, '1')
        >>> stump(torch.rand(4, 3, 10, 10)).shape
        torch.Size([4, 8, 8, 8])
        >>> stump.stump_head
        '1'
    """

    def __init__(self, model: torch.nn.Module, stump_head: str) -> None:
        super().__init__(model)
        resolve_layer(model, stump_head)
        self._register_all([stump_head])

    def extra_repr(self) -> str:
        return f"stump_head={self.stump_head!r}"

    @property
    def stump_head(self) -> str | None:
        """The id of the layer whose output is returned; None after :meth:`remove`.

        Setting it moves the hook to another layer (the new id is checked first).
        """
        ids = self.registered_submodules
        return ids[0] if ids else None

    @stump_head.setter
    def stump_head(self, layer_id: str) -> None:
        check_layer_id(layer_id)
        resolve_layer(self.wrapped_model, layer_id)
        old = self.stump_head
        self.remove()
        try:
            self._register_all([layer_id])
        except BaseException:
            if old is not None:  # (the old head took a hook before: it takes one again)
                self._register_all([old])
            raise

    def _stops_early(self) -> bool:
        return True

    def _record(self, state: _ForwardState, layer_id: str, output: Any) -> None:
        state.records[layer_id] = output

    def _finish(self, model_output: Any, state: _ForwardState) -> Any:
        if not state.layer_ids:
            raise RuntimeError(
                f"{type(self).__name__} has no stump head (its hooks were removed); "
                "set stump_head to a layer id first"
            )
        head = state.layer_ids[0]
        if head not in state.records:
            stopper = self._stopper_before(head)
            if stopper is not None:
                raise RuntimeError(
                    f"The stump head {head!r} ran, but a {type(stopper).__name__} hooked it before this "
                    f"{type(self).__name__} did and ended the forward there, so there is no output to return; "
                    "wrap that wrapper's wrapped_model instead"
                )
            raise RuntimeError(
                f"The stump head {head!r} did not run during the forward of "
                f"{type(self.wrapped_model).__name__}, so there is no output to return (or it ran in "
                "another thread: the hooks record only in the thread that called the wrapper)"
            )
        return state.records[head]

    def _stopper_before(self, layer_id: str) -> HooksHandle | None:
        """Another wrapper that stops early whose hook on ``layer_id``'s module runs before ours."""
        own = self._layer_hooks.get(layer_id)
        if own is None:  # (its hook was taken off during the forward)
            return None
        for key, hook in resolve_layer(self.wrapped_model, layer_id)._forward_hooks.items():
            if key == own.id:
                return None
            owner = hook.owner if isinstance(hook, _LayerHook) else None
            if owner is not None and owner is not self and owner._stops_early():
                return owner
        return None


class ExtendedModelStump(ModelStump):
    """A :class:`ModelStump` followed by a function of the stump head's output.

    Calling it returns ``modification(stump_output)``. A ``modification`` that is a
    :class:`torch.nn.Module` becomes the child ``modification``, so its parameters are
    trained, moved and saved along with the wrapper.

    Args:
        model: The model to wrap; it becomes the child ``wrapped_model``.
        stump_head: The layer id of the last layer to compute.
        modification: Any callable taking the stump head's output.

    Raises:
        ValueError: If ``modification`` is not callable (checked before any hook is placed).

    Example:
        >>> import torch
        >>> from extender import ExtendedModelStump
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        >>> stump = ExtendedModelStump(model, '1', modification=lambda t: t.sum(dim=1))
        >>> stump(torch.rand(6, 3)).shape
        torch.Size([6])
    """

    def __init__(
        self,
        model: torch.nn.Module,
        stump_head: str,
        modification: Callable[[Any], Any],
    ) -> None:
        if not callable(modification):
            raise ValueError(
                "modification must be callable (a function or a torch.nn.Module), "
                f"got {type(modification).__name__}: {modification!r}"
            )
        super().__init__(model, stump_head)
        self.modification = modification

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model up to the stump head and return ``modification`` of its output."""
        return self.modification(super().forward(*args, **kwargs))
