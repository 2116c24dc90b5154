"""From decoded images to the model's input batch: resize, crop, normalise.

Resizing happens per image (in the decoding threads, :mod:`pipeline._decoder`); the batch is
normalised on the device, so only uint8 pixels cross the host-device link.

>>> import torch
>>> image = torch.zeros(3, 40, 60, dtype=torch.uint8)
>>> tuple(resize_crop(image, resize=20, crop=(16, 16)).shape)
(3, 16, 16)
>>> batch = to_model_input(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8), None)
>>> batch.dtype, float(batch.max())
(torch.float32, 1.0)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .config import PreprocessSpec


def resize_crop(image: torch.Tensor, resize: int | None, crop: tuple[int, int] | None) -> torch.Tensor:
    """Resize the shorter side to ``resize`` (antialiased), then centre-crop to ``crop``."""
    if resize is None and crop is None:
        return image
    import torchvision.transforms.v2.functional as TF  # imported when first needed: it takes seconds

    if resize is not None:
        image = TF.resize(image, [resize], antialias=True)
    if crop is not None:
        image = TF.center_crop(image, list(crop))
    return image


@functools.lru_cache(maxsize=8)
def _constants(mean_std: tuple[tuple[float, ...], tuple[float, ...]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The normalisation constants on ``device``, made once (a copy to a GPU waits for it)."""
    return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in mean_std)


def to_model_input(batch: torch.Tensor, mean_std: tuple[Sequence[float], Sequence[float]] | None,
                   channels_last: bool = False) -> torch.Tensor:
    """A float32 batch in [0, 1] (uint8 pixels are scaled), normalised when ``mean_std`` is set."""
    x = batch.float().div_(255) if batch.dtype == torch.uint8 else batch.float()
    if mean_std is not None:
        mean, std = _constants((tuple(mean_std[0]), tuple(mean_std[1])), x.device)
        if x.shape[1] != mean.shape[1]:
            raise ValueError(f"normalisation has {mean.shape[1]} channels but the images have "
                             f"{x.shape[1]}; set {PreprocessSpec.key('normalize')} to match or to 'none'")
        x = x.sub_(mean).div_(std)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
