import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline._preprocess import decode, decode_many, resize_crop, to_model_input


def _encoded(fmt: str, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (10, 6), 200 if mode == "L" else (200, 10, 30)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "GIF"])
def test_decode_formats_to_rgb(fmt):
    image = decode(_encoded(fmt))
    assert image.shape == (3, 6, 10) and image.dtype == torch.uint8


def test_decode_grayscale_file_becomes_rgb():
    assert decode(_encoded("PNG", mode="L")).shape == (3, 6, 10)


def test_decode_arrays_and_tensors():
    assert decode(np.zeros((6, 10, 3), np.uint8)).shape == (3, 6, 10)
    assert decode(np.zeros((6, 10), np.uint8)).shape == (1, 6, 10)
    t = torch.rand(3, 4, 5)
    assert decode(t) is t
    with pytest.raises(ValueError, match="must be \\(C, H, W\\)"):
        decode(torch.zeros(1, 3, 4, 5))


def test_decode_many_reports_bad_files_in_place():
    out = decode_many([_encoded("PNG"), b"garbage", _encoded("JPEG")], torch.device("cpu"))
    assert isinstance(out[0], torch.Tensor) and isinstance(out[2], torch.Tensor)
    assert isinstance(out[1], Exception)


def test_resize_crop():
    image = torch.zeros(3, 60, 90, dtype=torch.uint8)
    assert resize_crop(image, 30, None).shape == (3, 30, 45)
    assert resize_crop(image, 30, (20, 24)).shape == (3, 20, 24)
    assert resize_crop(image, None, None) is image


def test_to_model_input_scales_and_normalises():
    batch = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    x = to_model_input(batch, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    assert torch.allclose(x, torch.ones_like(x))
    assert to_model_input(torch.rand(1, 3, 2, 2), None, channels_last=True).is_contiguous(
        memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="normalisation has 3 channels but the images have 1"):
        to_model_input(torch.zeros(1, 1, 2, 2), ((0.5,) * 3, (0.5,) * 3))
