"""JPEG decoding on the CPU: simplejpeg against torchvision's operator, one image at a time.

Both run libjpeg-turbo's accurate decoding; what differs is the call around it. For each size
and chroma subsampling, the same photo-like image (smooth gradients and noise, quality 90) is
decoded by ``pipeline._images.decode`` with simplejpeg and with torchvision's operator alone
(as on a machine without simplejpeg), in one thread, interleaved; the pixels of the two are
compared to the bit. Microseconds per image (the best of ``--repeats`` rounds) and the saving.

    python bench/bench_jpeg.py            # about 20 s
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pipeline import _images  # noqa: E402


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients with noise: what a JPEG encoder meets in a photo."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / 17 + c) * np.cos(y / 23 - c) for c in range(3)], -1) * 100 + 128
    noise = np.random.default_rng(seed).normal(0, 12, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90, **options)
    return buf.getvalue()


def per_image(data: bytes, count: int, simplejpeg) -> float:
    """Microseconds per ``decode`` of ``data``, with ``simplejpeg`` (the module, or None)."""
    saved = _images._SIMPLEJPEG
    _images._SIMPLEJPEG = simplejpeg
    try:
        _images.decode(data)
        started = time.perf_counter()
        for _ in range(count):
            _images.decode(data)
        return (time.perf_counter() - started) / count * 1e6
    finally:
        _images._SIMPLEJPEG = saved


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["64x64", "500x375", "1024x768"], help="WIDTHxHEIGHT")
    parser.add_argument("--pixels", type=int, default=4_000_000, help="pixels decoded per round and case")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    simplejpeg = _images._SIMPLEJPEG
    if simplejpeg is None:
        parser.error("simplejpeg is not installed: pip install simplejpeg")
    torch.set_num_threads(1)
    rows = []
    print(f"JPEG decoding, one thread, microseconds per image (best of {args.repeats}); simplejpeg "
          f"{simplejpeg.__version__}, torch {torch.__version__}")
    for size in args.sizes:
        width, height = map(int, size.split("x"))
        pixels = photo(width, height)
        count = max(1, args.pixels // (width * height))
        for name, options in [("4:4:4", {"subsampling": 0}), ("4:2:2", {"subsampling": 1}),
                              ("4:2:0", {"subsampling": 2}), ("4:2:0 progressive", {"subsampling": 2, "progressive": True})]:
            data = encode(pixels, **options)
            _images._SIMPLEJPEG = None
            try:
                reference = _images.decode(data)
            finally:
                _images._SIMPLEJPEG = simplejpeg
            same = torch.equal(_images.decode(data), reference)
            timings = {"simplejpeg": [], "torchvision": []}
            for _ in range(args.repeats):  # interleaved: the host's noise falls on both alike
                timings["simplejpeg"].append(per_image(data, count, simplejpeg))
                timings["torchvision"].append(per_image(data, count, None))
            fast, slow = min(timings["simplejpeg"]), min(timings["torchvision"])
            rows.append({"size": size, "subsampling": name, "bytes": len(data), "simplejpeg_us": fast,
                         "torchvision_us": slow, "same_pixels": same})
            print(f"{size:>9} {name:<18} {len(data):>9,} bytes: simplejpeg {fast:9.1f} us, torchvision "
                  f"{slow:9.1f} us, {slow - fast:6.1f} us less ({slow / fast:.2f}x); same pixels: {same}",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
