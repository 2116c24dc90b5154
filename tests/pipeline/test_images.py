"""The image gate: sizes from headers, decoding, the conversions and the refusals."""

import io
import struct
import subprocess
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import _images
from pipeline._images import ImageError, _decode_bytes, conform, decode, header_size
from pipeline._sources import Deferred

ROOT = Path(__file__).resolve().parents[2]


def _encoded(fmt: str, mode="RGB", size=(10, 6), **kwargs) -> bytes:
    buf = io.BytesIO()
    colour = 200 if mode in ("L", "I;16") else (200, 10, 30, 128)[: len(mode)]
    Image.new(mode, size, colour).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP"])
def test_formats_decode_to_rgb_and_their_header_gives_the_size(fmt):
    data = _encoded(fmt)
    image = decode(data)
    assert image.shape == (3, 6, 10) and image.dtype == torch.uint8
    assert header_size(data) == (10, 6)


def test_a_png_signature_before_something_else_is_not_taken_for_a_huge_image():
    # an error page behind the signature was read as a size of 1919906336x892351264, and refused
    # as over source.preprocess.max_pixels: the wrong fix to point at
    data = b"\x89PNG\r\n\x1a\n<html><body>404 Not Found</body></html>"
    assert header_size(data) is None
    with pytest.raises(ImageError, match="not an image format torchvision or PIL reads"):
        decode(data)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P"])
def test_other_modes_become_rgb(mode):
    assert decode(_encoded("PNG", mode=mode)).shape == (3, 6, 10)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png16(width: int, height: int, colour: int = 2, rows: bytes | None = None, interlace: int = 0,
           damage_at: int | None = None, between: bytes | None = None) -> bytes:
    """A 16-bit PNG file written by hand (PIL writes no 16-bit colour): random pixels, or ``rows``
    as the raw (filtered) pixel data; ``damage_at``: a byte of the compressed data flipped (the
    chunk's CRC made right for it); ``between``: a chunk between two halves of that data."""
    samples = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    if rows is None:
        pixels = np.random.default_rng(width * height).integers(0, 65536, (height, width * samples)).astype(">u2")
        rows = b"".join(b"\x00" + row.tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, interlace)
    compressed = bytearray(zlib.compress(rows))
    if damage_at is not None:
        compressed[damage_at] ^= 0xFF
    half = len(compressed) // 2 if between else len(compressed)
    pixels = _chunk(b"IDAT", bytes(compressed[:half])) + (between + _chunk(b"IDAT", bytes(compressed[half:])) if between else b"")
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + pixels + _chunk(b"IEND", b"")


@pytest.mark.parametrize("mode, options", [("RGB", {}), ("RGBA", {}), ("L", {}), ("LA", {}), ("1", {}),
                                           ("P", {}), ("P", {"transparency": 3}), ("P", {"bits": 4}),
                                           ("L", {"transparency": 7}), ("RGB", {"transparency": (1, 2, 3)})])
def test_png_files_give_torchvisions_pixels(mode, options):
    # PNG files are decoded by PIL (torchvision's decoder crashes on damaged ones): the same pixels
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (13, 17, 3), dtype=np.uint8))
    image = image.quantize(12 if options.get("bits") else 50) if mode == "P" else image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG", **options)
    want = _images._torchvision_io().decode_image(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8),
                                                  mode=_images._torchvision_io().ImageReadMode.RGB)
    for channels in (3, 1):
        assert torch.equal(decode(buf.getvalue(), channels=channels), conform(want, channels=channels))


def test_damaged_png_files_are_bad_images_not_a_crash(tmp_path):
    # libpng's errors while it reads pixel rows crashed the process in torchvision's decoder
    # (a segmentation fault): one damaged file killed every actor that tried it, and the run
    good = _encoded("PNG", size=(40, 30))
    at = good.index(b"IDAT") + 12
    damaged_pixels = good[:at] + bytes(b ^ 0x5A for b in good[at:at + 20]) + good[at + 20:]
    crc_only = bytearray(good)
    crc_only[good.index(b"IEND") - 5] ^= 0xFF  # the IDAT chunk's CRC; its pixel data intact
    deep = _png16(9, 7)
    deep_crc = bytearray(deep)
    deep_crc[deep.index(b"IEND") - 5] ^= 0xFF
    files = {
        "pixels": damaged_pixels, "crc": bytes(crc_only), "deep crc": bytes(deep_crc),
        "deep filter": _png16(3, 2, rows=b"\x00" + bytes(18) + b"\x09" + bytes(18)),
        "deep short": _png16(3, 2, rows=b"\x00" + bytes(18)),
        "deep inflate": _png16(9, 7, damage_at=40),
        "deep interlaced short": _png16(9, 7, interlace=1, rows=bytes(30)),
        # (libpng reads one unbroken run of IDAT chunks: "Not enough image data", a crash too)
        "deep split": _png16(9, 7, between=_chunk(b"tEXt", b"a\x00b")),
    }
    for name, data in files.items():
        (tmp_path / f"{name}.png").write_bytes(data)
    script = (f"import pathlib, sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom pipeline._images import decode\n"
              f"for path in sorted(pathlib.Path({str(tmp_path)!r}).glob('*.png')):\n"
              "    try:\n        image = decode(path.read_bytes())\n        print(path.stem, '->', tuple(image.shape))\n"
              "    except Exception as exc:\n        print(path.stem, '->', f'{type(exc).__name__}: {exc}')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    said = dict(line.split(" -> ", 1) for line in done.stdout.splitlines())
    assert said["crc"] == "(3, 30, 40)"  # PIL reads what libpng refused: the pixels are intact
    assert said["pixels"].startswith("ImageError: cannot decode the image") and "broken data stream" in said["pixels"]
    assert said["deep crc"] == "ImageError: cannot decode the PNG file (453 bytes): the IDAT chunk at byte 33 fails its CRC check"
    assert said["deep filter"].endswith("row 1 of its pixels has filter type 9 (0 to 4 are valid)")
    assert said["deep short"].endswith("its pixel data holds 19 bytes, fewer than its 3x2 pixels need")
    assert said["deep interlaced short"].endswith("its pixel data holds 30 bytes, fewer than its 9x7 pixels need")
    assert said["deep inflate"].startswith("ImageError: cannot decode the PNG file (")
    assert said["deep split"].endswith("its IDAT chunks are not one after another (another chunk before byte 258)")
    assert "its pixel data does not inflate (Error -3 while decompressing data" in said["deep inflate"]
    image = decode(deep)  # and a sound one decodes as torchvision decodes it
    want = _images._torchvision_io().decode_image(torch.frombuffer(bytearray(deep), dtype=torch.uint8))
    assert torch.equal(image, conform(want))


def test_a_png_over_pils_own_limit_decodes_where_max_pixels_allows_it(monkeypatch):
    # PIL refuses a file of over twice its Image.MAX_IMAGE_PIXELS: such files go the checked
    # torchvision way, as they went before PIL decoded PNG files
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)
    data = _encoded("PNG", size=(10, 6))
    want = _images._torchvision_io().decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    assert torch.equal(decode(data, max_pixels=None), want)


def test_cmyk_jpeg_becomes_rgb():
    assert decode(_encoded("JPEG", mode="CMYK")).shape == (3, 6, 10)


@pytest.fixture(params=["simplejpeg", "torchvision"])
def jpeg_decoder(request, monkeypatch):
    """Each test of the JPEG short path runs with simplejpeg and with torchvision's operator
    alone (a machine without simplejpeg's wheel)."""
    if request.param == "torchvision":
        monkeypatch.setattr(_images, "_SIMPLEJPEG", None)
    return request.param


@pytest.mark.parametrize("mode, size", [("RGB", (64, 48)), ("L", (31, 17)), ("CMYK", (10, 6)), ("RGB", (1, 1))])
def test_jpeg_files_take_the_short_path_to_the_same_pixels(mode, size, jpeg_decoder):
    # the decoder's operator called directly, its (H, W, 3) output left as it lies: the values
    # are those of the general path (torchvision's wrapper, then the conversions)
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode=mode).save(buf, format="JPEG")
    data = buf.getvalue()
    image = decode(data)
    general = conform(_decode_bytes(data, None), channels_last=False)
    assert image.shape == general.shape == (3, size[1], size[0]) and image.dtype == torch.uint8
    assert torch.equal(image, general)
    assert torch.equal(decode(bytearray(data)), general) and torch.equal(decode(memoryview(data)), general)
    assert torch.equal(decode(data, channels=1), conform(general, channels=1))


def _photo(width: int, height: int) -> np.ndarray:
    """Smooth colour gradients with noise: what a JPEG encoder meets in a photo."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / 17 + c) * np.cos(y / 23 - c) for c in range(3)], -1) * 100 + 128
    noise = np.random.default_rng(width).normal(0, 12, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [(64, 64), (333, 217)])
@pytest.mark.parametrize("options", [{"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2},
                                     {"subsampling": 2, "progressive": True}, {"mode": "L"}, {"mode": "CMYK"}])
def test_simplejpeg_gives_torchvisions_pixels_and_leaves_cmyk_to_it(size, options, monkeypatch):
    assert _images._SIMPLEJPEG is not None  # a dependency of the package
    options = dict(options)
    image = Image.fromarray(_photo(*size)).convert(options.pop("mode", "RGB"))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **options)
    data = buf.getvalue()
    calls = []
    real = _images._SIMPLEJPEG
    monkeypatch.setattr(_images, "_SIMPLEJPEG",
                        types.SimpleNamespace(decode_jpeg=lambda d, c: calls.append(c) or real.decode_jpeg(d, c)))
    fast = decode(data)
    monkeypatch.setattr(_images, "_SIMPLEJPEG", None)
    assert torch.equal(fast, decode(data)) and fast.shape == (3, size[1], size[0])
    assert calls == ([] if image.mode == "CMYK" else ["RGB"])  # simplejpeg's CMYK conversion is not torchvision's


@pytest.mark.parametrize("error", [ValueError("Premature end of JPEG file"), MemoryError(),
                                   RuntimeError("could not create JPEG decoder")])
def test_whatever_simplejpeg_raises_torchvision_judges_the_file(error, monkeypatch):
    def failing(data, colorspace):
        raise error

    data = _encoded("JPEG", size=(40, 30))
    expected = decode(data)
    monkeypatch.setattr(_images, "_SIMPLEJPEG", types.SimpleNamespace(decode_jpeg=failing))
    assert torch.equal(decode(data), expected)


def test_a_jpeg_file_the_decoder_refuses_goes_the_general_way(jpeg_decoder):
    # refused by torchvision's decoder, then by PIL: the general path's error, naming the bytes
    data = _encoded("JPEG", size=(40, 30))
    for broken in (data[: len(data) // 2], data[:40]):  # cut in the pixels; in the header
        with pytest.raises(ImageError, match=rf"cannot decode the image \({len(broken)} bytes, starting"):
            decode(broken)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (10, 12), (i * 100, 0, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    image = decode(buf.getvalue())
    assert image.shape == (3, 12, 10)
    assert int(image[0].float().mean()) < 20  # the first frame is the dark one


def test_16_bit_png_is_scaled_by_its_range():
    white = np.full((4, 5), 65535, np.uint16)
    grey = np.full((4, 5), 32768, np.uint16)
    for array, expected in ((white, 1.0), (grey, 32768 / 65535)):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        image = decode(buf.getvalue())
        assert image.shape == (3, 4, 5) and image.dtype == torch.float32
        assert torch.allclose(image, torch.full_like(image, expected), atol=1e-4)


def test_integer_arrays_and_tensors_are_scaled_by_their_range():
    assert decode(np.full((3, 3), 65535, np.uint16)).max() == 1.0
    assert decode(torch.full((3, 2, 2), 2**31 - 1, dtype=torch.int32)).max() == 1.0
    assert decode(np.full((3, 3, 3), 255, np.uint8)).dtype == torch.uint8
    # negative values of a signed type are black, from an array as from a tensor
    signed = np.array([[-32768, -1], [0, 32767]], np.int16)
    expected = [[0.0, 0.0], [0.0, 1.0]]
    assert decode(signed)[0].tolist() == decode(torch.from_numpy(signed))[0].tolist() == expected
    rgb = np.array([[[-32768, 32767, 0]]], np.int16)  # and before a grey conversion
    from_tensor = decode(torch.from_numpy(rgb).permute(2, 0, 1), channels=1).item()
    assert decode(rgb, channels=1).item() == pytest.approx(from_tensor, abs=1e-4)  # (0.288 when clamped after)


def test_arrays_tensors_and_pil_images():
    assert decode(np.zeros((6, 10, 3), np.uint8)).shape == (3, 6, 10)
    assert decode(np.zeros((6, 10), np.float32)).shape == (3, 6, 10)  # 2-d floats: grey
    assert decode(torch.rand(4, 6, 10)).shape == (3, 6, 10)  # RGBA tensor
    assert decode(Image.new("RGBA", (10, 6))).shape == (3, 6, 10)
    assert decode(Deferred(lambda: _encoded("PNG"))).shape == (3, 6, 10)


def test_grey_models_get_one_channel():
    rgb = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2)
    grey = conform(rgb, channels=1)
    assert grey.shape == (1, 2, 2) and int(grey[0, 0, 0]) == round(0.299 * 255)
    assert decode(_encoded("PNG", mode="L"), channels=1).shape == (1, 6, 10)


@pytest.mark.parametrize("raw, message", [
    (torch.zeros(5, 4, 4), "5 channels"),
    (torch.zeros(1, 1, 2, 3, 4), "5 dimensions"),
    (torch.zeros(3, 0, 4), "empty image"),
    (torch.full((3, 2, 2), float("nan")), "NaN or infinite"),
    (b"garbage bytes", "cannot decode the image (13 bytes"),
    (b"", "an empty file (0 bytes)"),
    ("a string", "cannot use a str as an image"),
])
def test_what_cannot_be_used_is_refused_with_the_reason(raw, message):
    with pytest.raises(ImageError) as caught:
        decode(raw)
    assert message in str(caught.value)
    assert "BytesIO object at" not in str(caught.value)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming ``width`` x ``height``: no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def test_a_decompression_bomb_is_refused_from_its_header():
    bomb = _png_header_only(14_000, 14_000)  # would decode to 588 MB of RGB
    with pytest.raises(ImageError, match=r"14000x14000 = 196,000,000 pixels, over the limit of 89,478,485"):
        decode(bomb)
    with pytest.raises(ImageError, match="over the limit of 100"):
        decode(_encoded("JPEG", size=(20, 20)), max_pixels=100)
    with pytest.raises(ImageError, match="over the limit"):
        decode(np.zeros((20, 20, 3), np.uint8), max_pixels=100)
    assert decode(_encoded("JPEG", size=(20, 20)), max_pixels=None).shape == (3, 20, 20)


def test_jpeg_header_with_other_segments_first():
    img = Image.new("RGB", (33, 17))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=b"Exif\x00\x00" + b"\x00" * 200, icc_profile=b"\x00" * 300)
    assert header_size(buf.getvalue()) == (33, 17)


def _gif_with_frame(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A GIF whose first frame is larger than its logical screen (the header claims ``screen``)."""
    buf = io.BytesIO()
    Image.new("P", frame).save(buf, format="GIF")
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", *screen)
    return bytes(data)


def test_a_gif_frame_larger_than_its_screen_is_measured_by_the_frame():
    gif = _gif_with_frame((1, 1), (400, 300))
    assert header_size(gif) == (400, 300)
    with pytest.raises(ImageError, match="400x300 = 120,000 pixels, over the limit of 1,000"):
        decode(gif, max_pixels=1000)


def test_only_the_first_frame_of_an_animation_is_decoded(monkeypatch):
    import torchvision.io

    frames = [Image.new("RGB", (20, 10), (i * 10, 0, 0)) for i in range(30)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    monkeypatch.setattr(torchvision.io, "decode_image", lambda *a, **k: pytest.fail("decoded every frame"))
    assert decode(buf.getvalue()).shape == (3, 10, 20)


def test_pixels_likely_out_of_the_range_they_are_taken_in_are_warned_of_once(monkeypatch, caplog):
    # 0..255 in an int64 array (np.array(img, int), torch.randint) is scaled by int64's maximum:
    # nearly black, which the values say nothing of; floats are taken to be in [0, 1]
    from pipeline import _images

    monkeypatch.setattr(_images, "_WARNED", set())
    monkeypatch.setattr(_images, "_LOOKED", {"float": 0, "integer": 0})
    caplog.set_level("WARNING", "pipeline._images")
    for image in (np.full((4, 4, 3), 200, np.uint8), torch.rand(3, 4, 4), np.full((4, 4), 60_000, np.uint16)):
        conform(image)
    assert not caplog.records
    conform(np.full((4, 4, 3), 200, np.int64))
    conform(torch.full((3, 4, 4), 200, dtype=torch.int32))
    conform(torch.full((3, 4, 4), 200.0))
    conform(torch.full((3, 4, 4), -1.5))
    assert [r.getMessage()[:60] for r in caplog.records] == [
        "an image of int64 holds values up to 200 only: integer pixel",
        "float pixels are taken to be in [0, 1], but an image holds v"]
