"""Wrap PyTorch models to read, extend or cut off their intermediate layers.

Layers are named by their :meth:`torch.nn.Module.named_modules` ids (``''`` is the whole
model), optionally followed by selectors that pick one element of a layer's output
(``'encoder.layer.3[0]'``, ``'encoder[last_hidden_state]'``); :func:`list_layers` lists them. The wrappers are :class:`torch.nn.Module` s that
keep the model as their child ``wrapped_model`` and work through forward hooks:

* :class:`ActivationMapGrabber`: the model output plus a dict of layer outputs;
* :class:`ModelExtender`: extra modules attached to layers, trainable end to end;
* :class:`ModelStump`: the output of one layer, the rest of the model skipped;
* :class:`ExtendedModelStump`: a stump followed by a function of its output;
* :class:`HooksHandle`: their base, which owns the hooks and removes them.

Example:
    >>> import torch, extender
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh())
    >>> with extender.ActivationMapGrabber(model, ['0']) as grabber:
    ...     out, maps = grabber(torch.zeros(1, 2))
    >>> sorted(maps)
    ['0']
"""

from ._extender import ModelExtender
from ._grabber import ActivationMapGrabber
from ._hooks import HooksHandle
from ._layers import LayerInfo, UnknownLayerError, format_layers, list_layers
from ._selectors import OutputSelectionError
from ._stump import ExtendedModelStump, ModelStump

__all__ = [
    "ActivationMapGrabber",
    "ExtendedModelStump",
    "HooksHandle",
    "LayerInfo",
    "ModelExtender",
    "ModelStump",
    "OutputSelectionError",
    "UnknownLayerError",
    "format_layers",
    "list_layers",
]
