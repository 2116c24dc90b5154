"""Build the model a config names, identify it, and wrap it to return the wanted layers.

Every actor builds its own copy: ``seed`` makes randomly initialised weights the same on all
of them, and the weights' digest (kept in the manifest) proves it.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Callable
from pathlib import Path

import torch

from extender import ActivationMapGrabber, ModelStump, UnknownLayerError

from ._targets import import_target
from .config import Mode, ModelSpec
from .errors import ConfigError, close_matches
from ._extras import require

_NAME, _WEIGHTS = ModelSpec.key("name"), ModelSpec.key("weights")


#: Prefixes of ``model.name`` that build a timm model: ``timm:resnet50``, ``timm/vit_small_patch16_224``.
TIMM_PREFIXES = ("timm:", "timm/")


def timm_name(name: str) -> str | None:
    """The timm model name in ``model.name``, or None when it names no timm model.

    >>> timm_name("timm:vit_small_patch16_224.augreg_in21k"), timm_name("resnet50")
    ('vit_small_patch16_224.augreg_in21k', None)
    """
    for prefix in TIMM_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def _timm_builder(name: str) -> Callable[..., torch.nn.Module]:
    timm = require("timm", "timm", _NAME)
    if not timm.is_model(name):
        raise ConfigError(_NAME, f"{name!r} is not a timm model; {close_matches(name, timm.list_models())} "
                          "(timm.list_models() lists them)")
    return functools.partial(timm.create_model, name)


def _builder(name: str) -> Callable[..., torch.nn.Module]:
    if timm_name(name) is not None:
        return _timm_builder(timm_name(name))
    if ":" in name:
        builder = import_target(name, _NAME)
        if not callable(builder):
            raise ConfigError(_NAME, f"{name!r} is not callable")
        return builder
    import torchvision  # imported when a torchvision model is named: it takes seconds

    known = torchvision.models.list_models()
    if name not in known:
        raise ConfigError(_NAME, f"{name!r} is not a torchvision model; {close_matches(name, known)} "
                          "(or a timm model as 'timm:NAME', or your own as 'package.module:callable')")
    return torchvision.models.get_model_builder(name)


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """The model of ``spec`` on the CPU, in eval mode, without gradients.

    Torchvision builders get ``weights=None`` (and ``weights_backbone=None``), timm models
    ``pretrained=False``, unless the kwargs say otherwise: nothing is downloaded. A ``weights``
    file is a state dict, loaded with ``weights_only=True`` (or a ``.safetensors`` file).
    """
    builder = _builder(spec.name)
    kwargs = dict(spec.kwargs)
    if timm_name(spec.name) is not None:
        kwargs.setdefault("pretrained", False)
    elif ":" not in spec.name:
        params = inspect.signature(builder).parameters
        for key in ("weights", "weights_backbone"):
            if key in params:
                kwargs.setdefault(key, None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        try:
            model = builder(**kwargs)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(ModelSpec.key("kwargs"), f"{spec.name}(**{kwargs!r}) failed: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(_NAME, f"{spec.name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if spec.weights:
        path = Path(spec.weights).expanduser()
        if not path.is_file():
            raise ConfigError(_WEIGHTS, f"{str(path)!r} is not a file")
        try:
            state = _load_state(path)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            model.load_state_dict(state)
        except Exception as exc:
            raise ConfigError(_WEIGHTS, f"cannot load {str(path)!r} into {spec.name}: "
                              f"{str(exc).splitlines()[0]}") from None
    return model.eval().requires_grad_(False)


def _load_state(path: Path) -> dict:
    """A state dict from a ``torch.save`` file (weights only) or a ``.safetensors`` file."""
    if path.suffix == ".safetensors":
        return require("safetensors.torch", "timm", _WEIGHTS).load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def weights_digest(model: torch.nn.Module) -> str:
    """The SHA-256 of the model's state dict (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_identity(spec: ModelSpec, model: torch.nn.Module) -> dict:
    """The model's identity for the manifest: its spec, class and weights digest."""
    return {"name": spec.name, "class": type(model).__module__ + "." + type(model).__qualname__,
            "weights_sha256": weights_digest(model),
            "parameters": sum(p.numel() for p in model.parameters())}


class LayerOutputs(torch.nn.Module):
    """The wanted layers' outputs of one forward, as ``{layer: tensor}``.

    Grab mode wraps the model in an :class:`~extender.ActivationMapGrabber`, stump mode in a
    :class:`~extender.ModelStump`; with ``stop_early`` the forward ends once every wanted layer
    has run.
    """

    def __init__(self, model: torch.nn.Module, spec: ModelSpec):
        super().__init__()
        self.layers = spec.layers
        try:
            if spec.mode is Mode.STUMP:
                self.wrapper = ModelStump(model, spec.layers[0])
            else:
                # clone: a later in-place op (ReLU(inplace=True) after a batch norm, a residual
                # `out += identity`) would otherwise change an output before it is read
                self.wrapper = ActivationMapGrabber(model, list(spec.layers), stop_early=spec.stop_early,
                                                    detach=True, clone=True)
        except UnknownLayerError as exc:
            raise ConfigError(ModelSpec.key("layers"), str(exc)) from None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(self.wrapper, ModelStump):
            return {self.layers[0]: self.wrapper(x)}
        return self.wrapper(x)[1]

    def remove(self) -> None:
        """Take the hooks off the model."""
        self.wrapper.remove()
