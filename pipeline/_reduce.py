"""Reductions applied on the device, before an activation leaves it: pooling, channel mean, cast.

>>> import torch
>>> from pipeline.config import DumpSpec
>>> x = torch.ones(2, 8, 6, 6)
>>> reduce_output(x, DumpSpec(reduce="pool", pool_size=[2, 2])).shape
torch.Size([2, 8, 2, 2])
>>> reduce_output(x, DumpSpec(reduce="channel_mean")).dtype
torch.float16
>>> tokens = torch.arange(12.0).reshape(1, 3, 4)  # (batch, tokens, dim)
>>> reduce_output(tokens, DumpSpec(reduce="cls", dtype="float32")).tolist()
[[0.0, 1.0, 2.0, 3.0]]
>>> reduce_output(tokens, DumpSpec(reduce="mean", dtype="float32")).tolist()
[[4.0, 5.0, 6.0, 7.0]]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._records import CHANNELS_FIRST, CHANNELS_LAST
from .config import DumpSpec, Reduction
from .errors import ConfigError

log = logging.getLogger(__name__)

_REDUCE = DumpSpec.key("reduce")

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


#: The layers :func:`_warn_if_upsampled` has warned of in this process.
_UPSAMPLED: set[str] = set()


def _warn_if_upsampled(output: torch.Tensor, pool_size: int | list[int], layer: str) -> None:
    """A warning, once per layer, where the map is smaller than the pooled size: pooling then
    repeats its values instead of averaging them."""
    height, width = (pool_size, pool_size) if isinstance(pool_size, int) else tuple(pool_size)
    if layer not in _UPSAMPLED and (output.shape[2] < height or output.shape[3] < width):
        _UPSAMPLED.add(layer)
        log.warning("layer %r gives %dx%d maps, smaller than %s %dx%d: pooling repeats their values into the "
                    "larger size; a pool size of at most %dx%d keeps each value once", layer, output.shape[2],
                    output.shape[3], DumpSpec.key("pool_size"), height, width, output.shape[2], output.shape[3])


def check_class_token(model: torch.nn.Module, spec: DumpSpec) -> None:
    """Refuse ``reduce: cls`` for a model that says it has no class token (timm's ViTs built
    with ``class_token=False``, as SigLIP's are: their ``cls_token`` is None): token 0 is a
    patch's there, or a register's.

    >>> from pipeline.config import DumpSpec
    >>> model = torch.nn.Module(); model.cls_token = None
    >>> check_class_token(model, DumpSpec(reduce="cls"))
    Traceback (most recent call last):
    ...
    pipeline.errors.ConfigError: dump.reduce: 'cls' keeps token 0, the class token, but the model has none (its cls_token is None): token 0 is a patch's or a register's; use 'mean', or 'none' on a layer that gives the pooled output (fc_norm)
    """
    if spec.reduce is Reduction.CLS and "cls_token" in dir(model) and getattr(model, "cls_token") is None:
        raise ConfigError(_REDUCE, "'cls' keeps token 0, the class token, but the model has none (its cls_token is "
                                   "None): token 0 is a patch's or a register's; use 'mean', or 'none' on a layer "
                                   "that gives the pooled output (fc_norm)")


#: Modules that give ``(batch, channels, height, width)`` maps in any model.
_CHANNELS_FIRST = (torch.nn.modules.conv._ConvNd, torch.nn.modules.batchnorm._BatchNorm,
                   torch.nn.modules.pooling._AvgPoolNd, torch.nn.modules.pooling._MaxPoolNd,
                   torch.nn.modules.pooling._AdaptiveAvgPoolNd, torch.nn.modules.pooling._AdaptiveMaxPoolNd)


def declares_channels_last(model: torch.nn.Module) -> bool:
    """Whether ``model`` says its feature maps are ``(batch, height, width, channels)``
    (timm's ``output_fmt`` 'NHWC': Swin, MambaOut).

    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.LayerNorm(4))
    >>> declares_channels_last(model)
    False
    >>> model.output_fmt = "NHWC"
    >>> declares_channels_last(model)
    True
    """
    layout = getattr(model, "output_fmt", None)
    return getattr(layout, "value", layout) == "NHWC"


def channels_at_end(model: torch.nn.Module, layers: Sequence[str]) -> set[str]:
    """The layers of ``layers`` whose 4-d outputs may be ``(batch, height, width, channels)``:
    all but convolutions, batch norms and pooling layers, which give ``(batch, channels,
    height, width)`` in any model. The trial tells them apart (:func:`layout_from_growth`).

    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.LayerNorm(4))
    >>> channels_at_end(model, ["0", "1"])
    {'1'}
    """
    from extender._layers import resolve_selections

    return {layer for layer, (module, _) in zip(layers, resolve_selections(model, layers))
            if not isinstance(module, _CHANNELS_FIRST)}


def layout_from_growth(shape: Sequence[int], taller: Sequence[int] | None, wider: Sequence[int] | None,
                       image: Sequence[int], declared: bool, batch: int = 1) -> str:
    """The layout of a layer's 4-d output ``shape`` for a batch of ``batch`` inputs of
    ``image`` (height, width), told by its shapes for one input of twice that height
    (``taller``) and one of twice that width (``wider``): ``(batch, height, width, channels)``
    where the height grows dim 1 and the width dim 2 (or one of them, the other side being one
    cell at both sizes), ``(batch, channels, height, width)`` where they grow dims 2 and 3.
    Where the shapes do not tell (maps pooled to 1x1; windows of tokens, whose count per
    sample grows; ``None``: the model takes no other input size), by their proportions and
    what the model ``declared`` (:func:`laid_out_channels_last`), and ``(batch, 1, 1, C)`` is
    one cell of ``C`` channels.

    >>> layout_from_growth((2, 8, 8, 96), (1, 16, 8, 96), (1, 8, 16, 96), (32, 32), False, batch=2)
    'channels_last'
    >>> layout_from_growth((1, 96, 8, 8), (1, 96, 16, 8), (1, 96, 8, 16), (32, 32), False)
    'channels_first'
    >>> layout_from_growth((1, 1, 1, 768), (1, 1, 1, 768), (1, 1, 2, 768), (16, 16), False)
    'channels_last'
    >>> layout_from_growth((1, 768, 1, 1), (1, 768, 1, 1), (1, 768, 1, 1), (224, 64), False)
    'channels_first'
    >>> layout_from_growth((1, 56, 56, 96), None, None, (224, 224), False)
    'channels_last'
    >>> layout_from_growth((1, 1, 1, 768), (1, 1, 1, 768), (1, 1, 1, 768), (16, 16), False)
    'channels_last'
    """
    grown = layout_by_growth(shape, taller, wider, batch)
    if grown is not None:
        return grown
    if shape[1] == shape[2] == 1 < shape[3]:  # one cell of many channels (a small input's last stage)
        return CHANNELS_LAST
    return CHANNELS_LAST if laid_out_channels_last(shape, image, declared) else CHANNELS_FIRST


def layout_by_growth(shape: Sequence[int], taller: Sequence[int] | None, wider: Sequence[int] | None,
                     batch: int = 1) -> str | None:
    """The layout :func:`layout_from_growth` tells by growth alone; ``None`` where growth does not tell."""
    grows = _growth(shape, taller, wider, batch)
    if grows is not None and any(grows):
        for layout, (height, width) in ((CHANNELS_LAST, (1, 2)), (CHANNELS_FIRST, (2, 3))):
            if grows[0] <= {height} and grows[1] <= {width}:
                return layout
    return None


def fits_no_grid(shape: Sequence[int], image: Sequence[int]) -> bool:
    """Whether a 4-d output ``shape`` has the proportions of the ``image`` (height, width) in
    neither layout, no side being one cell: no image's maps (windows of tokens, attention
    between the tokens of an image that is not square).

    >>> fits_no_grid((1, 16, 49, 128), (224, 224)), fits_no_grid((1, 128, 28, 28), (224, 224))
    (True, False)
    >>> fits_no_grid((1, 28, 28, 128), (224, 224)), fits_no_grid((1, 768, 1, 1), (224, 224))
    (False, False)
    """
    height, width = image
    return (min(shape[1:]) > 1 and not _proportioned(shape[1], shape[2], height, width)
            and not _proportioned(shape[2], shape[3], height, width))


def windows_from_growth(shape: Sequence[int], taller: Sequence[int] | None, wider: Sequence[int] | None,
                        batch: int = 1) -> bool:
    """Whether a layer's 4-d output ``shape`` (for ``batch`` inputs) is windows of tokens,
    ``(batch, windows, tokens, channels)`` as in MaxViT's attention inside its partitions:
    told by its shapes for one input of twice the height (``taller``) and of twice the width
    (``wider``), where both grow the same dims among 1 and 2 (an image grid grows one with the
    height and the other with the width).

    >>> windows_from_growth((1, 16, 4, 16), (1, 32, 4, 16), (1, 32, 4, 16))
    True
    >>> windows_from_growth((1, 8, 8, 96), (1, 16, 8, 96), (1, 8, 16, 96)), windows_from_growth((1, 4, 8, 8), None, None)
    (False, False)
    """
    grows = _growth(shape, taller, wider, batch)
    return grows is not None and bool(grows[0]) and grows[0] == grows[1] and grows[0] <= {1, 2}


def _growth(shape: Sequence[int], taller: Sequence[int] | None, wider: Sequence[int] | None,
            batch: int) -> list[set[int]] | None:
    """The dims of a 4-d ``shape`` that grow with the input's height and with its width, or
    ``None`` where that is not known (no shapes at the other sizes, or windows folded into the
    batch: one sample's dim 0 grows)."""
    if taller is None or wider is None or len(taller) != 4 or len(wider) != 4:
        return None
    if not taller[0] == wider[0] == shape[0] / batch:
        return None
    return [{d for d in (1, 2, 3) if grown[d] != shape[d]} for grown in (taller, wider)]


def _proportioned(a: int, b: int, height: int, width: int) -> bool:
    """Whether an ``a`` x ``b`` grid has the proportions of a ``height`` x ``width`` image, each
    side rounded by up to one cell; a grid with a side of one cell says nothing of them (no).

    >>> _proportioned(56, 56, 224, 224), _proportioned(768, 1, 224, 64), _proportioned(1, 1, 224, 224)
    (True, False, False)
    """
    return min(a, b) > 1 and abs(a / b - height / width) <= (1 + a / b) / min(a, b)


def laid_out_channels_last(shape: Sequence[int], image: Sequence[int], declared: bool = False) -> bool:
    """Whether the 4-d output ``shape`` is ``(batch, height, width, channels)`` by its
    proportions, given the model input's ``(height, width)``: where its dims 1 and 2 have the
    input's proportions and dims 2 and 3 do not; not where dims 2 and 3 have them and dims 1
    and 2 do not (the maps of a convolution passed through an activation); where both or
    neither have them, as the model ``declared``.

    >>> laid_out_channels_last((8, 56, 56, 96), (224, 224)), laid_out_channels_last((8, 24, 112, 112), (224, 224))
    (True, False)
    >>> laid_out_channels_last((8, 56, 80, 96), (224, 320)), laid_out_channels_last((8, 24, 112, 160), (224, 320))
    (True, False)
    >>> laid_out_channels_last((8, 64, 64, 64), (256, 256)), laid_out_channels_last((8, 64, 64, 64), (256, 256), True)
    (False, True)
    """
    height, width = image
    grid_first = _proportioned(shape[1], shape[2], height, width)
    if grid_first != _proportioned(shape[2], shape[3], height, width):
        return grid_first
    return declared


def reduce_output(output: torch.Tensor, spec: DumpSpec, layer: str = "", channels_last: bool = False) -> torch.Tensor:
    """``output`` (batch first) reduced as ``spec`` says, cast to the storage dtype, contiguous.
    ``channels_last``: a 4-d output is ``(batch, height, width, channels)`` (:func:`layout_from_growth`);
    it is pooled over its height and width into ``(batch, channels, ...)`` maps, as any other."""
    channels_last = channels_last and output.ndim == 4
    if spec.reduce is Reduction.POOL:
        if output.ndim != 4:
            raise ValueError(f"layer {layer!r} gives {output.ndim}-d outputs {tuple(output.shape)}; "
                             f"{_REDUCE} 'pool' needs (batch, channels, height, width)")
        output = output.permute(0, 3, 1, 2) if channels_last else output
        _warn_if_upsampled(output, spec.pool_size, layer)
        output = F.adaptive_avg_pool2d(output, spec.pool_size)
    elif spec.reduce is Reduction.CHANNEL_MEAN:
        if output.ndim < 3:
            raise ValueError(f"layer {layer!r} gives {output.ndim}-d outputs {tuple(output.shape)}; "
                             f"{_REDUCE} 'channel_mean' needs (batch, channels, ...)")
        output = output.mean(dim=-1 if channels_last else 1)
    elif spec.reduce in (Reduction.CLS, Reduction.MEAN):
        if output.ndim != 3:
            raise ValueError(f"layer {layer!r} gives {output.ndim}-d outputs {tuple(output.shape)}; "
                             f"{_REDUCE} {spec.reduce.value!r} needs tokens (batch, tokens, dim); "
                             "for (batch, channels, height, width) maps use 'pool'")
        output = output[:, 0] if spec.reduce is Reduction.CLS else output.mean(dim=1)
    return output.to(TORCH_DTYPES[spec.dtype.value]).contiguous()
