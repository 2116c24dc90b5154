"""Build the model a config names, identify it, and wrap it to return the wanted layers.

Every actor builds its own copy: ``seed`` makes randomly initialised weights the same on all
of them, and the weights' digest (kept in the manifest) proves it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from extender import ActivationMapGrabber, ModelStump, OutputSelectionError, UnknownLayerError, list_layers
from extender._layers import resolve_selections

from ._targets import import_target
from .config import Mode, ModelSpec
from .errors import ConfigError, LayerOutputError, PipelineError, close_matches
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


#: The ``OSError`` s that a rerun meets again: a file that is not there, or not to be read.
_LASTING_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_config_fault(exc: BaseException) -> bool:
    """Whether an error raised while the model is built from the config, or runs its trial
    forward, is the config's fault: one a rerun of the same config meets again, to be told as a
    :class:`ConfigError` (exit 2) rather than a failed run (exit 1, "rerun to resume").

    Every ``Exception`` is, but a ``MemoryError`` (the host was short of memory this time) and an
    ``OSError`` other than a missing or forbidden file (the network or a disk, as a builder that
    downloads its weights meets them: a rerun may get past it). ``KeyboardInterrupt`` and
    ``SystemExit`` are no ``Exception`` s: they stop the run as they are.

    >>> [is_config_fault(e) for e in (KeyError("depth"), ImportError("timm"), AssertionError(), MemoryError())]
    [True, True, True, False]
    >>> [is_config_fault(e) for e in (FileNotFoundError("w.pt"), ConnectionResetError(), KeyboardInterrupt())]
    [True, False, False]
    """
    if not isinstance(exc, Exception) or isinstance(exc, MemoryError):
        return False
    return not isinstance(exc, OSError) or isinstance(exc, _LASTING_OS_ERRORS)


def describe_failure(exc: BaseException) -> str:
    """What went wrong, in a line: the message of a ``RuntimeError``, ``ValueError`` or
    ``TypeError`` (torch's and the pipeline's own say what failed), the type and message of
    any other error (an ``AssertionError`` or ``KeyError`` alone may say nothing, or just a key).

    >>> describe_failure(RuntimeError("shapes cannot be multiplied")), describe_failure(KeyError("depth"))
    ('shapes cannot be multiplied', "KeyError: 'depth'")
    >>> describe_failure(AssertionError())
    'AssertionError'
    >>> describe_failure(AssertionError("Input height (16) doesn't match model (32)."))
    "AssertionError: Input height (16) doesn't match model (32)"
    """
    text = str(exc).strip()
    if text.endswith(".") and not text.endswith(".."):  # the line goes on after it
        text = text[:-1]
    if isinstance(exc, (PipelineError, RuntimeError, ValueError, TypeError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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

    An error of the builder is a :class:`ConfigError` when a rerun would meet it again
    (:func:`is_config_fault`): a missing module it imports names ``model.name``, anything else
    ``model.kwargs`` (``model.name`` when there are none). So is a model left with lazy modules
    (``torch.nn.LazyConv2d``, ...) whose weights no forward has made yet: every worker would
    make its own, from its own random state.
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
        except ConfigError:
            raise
        except Exception as exc:
            if not is_config_fault(exc):
                raise
            if isinstance(exc, ImportError):
                raise ConfigError(_NAME, f"{spec.name}(**{kwargs!r}) failed: {describe_failure(exc)}; install what "
                                  "it imports, or name another builder") from None
            key = ModelSpec.key("kwargs") if spec.kwargs else _NAME
            raise ConfigError(key, f"{spec.name}(**{kwargs!r}) failed: {describe_failure(exc)}") from None
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
    _refuse_lazy(spec, model)
    return model.eval().requires_grad_(False)


def _refuse_lazy(spec: ModelSpec, model: torch.nn.Module) -> None:
    """Refuse a model whose lazy modules have no weights yet: a lazy module (``LazyConv2d``,
    ``LazyLinear``, ...) makes them at its first forward, from the input's size, so they can be
    neither frozen nor digested before it, and each worker's first batch would draw its own.
    A forward of a dummy input in the builder (seeded like the rest of the model) makes them, as
    loading a weights file does."""
    lazy = [(name or "''", type(module).__name__) for name, module in model.named_modules()
            if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params()]
    if not lazy:
        return
    shown = ", ".join(f"{name} ({kind})" for name, kind in lazy[:3]) + (f" and {len(lazy) - 3} more" if len(lazy) > 3 else "")
    raise ConfigError(_NAME, f"{spec.name!r} built a model with lazy modules, {shown}, whose weights are made by "
                      "their first forward and do not exist yet; have the builder run one forward of a dummy input "
                      "of the size the model takes before returning it (e.g. `model(torch.zeros(1, 3, 224, 224))`), "
                      f"or give a {_WEIGHTS} file")


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
    """The wanted layers' outputs of one forward, as ``{layer: output}``: every wanted layer's
    (a tensor, or whatever else the layer returned).

    Grab mode wraps the model in an :class:`~extender.ActivationMapGrabber`, stump mode in a
    :class:`~extender.ModelStump`; with ``stop_early`` the forward ends once every wanted layer
    has run. A wanted layer that did not run in the forward (a module the model holds but does
    not call, or not for this input) has no output: :class:`LayerOutputError`, naming the
    layers that did run.
    """

    def __init__(self, model: torch.nn.Module, spec: ModelSpec):
        super().__init__()
        self.layers = spec.layers
        self._ran: list[str] | None = None  # the layers a forward ran, found once where one is missing
        try:
            if spec.mode is Mode.STUMP:
                self.wrapper = ModelStump(model, spec.layers[0])
            else:
                # clone: a later in-place op (ReLU(inplace=True) after a batch norm, a residual
                # `out += identity`) would otherwise change an output before it is read
                self.wrapper = ActivationMapGrabber(model, list(spec.layers), stop_early=spec.stop_early,
                                                    detach=True, clone=True)
        except UnknownLayerError as exc:  # (told how to list the ids from the command line, not in Python)
            listed = str(exc).replace("list the valid ids with extender.list_layers(model)",
                                      "`actmap layers MODEL` lists the valid ids")
            raise ConfigError(ModelSpec.key("layers"), listed) from None

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        if isinstance(self.wrapper, ModelStump):
            return {self.layers[0]: self.wrapper(x)}
        outputs = self.wrapper(x)[1]
        missing = [layer for layer in self.layers if layer not in outputs]
        if missing:
            raise LayerOutputError(self._not_run(missing, x))
        return outputs

    @contextlib.contextmanager
    def stopping_early(self) -> Iterator[None]:
        """Forwards in the block end once every wanted layer has run, whatever ``stop_early``
        says (a stump's always do): the head after them is not run."""
        wrapper = self.wrapper
        if isinstance(wrapper, ModelStump) or wrapper.stop_early:
            yield
            return
        wrapper.stop_early = True
        try:
            yield
        finally:
            wrapper.stop_early = False

    def _not_run(self, missing: list[str], x: torch.Tensor) -> str:
        """Why the ``missing`` layers have no output, and which layers do run (a second forward,
        with a hook on every module, made on this path once: each sample of a batch that fails
        so is tried alone)."""
        model = self.wrapper.wrapped_model
        if self._ran is None:
            modules = dict(model.named_modules())
            try:
                self._ran = [info.id for info in list_layers(model, x) if info.id and info.id in modules and info.calls]
            except Exception:  # the listing is a hint: a model that fails it leaves it out
                self._ran = []
        ran = self._ran
        size = "x".join(map(str, x.shape))
        them = "it has" if len(missing) == 1 else "they have"
        text = (f"layer{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} did not run in the forward "
                f"of {type(model).__name__} on a {size} input, so {them} no output (the model holds the module but "
                "does not call it, or not for this input)")
        if ran:
            text += f"; dump a layer that runs ({close_matches(missing[0], ran)})"
        return text + (f"; `actmap layers MODEL --input-size {' '.join(map(str, x.shape[1:]))}` lists each layer with "
                       "how often it ran (0: never)")

    @contextlib.contextmanager
    def counting(self) -> Iterator[collections.Counter[str]]:
        """Counts each wanted layer's calls while the block runs."""
        counts: collections.Counter[str] = collections.Counter()
        with self._seeing(lambda layer, _: counts.update([layer])):
            yield counts

    @contextlib.contextmanager
    def shapes_seen(self) -> Iterator[dict[str, tuple[int, ...]]]:
        """The shape of each wanted layer's (selected) output in the block's forwards, its first
        call's, kept as the layers run: those that ran before a forward failed are there too."""
        shapes: dict[str, tuple[int, ...]] = {}

        def see(layer: str, output: Any) -> None:
            if layer not in shapes and isinstance(output, torch.Tensor):
                shapes[layer] = tuple(output.shape)

        with self._seeing(see, select=True):
            yield shapes

    @contextlib.contextmanager
    def _seeing(self, see: Callable[[str, Any], None], select: bool = False) -> Iterator[None]:
        """``see(layer, output)`` at each call of a wanted layer while the block runs (a hook on
        its module, before the wrapper's own, taken off after); the output as the layer's
        selectors pick it with ``select`` (``None`` where they do not fit)."""
        def hook(layer: str, selection: Any, output: Any) -> None:
            if select:
                try:
                    output = selection.apply(output)
                except OutputSelectionError:
                    output = None
            see(layer, output)

        model = self.wrapper.wrapped_model
        handles = [module.register_forward_hook(lambda _, __, out, layer=layer, selection=selection:
                                                hook(layer, selection, out), prepend=True)
                   for layer, (module, selection) in zip(self.layers, resolve_selections(model, self.layers))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @property
    def stops_early(self) -> bool:
        """Whether a forward of the wrapper ends at the wanted layers (stump mode, ``stop_early``)."""
        return isinstance(self.wrapper, ModelStump) or bool(getattr(self.wrapper, "stop_early", False))

    def whole_calls(self, x: torch.Tensor) -> collections.Counter[str]:
        """Each wanted layer's calls in a whole forward of ``x`` (the wrapper's hooks keep nothing
        outside its own calls); a forward that fails (a head that cannot take the input, dumped
        up to a layer before it) is counted as far as it went. The caller sets the modes."""
        with self.counting() as counts:
            try:
                self.wrapper.wrapped_model(x)
            except Exception:
                pass
        return counts

    def remove(self) -> None:
        """Take the hooks off the model."""
        self.wrapper.remove()
