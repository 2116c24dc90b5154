"""From what a source gives to one checked image: a ``(3, H, W)`` tensor the model can take
(``(1, H, W)`` for models of grey images).

Every image goes through the same gate, wherever it comes from (file bytes, a dataset's tensor
or array, a PIL image):

- its size is read from the file header and refused above ``max_pixels`` before any decoding
  (a 188 KB PNG can decode to 1.35 GB);
- it is decoded (JPEG by libjpeg-turbo through simplejpeg, PNG by PIL, others by torchvision's
  decoders and PIL for the formats they lack; see :mod:`pipeline._png` for why PNG);
- what has one sensible conversion is converted: the first frame of an animation, grey to RGB,
  RGBA / grey + alpha to RGB (the alpha dropped), a 2-D array to one channel;
- integer pixels are scaled by their type's range (16-bit PNGs are ``uint16``: 65535 is white);
  ``uint8`` stays ``uint8`` (scaled on the device), other types become ``float32`` in [0, 1];
- anything else (other channel counts, empty images, non-finite floats) raises
  :class:`ImageError`, which the worker records as a bad sample with its id.

>>> import io
>>> from PIL import Image
>>> buf = io.BytesIO(); Image.new("LA", (6, 4)).save(buf, format="PNG")
>>> image = decode(buf.getvalue())
>>> tuple(image.shape), image.dtype
((3, 4, 6), torch.uint8)
>>> header_size(buf.getvalue())
(6, 4)
>>> decode(buf.getvalue(), max_pixels=10)
Traceback (most recent call last):
...
pipeline._images.ImageError: the image is 6x4 = 24 pixels, over the limit of 10 (source.preprocess.max_pixels)
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from collections.abc import Callable

import numpy as np
import torch

from . import _png
from ._imports import lazy_import
from ._sources._base import Deferred, RawImage
from .config import PreprocessSpec

log = logging.getLogger(__name__)

#: PIL's own default limit (``Image.MAX_IMAGE_PIXELS``): about 89.5 megapixels.
DEFAULT_MAX_PIXELS = 89_478_485

_GIF_MAGIC = (b"GIF87a", b"GIF89a")
_JPEG_MAGIC = b"\xff\xd8\xff"
_RGB_MODE = 3  # torchvision.io.ImageReadMode.RGB, as its operators take it

# torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they remain the
# only batched GPU JPEG decoder that ships with torchvision, so we keep them and the noise off.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)
# PIL's own decompression-bomb warning: the limit is source.preprocess.max_pixels, checked first
warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")


def _torchvision_io():
    """``torchvision.io``, imported when first needed (it takes seconds)."""
    return lazy_import("torchvision.io")


class ImageError(ValueError):
    """An image that cannot become a model input; the reason names what is wrong."""


# -- the size from the header ---------------------------------------------------------------------


def _jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """``(width, height, components)`` from a JPEG file's start of frame; ``None`` if unknown."""
    # the segments up to the first start of frame; bytes taken one by one (no struct, no slices:
    # this runs once per file, holding the GIL the decoding threads share)
    position, end = 2, len(data) - 10
    while position < end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
        elif marker == 0xD8 or marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
        elif 0xC0 <= marker <= 0xCF and marker != 0xC4 and marker != 0xC8 and marker != 0xCC:  # start of frame
            return (data[position + 7] << 8 | data[position + 8], data[position + 5] << 8 | data[position + 6],
                    data[position + 9])
        else:
            position += 2 + (data[position + 2] << 8 | data[position + 3])  # the marker, then its length
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    frame = _jpeg_frame(data)
    return None if frame is None else frame[:2]


def _gif_size(data: bytes) -> tuple[int, int]:
    """The logical screen of a GIF, grown to hold its first frame (a frame may be larger)."""
    width, height = struct.unpack("<HH", data[6:10])
    flags = data[10]
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    while position < len(data):
        block = data[position]
        if block == 0x2C and position + 9 <= len(data):  # the first image descriptor
            left, top, w, h = struct.unpack("<HHHH", data[position + 1:position + 9])
            return max(width, left + w), max(height, top + h)
        if block != 0x21 or position + 2 > len(data):
            break
        position += 2  # an extension: introducer and label, then sub-blocks up to an empty one
        while position < len(data) and data[position]:
            position += data[position] + 1
        position += 1
    return width, height


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def header_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from an image file's header, without decoding; ``None`` if unknown.

    PNG, JPEG, GIF and WebP are read here (a few bytes); other formats through PIL's lazy open.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_size(data)
    if data[:6] in _GIF_MAGIC and len(data) >= 13:
        return _gif_size(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # not an image PIL knows: decoding will say so
        return None


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"the image is {width}x{height} = {width * height:,} pixels, over the limit of "
                         f"{max_pixels:,} ({PreprocessSpec.key('max_pixels')})")


# -- decoding and conversions --------------------------------------------------------------------


def _pil_limit() -> float:
    """The most pixels PIL decodes (``Image.MAX_IMAGE_PIXELS``, which a user may change)."""
    from PIL import Image

    return float("inf") if Image.MAX_IMAGE_PIXELS is None else Image.MAX_IMAGE_PIXELS


def _pil_decode(data: bytes) -> torch.Tensor:
    """The first frame only, through PIL (for an animation, the others are never decoded)."""
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=("PNG",) if data[:8] == _png.MAGIC else None) as img:
        img.seek(0)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # a file's: as an array of its type
            return conform(np.asarray(img))
        # a (3, H, W) view: the caller makes it one block (conform)
        return torch.from_numpy(np.array(img if img.mode == "RGB" else img.convert("RGB"))).permute(2, 0, 1)


def pil_pixels(img: object) -> np.ndarray:
    """A PIL image's pixels as a new array (a user's dataset may give one): a 16-bit one's as
    ``(H, W)`` uint16 (scaled by 65535, as its file would be; RGB would clip it to 255), a float
    one whose values lie in [0, 1], some fractions, as they are (RGB would make them black); any
    other (a 0/1 mask made float by PIL too), a float
    one of PIL's own 0..255 values and a 32-bit integer one included, as ``(H, W, 3)`` uint8 RGB,
    which PIL converts it to.

    >>> from PIL import Image
    >>> pil_pixels(Image.fromarray(np.array([[0, 65535]], np.uint16))).tolist()
    [[0, 65535]]
    >>> pil_pixels(Image.new("L", (2, 1), 7)).shape, pil_pixels(Image.new("L", (2, 1), 7).convert("F"))[0, 0].tolist()
    ((1, 2, 3), [7, 7, 7])
    """
    if img.mode in ("I;16", "I;16B", "I;16L"):
        return np.array(img)
    if img.mode == "F":  # (fractions among them: PIL's own 0..255 floats are whole numbers)
        values = np.array(img)
        if values.size and 0 <= values.min() and values.max() <= 1 and np.any(values != np.round(values)):
            return values
    return np.array(img if img.mode == "RGB" else img.convert("RGB"))


#: Where a JPEG file's pixels may be decoded: called with the file's ``(height, width)``, it
#: gives a writable ``(H, W, 3)`` uint8 array and the ``(3, H, W)`` tensor view of the same
#: memory, or ``None`` (then the decoder makes its own array).
Into = Callable[[int, int], "tuple[np.ndarray, torch.Tensor] | None"]


def _decode_jpeg(data: bytes, max_pixels: int | None, into: Into | None = None) -> torch.Tensor | None:
    """A JPEG file's RGB pixels: a ``(3, H, W)`` view of the decoder's ``(H, W, 3)`` output, not
    copied into channel planes (a batch is, at once: :func:`stack_images`); decoded into
    ``into``'s array where it gives one (simplejpeg only).

    libjpeg-turbo decodes it, through simplejpeg where it is installed, else through
    torchvision's operator called directly (its Python wrapper costs as much again on a small
    image). Both run the same accurate decoding, so the pixels are the same to the bit;
    simplejpeg's is 1.2-1.3x as fast on 64 px images, 1.05-1.1x on baseline photos, the same on
    progressive ones (``bench/bench_jpeg.py``). A CMYK file, and one simplejpeg refuses or
    fails on (a truncated file, an unusual subsampling, pixels it cannot allocate), go to
    torchvision, which converts and judges them as it always has. ``None`` when the header gives no size or torchvision refuses the file
    too: the general path then decodes it (PIL) or says why it cannot."""
    frame = _jpeg_frame(data)
    if frame is None:
        return None
    width, height, components = frame
    _check_pixels(width, height, max_pixels)
    if components != 4 and _SIMPLEJPEG is not None:
        slot = None if into is None else into(height, width)
        try:
            if slot is not None:
                _SIMPLEJPEG.decode_jpeg(data, "RGB", buffer=slot[0])
                return slot[1]
            return torch.from_numpy(_SIMPLEJPEG.decode_jpeg(data, "RGB").transpose(2, 0, 1))  # numpy's view: 0.8 us less
        except Exception:  # a refusal, or pixels it cannot allocate: torchvision judges the file as before
            pass
    try:
        return (_JPEG_OPERATOR or _jpeg_operator())(torch.frombuffer(bytearray(data), dtype=torch.uint8), _RGB_MODE, False)
    except RuntimeError:
        return None


try:
    import simplejpeg as _SIMPLEJPEG
except ImportError:  # a machine without its wheel: torchvision's operator decodes every JPEG file
    _SIMPLEJPEG = None

_JPEG_OPERATOR = None


def _jpeg_operator():
    """torchvision's JPEG decoding operator (its overload: the packet's dispatch costs more),
    registered by importing ``torchvision.io``; kept once found."""
    global _JPEG_OPERATOR
    _torchvision_io()
    _JPEG_OPERATOR = torch.ops.image.decode_jpeg.default
    return _JPEG_OPERATOR


def _decode_bytes(data: bytes, max_pixels: int | None) -> torch.Tensor:
    size = header_size(data)
    if size is not None:
        _check_pixels(*size, max_pixels)
    png = data[:8] == _png.MAGIC
    # (PIL refuses a file of over twice its own limit, whatever source.preprocess.max_pixels allows)
    deep = png and (_png.sixteen_bit(data) or (size is not None and size[0] * size[1] > _pil_limit()))
    if deep and (why := _png.damage(data)) is not None:
        raise ImageError(f"cannot decode the PNG file ({len(data):,} bytes): {why}")
    # PIL decodes a GIF's first frame alone (torchvision decodes them all), and PNG files but the
    # 16-bit and the huge ones, the same to the bit: libpng's errors crash torchvision's decoder
    if not (data[:6] in _GIF_MAGIC or (png and not deep)):
        tvio = _torchvision_io()
        try:
            return tvio.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                     mode=tvio.ImageReadMode.RGB)
        except RuntimeError:  # a format it lacks, or a file it refuses: PIL may read it
            pass
    try:
        return _pil_decode(data)
    except Exception as exc:
        # PIL names the in-memory file it was given ("<_io.BytesIO object at 0x...>"): noise
        why = "not an image format torchvision or PIL reads" if "BytesIO" in str(exc) else str(exc)
        raise ImageError(f"cannot decode the image ({len(data):,} bytes, starting "
                         f"{data[:8]!r}): {type(exc).__name__}: {why}") from None


def conform(image: torch.Tensor | np.ndarray, channels_last: bool | None = None, channels: int = 3) -> torch.Tensor:
    """A ``(channels, H, W)`` image from a decoded one (see the module docstring for the rules).

    Args:
        image: ``(C, H, W)`` (tensors), ``(H, W, C)`` (arrays), ``(H, W)``, or ``(N, C, H, W)``
            frames of an animation.
        channels_last: whether a 3-d input is ``(H, W, C)``; default: for numpy arrays.
        channels: what the model takes: 3 (RGB; grey is repeated) or 1 (grey; RGB becomes its
            luma, 0.299 R + 0.587 G + 0.114 B).

    >>> conform(torch.zeros(4, 5, 6, dtype=torch.uint8)).shape
    torch.Size([3, 5, 6])
    >>> conform(np.full((2, 2), 65535, np.uint16)).max()
    tensor(1.)
    >>> conform(torch.zeros(5, 8, 8))
    Traceback (most recent call last):
    ...
    pipeline._images.ImageError: an image with 5 channels (shape (5, 8, 8)); expected 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA)
    """
    if channels_last is None:
        channels_last = isinstance(image, np.ndarray)
    if isinstance(image, np.ndarray):
        if image.dtype.kind in "iu" and image.dtype != np.uint8:
            _check_range(image, image.dtype)
            # (torch has few uint16 kernels: scaled here; negative values are black, as in a tensor)
            image = np.clip(image.astype(np.float32) / float(np.iinfo(image.dtype).max), 0, 1)
        image = torch.from_numpy(np.ascontiguousarray(image))
    elif image.is_signed() and not image.is_floating_point():  # negative values are black, before any luma
        image = image.clamp(min=0)
    shape = tuple(image.shape)
    if image.ndim == 4:  # the frames of an animation: the first
        image = image[0]
    elif image.ndim == 2:
        image = image.unsqueeze(0)
    elif image.ndim == 3 and channels_last:
        image = image.permute(2, 0, 1)
    elif image.ndim != 3:
        raise ImageError(f"an image of {image.ndim} dimensions (shape {shape}); expected (C, H, W), "
                         "(H, W, C) for arrays, or (H, W)")
    given = image.shape[0]
    if given in (2, 4):  # drop the alpha channel
        image = image[:-1]
    elif given not in (1, 3):
        raise ImageError(f"an image with {given} channels (shape {shape}); expected 1 (grey), "
                         "2 (grey + alpha), 3 (RGB) or 4 (RGBA)")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ImageError(f"an empty image (shape {shape})")
    if channels == 3 and image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    elif channels == 1 and image.shape[0] == 3:
        luma = torch.tensor([0.299, 0.587, 0.114], device=image.device).view(3, 1, 1)
        grey = (image.float() * luma).sum(0, keepdim=True)
        image = grey.round_().to(torch.uint8) if image.dtype == torch.uint8 else grey.to(image.dtype)
    if image.dtype == torch.uint8:
        return image.contiguous()
    if image.dtype == torch.bool:
        return image.to(torch.uint8).mul_(255).contiguous()
    if not image.is_floating_point():
        _check_range(image, image.dtype)
        info = torch.iinfo(image.dtype)
        return (image.float() / float(info.max)).clamp_(0, 1).contiguous()
    image = image.float()
    if not bool(torch.isfinite(image).all()):
        raise ImageError(f"a float image with NaN or infinite values (shape {shape})")
    _check_range(image, image.dtype)
    return image.contiguous()


#: What :func:`_check_range` has warned of in this process (each once), and the images of each
#: kind it has looked at: the first ones only (a pass over each image costs as much as its copy).
_WARNED: set[str] = set()
_LOOKED: dict[str, int] = {"float": 0, "integer": 0}
_LOOK_AT = 256


def _check_range(image: np.ndarray | torch.Tensor, dtype: object) -> None:
    """Warn, once per process and kind, of pixels that are likely not in the range they are
    taken in (they are used as they are): 8-bit values in a wider integer type, which its
    maximum scales to near black (``np.array(img, int)``, ``torch.randint``), and floats
    outside [0, 1] (0..255 floats, an image normalised already). The first images of each kind
    are looked at."""
    floating = isinstance(image, torch.Tensor) and image.is_floating_point()
    kind = "float" if floating else "integer"
    if kind in _WARNED or _LOOKED[kind] >= _LOOK_AT or not (image.size if isinstance(image, np.ndarray) else image.numel()):
        return
    _LOOKED[kind] += 1
    if isinstance(image, torch.Tensor) and image.dtype in (torch.uint16, torch.uint32, torch.uint64):
        image = image.to(torch.int64)  # (torch has no min or max of these)
    low, high = (float(image.min()), float(image.max())) if isinstance(image, np.ndarray) else \
        map(float, torch.aminmax(image))
    if floating and (low < 0 or high > 1):
        _WARNED.add(kind)
        log.warning("float pixels are taken to be in [0, 1], but an image holds values from %.3g to %.3g: "
                    "give 0..255 values as uint8, and an image normalised already with %s: none", low, high,
                    PreprocessSpec.key("normalize"))
    elif not floating and 1 < high and (high <= 255 or high < _int_max(dtype) / 256):
        _WARNED.add(kind)
        log.warning("an image of %s holds values up to %d only: integer pixels are scaled by their type's "
                    "maximum (%d), so it is nearly black to the model; give 8-bit pixels as uint8, 16-bit ones "
                    "as uint16", dtype, int(high), _int_max(dtype))


def _int_max(dtype: object) -> int:
    return int(torch.iinfo(dtype).max if isinstance(dtype, torch.dtype) else np.iinfo(dtype).max)


def decode(raw: RawImage | object, max_pixels: int | None = DEFAULT_MAX_PIXELS, channels: int = 3,
           into: Into | None = None) -> torch.Tensor:
    """The checked ``(channels, H, W)`` image of one raw image (on the CPU); raises
    :class:`ImageError` (or the read's ``OSError``) for one that cannot be used. A JPEG file is
    decoded into the array ``into`` gives for its size, if it gives one (see :data:`Into`)."""
    if isinstance(raw, Deferred):
        raw = raw.load()
    if isinstance(raw, (bytes, bytearray, memoryview)):
        data = bytes(raw)
        if not data:
            raise ImageError("an empty file (0 bytes)")
        if channels == 3 and data[:3] == _JPEG_MAGIC:  # the common case, on the shortest path
            image = _decode_jpeg(data, max_pixels, into)
            if image is not None:
                return image
        return conform(_decode_bytes(data, max_pixels), channels_last=False, channels=channels)
    if hasattr(raw, "convert") and hasattr(raw, "size"):  # a PIL image
        _check_pixels(*raw.size, max_pixels)
        return conform(pil_pixels(raw), channels=channels)
    if isinstance(raw, (np.ndarray, torch.Tensor)):
        height, width = (raw.shape[-2:] if isinstance(raw, torch.Tensor) and raw.ndim >= 3
                         else raw.shape[:2])
        _check_pixels(int(width), int(height), max_pixels)
        return conform(raw, channels=channels)
    raise ImageError(f"cannot use a {type(raw).__name__} as an image; expected encoded bytes, a "
                     "(C, H, W) tensor, an (H, W, C) or (H, W) array, or a PIL image")
