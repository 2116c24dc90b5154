"""The decoder's thread count: a fixed count against the count found by trial, on small and large images.

For 1, 2 and ``--threads`` threads, :class:`~pipeline._decoder.Decoder` decodes the same batch
of JPEG images again and again, once with that fixed count and once with the count its
:class:`~pipeline._tuner.ThreadTuner` finds (the trials included), on small images (``--small``
px, where Python around each image holds the GIL) and on photo-sized ones (500x375 of noise,
where the decoding runs in C without it). Images/s, and tuned / fixed.

    python bench/bench_decode_threads.py              # 16 threads, about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pipeline._decoder import Decoder  # noqa: E402


def jpeg(i: int, width: int, height: int) -> bytes:
    pixels = np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def rate(images: list[bytes], threads: int, tuned: bool, batches: int) -> float:
    """Images/s over ``batches`` calls after one warm-up call."""
    decoder = Decoder(threads)
    if not tuned:
        decoder.tuner.pick = lambda trial=True: threads
    decoder(images)
    started = time.perf_counter()
    for _ in range(batches):
        decoder(images)
    seconds = time.perf_counter() - started
    decoder.close()
    return len(images) * batches / seconds


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--small", type=int, default=64, help="the small images' size in px")
    parser.add_argument("--batches", type=int, default=128, help="batches of small images (large: a third)")
    args = parser.parse_args(argv)
    kinds = [(f"{args.small}x{args.small}", [jpeg(i, args.small, args.small) for i in range(256)], args.batches),
             ("500x375", [jpeg(i, 500, 375) for i in range(32)], max(1, args.batches // 3))]
    rows = []
    print(f"{os.cpu_count()} cores; JPEG images decoded by pipeline._decoder.Decoder, batches of 256 (small) "
          "and 32 (large)")
    for name, images, batches in kinds:
        for threads in sorted({1, 2, args.threads}):
            fixed, tuned = rate(images, threads, False, batches), rate(images, threads, True, batches)
            rows.append({"images": name, "threads": threads, "fixed": fixed, "tuned": tuned})
            print(f"{name:>8}, {threads:2d} threads: fixed {fixed:9,.0f} images/s, found by trial {tuned:9,.0f} "
                  f"({tuned / fixed:.2f}x)", flush=True)
    return rows


if __name__ == "__main__":
    main()
