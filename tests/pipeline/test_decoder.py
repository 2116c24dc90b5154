"""The actor's decoding pool: order, bad images in place, parallel reads, threads used."""

import io
import threading

import torch
from PIL import Image

from pipeline._decoder import Decoder
from pipeline._images import ImageError
from pipeline._sources import Deferred


def _png(value: int, size=(12, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def test_results_keep_the_order_and_bad_images_stay_in_place():
    decoder = Decoder(threads=3, resize=4, crop=(4, 4))
    raws = [_png(i * 10) for i in range(12)]
    raws[5] = b"garbage"
    out = decoder(raws)
    decoder.close()
    assert isinstance(out[5], ImageError)
    for i, image in enumerate(out):
        if i != 5:
            assert image.shape == (3, 4, 4) and int(image[0, 0, 0]) == i * 10


def test_files_are_read_by_the_decoding_threads_in_parallel():
    barrier = threading.Barrier(3, timeout=10)
    seen = set()

    def read(i):
        def load():
            seen.add(threading.current_thread().name)
            barrier.wait()  # passes only if three reads run at once
            return _png(i)
        return Deferred(load)

    decoder = Decoder(threads=3)
    out = decoder([read(i) for i in range(3)])
    decoder.close()
    assert all(isinstance(o, torch.Tensor) for o in out)
    assert len(seen) == 3 and all(name.startswith("actmap-decode") for name in seen)


def test_a_failed_read_is_a_bad_image():
    def missing():
        raise FileNotFoundError("no such file: x.png")

    out = Decoder(threads=1)([Deferred(missing)])
    assert isinstance(out[0], FileNotFoundError)
