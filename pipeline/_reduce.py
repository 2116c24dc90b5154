"""Reductions applied on the device, before an activation leaves it: pooling, channel mean, cast.

>>> import torch
>>> from pipeline.config import DumpSpec
>>> x = torch.ones(2, 8, 6, 6)
>>> reduce_output(x, DumpSpec(reduce="pool", pool_size=[2, 2])).shape
torch.Size([2, 8, 2, 2])
>>> reduce_output(x, DumpSpec(reduce="channel_mean")).dtype
torch.float16
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import DumpSpec, Reduction

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def reduce_output(output: torch.Tensor, spec: DumpSpec, layer: str = "") -> torch.Tensor:
    """``output`` (batch first) reduced as ``spec`` says, cast to the storage dtype, contiguous."""
    if spec.reduce is Reduction.POOL:
        if output.ndim != 4:
            raise ValueError(f"layer {layer!r} gives {output.ndim}-d outputs {tuple(output.shape)}; "
                             "dump.reduce 'pool' needs (batch, channels, height, width)")
        output = F.adaptive_avg_pool2d(output, spec.pool_size)
    elif spec.reduce is Reduction.CHANNEL_MEAN:
        if output.ndim < 3:
            raise ValueError(f"layer {layer!r} gives {output.ndim}-d outputs {tuple(output.shape)}; "
                             "dump.reduce 'channel_mean' needs (batch, channels, ...)")
        output = output.mean(dim=1)
    return output.to(TORCH_DTYPES[spec.dtype.value]).contiguous()
