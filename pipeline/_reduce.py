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

import torch
import torch.nn.functional as F

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


def reduce_output(output: torch.Tensor, spec: DumpSpec, layer: str = "") -> torch.Tensor:
    """``output`` (batch first) reduced as ``spec`` says, cast to the storage dtype, contiguous."""
    if spec.reduce is Reduction.POOL:
        if output.ndim != 4:
            raise ValueError(f"layer {layer!r} gives {output.ndim}-d outputs {tuple(output.shape)}; "
                             f"{_REDUCE} 'pool' needs (batch, channels, height, width)")
        _warn_if_upsampled(output, spec.pool_size, layer)
        output = F.adaptive_avg_pool2d(output, spec.pool_size)
    elif spec.reduce is Reduction.CHANNEL_MEAN:
        if output.ndim < 3:
            raise ValueError(f"layer {layer!r} gives {output.ndim}-d outputs {tuple(output.shape)}; "
                             f"{_REDUCE} 'channel_mean' needs (batch, channels, ...)")
        output = output.mean(dim=1)
    elif spec.reduce in (Reduction.CLS, Reduction.MEAN):
        if output.ndim != 3:
            raise ValueError(f"layer {layer!r} gives {output.ndim}-d outputs {tuple(output.shape)}; "
                             f"{_REDUCE} {spec.reduce.value!r} needs tokens (batch, tokens, dim); "
                             "for (batch, channels, height, width) maps use 'pool'")
        output = output[:, 0] if spec.reduce is Reduction.CLS else output.mean(dim=1)
    return output.to(TORCH_DTYPES[spec.dtype.value]).contiguous()
