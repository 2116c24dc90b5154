"""From a source's raw image to the model's input batch: decode, resize, crop, normalise.

Decoding and resizing happen per image (on the actor's GPU for JPEG files when it has one);
the batch is normalised on the device, so only uint8 pixels cross the host-device link.

>>> import torch
>>> image = torch.zeros(3, 40, 60, dtype=torch.uint8)
>>> tuple(resize_crop(image, resize=20, crop=(16, 16)).shape)
(3, 16, 16)
>>> batch = to_model_input(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8), None)
>>> batch.dtype, float(batch.max())
(torch.float32, 1.0)
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ._sources import RawImage

_JPEG_MAGIC = b"\xff\xd8\xff"

# torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they remain the
# only batched GPU JPEG decoder that ships with torchvision, so we keep them and the noise off.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def _from_pil(data: bytes) -> torch.Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()


def decode(raw: RawImage) -> torch.Tensor:
    """A ``(C, H, W)`` tensor on the CPU: uint8 for files and arrays, as given for tensors.

    Encoded files become RGB (JPEG, PNG, GIF, WebP through torchvision; other formats that
    PIL reads through PIL). Raises on unreadable data; the caller records a bad sample.
    """
    if isinstance(raw, (bytes, bytearray, memoryview)):
        import torchvision.io as tvio  # torchvision is imported when first needed: it takes seconds

        data = bytes(raw)
        try:
            return tvio.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                     mode=tvio.ImageReadMode.RGB)
        except RuntimeError:
            return _from_pil(data)
    if isinstance(raw, np.ndarray):
        array = raw[:, :, None] if raw.ndim == 2 else raw
        if array.ndim != 3:
            raise ValueError(f"an image array must be (H, W) or (H, W, C), got shape {raw.shape}")
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    if isinstance(raw, torch.Tensor):
        if raw.ndim == 2:
            return raw.unsqueeze(0)
        if raw.ndim != 3:
            raise ValueError(f"an image tensor must be (C, H, W), got shape {tuple(raw.shape)}")
        return raw
    raise TypeError(f"cannot decode an image from {type(raw).__name__}")


def decode_many(raws: Sequence[RawImage], device: torch.device,
                gpu_turn: contextlib.AbstractContextManager | None = None) -> list[torch.Tensor | Exception]:
    """Decode a batch; on a CUDA device, JPEG files are decoded there in one call.

    The GPU decoder writes on a stream of its own that does not wait for work already queued,
    so it runs inside ``gpu_turn`` (the worker's device lock: no forward queues work meanwhile)
    with the device drained before and after. Returns a tensor or the exception for each image,
    in order.
    """
    out: list[torch.Tensor | Exception | None] = [None] * len(raws)
    jpegs = [i for i, r in enumerate(raws)
             if device.type == "cuda" and isinstance(r, bytes) and r[:3] == _JPEG_MAGIC]
    if jpegs:
        import torchvision.io as tvio

        try:
            data = [torch.frombuffer(bytearray(raws[i]), dtype=torch.uint8) for i in jpegs]
            with gpu_turn or contextlib.nullcontext():
                torch.cuda.synchronize(device)
                images = tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB, device=device)
                torch.cuda.synchronize(device)
            for i, img in zip(jpegs, images):
                out[i] = img
        except RuntimeError:
            pass  # one bad file fails the whole call: decode them one by one below
    for i, raw in enumerate(raws):
        if out[i] is None:
            try:
                out[i] = decode(raw)
            except Exception as exc:  # recorded as a bad sample by the caller
                out[i] = exc
    return out


def resize_crop(image: torch.Tensor, resize: int | None, crop: tuple[int, int] | None) -> torch.Tensor:
    """Resize the shorter side to ``resize`` (antialiased), then centre-crop to ``crop``."""
    if resize is None and crop is None:
        return image
    import torchvision.transforms.v2.functional as TF

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
                             f"{x.shape[1]}; set source.preprocess.normalize to match or to 'none'")
        x = x.sub_(mean).div_(std)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
