"""An actor's image decoding: a pool of threads (and its GPU for JPEG files), batch by batch.

Decoding, resizing and cropping run on the thread that asks for a batch and up to
``threads - 1`` more (the actor's CPUs in all; the shards an actor runs at once each decode on
their own thread): torchvision's and PIL's decoders and torch's resize release the GIL, so they
run in parallel, and a file that a source hands over unread (a local file) is read by the thread
that decodes it.
How many of the threads decode is found by trial (:mod:`pipeline._tuner`): small images decode
fastest on one. On a CUDA device the JPEG files of a batch are decoded there in one call instead.

>>> import torch
>>> decoder = Decoder(threads=2, resize=8, crop=(8, 8))
>>> images = decoder([torch.zeros(3, 16, 20, dtype=torch.uint8), b"not an image"])
>>> tuple(images[0].shape), type(images[1]).__name__
((3, 8, 8), 'ImageError')
>>> decoder.close()
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import torch

from ._device import breaks_the_device, out_of_memory
from ._imports import lazy_import
from ._images import DEFAULT_MAX_PIXELS, ImageError, Into, conform, decode, header_size
from ._preprocess import resize_crop, resize_crop_many
from ._sources._base import Deferred, RawImage, is_sample_fault
from ._tuner import ThreadTuner

log = logging.getLogger(__name__)

_JPEG_MAGIC = b"\xff\xd8\xff"


class Decoder:
    """Turns a batch of raw images into resized, cropped ``(3, H, W)`` tensors, or the
    exception that says why one cannot be used (the caller records a bad sample).

    Args:
        threads: decoding threads (at least 1).
        device: where the model runs; on CUDA, JPEG files are decoded there.
        resize, crop, channels: as ``source.preprocess``.
        max_pixels: larger images are refused from their header, before decoding.
    """

    def __init__(self, threads: int = 1, device: torch.device | str = "cpu", resize: int | None = None,
                 crop: tuple[int, int] | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 channels: int = 3):
        self.threads = max(1, int(threads))
        self.device = torch.device(device)
        self._streams = threading.local()  # each calling thread's own stream for GPU decoding, made when first used
        self.resize, self.crop, self.max_pixels, self.channels = resize, crop, max_pixels, channels
        # a batch is decoded by the thread that asks for it, helped by up to ``threads - 1`` of
        # the pool's where no other batch uses them (see :meth:`_map`)
        self._pool = (ThreadPoolExecutor(self.threads - 1, thread_name_prefix="actmap-decode")
                      if self.threads > 1 else None)
        self._lock = threading.Lock()
        self._decoding = 0  # threads decoding now, the callers' own included
        self._batches = self._begun = 0  # CPU batches being decoded now, and begun so far
        self.tuner = ThreadTuner(self.threads)  # how many of them decode on the CPU: the fastest count
        self._claimed = False  # whether it holds this process's GPU JPEG decoding (until closed)

    def one(self, raw: RawImage, into: Into | None = None) -> torch.Tensor | Exception:
        """One image, decoded (into ``into``'s array, if it gives one), checked, resized and
        cropped; or the exception when the fault is the sample's (the caller records a bad
        sample). Other faults raise: the shard fails."""
        try:
            return resize_crop(decode(raw, self.max_pixels, self.channels, into), self.resize, self.crop)
        except Exception as exc:
            if is_sample_fault(exc):
                return exc
            raise

    def _map(self, fn, items: Sequence, threads: int | None = None) -> tuple[list, int]:
        """``fn`` over ``items``, in order, on up to ``threads`` threads (default: all), and how
        many worked: the caller's own, and as many of the pool's as no other batch is using.

        The shards an actor runs at once thus decode their batches on their own threads, as a
        plain loop per thread would, and a shard whose batch comes while the others read
        theirs has the pool's help. Two shards at once on 2 threads, sources alone against
        their floors (``bench/bench_sources.py``'s, the code before and after taking turns,
        medians of 7 rounds): Parquet 0.75x when the batches took turns on the pool while each
        caller waited, 0.91x now; JPEG folder 0.93x, 1.06x."""
        with self._lock:
            helpers = max(0, min((threads or self.threads), len(items), self.threads - self._decoding) - 1)
            self._decoding += 1 + helpers
        try:
            if not helpers:
                return [fn(item) for item in items], 1
            # the threads take the images one at a time from a shared position: none waits idle
            # at the end of a batch while another still decodes a chunk of several. After an
            # error they take no more, and the error is raised once all have stopped: no work
            # outlives the call.
            out: list = [None] * len(items)
            position = iter(range(len(items)))
            lock = threading.Lock()
            errors: list[BaseException] = []

            def work() -> None:
                while True:
                    with lock:
                        i = None if errors else next(position, None)
                    if i is None:
                        return
                    try:
                        out[i] = fn(items[i])
                    except BaseException as exc:
                        with lock:
                            errors.append(exc)
                        return

            helping = [self._pool.submit(work) for _ in range(helpers)]
            work()
            wait(helping)
            if errors:
                raise errors[0]
            return out, 1 + helpers
        finally:
            with self._lock:
                self._decoding -= 1 + helpers

    def __call__(self, raws: Sequence[RawImage]) -> list[torch.Tensor | Exception]:
        if self.device.type == "cuda" and self.device.index is None:  # torchvision's decoder is built anew
            self.device = torch.device("cuda", torch.cuda.current_device())  # for another name of a device
        if self.device.type == "cuda" and (self._claimed or _claim_gpu_decoding(self.device)):
            self._claimed = True
            return self._with_gpu_jpeg(list(raws))
        with self._lock:
            alone = not self._batches  # timed for the tuner only if no other batch shares the threads
            self._batches += 1
            self._begun += 1
            begun = self._begun
        try:
            wanted = self.tuner.pick(trial=alone)
            started = time.perf_counter()
            if self.resize is None and self.crop is None and self.channels == 3 and len(raws) > 1:
                slot = _Block(len(raws)).slot  # the batch's JPEG files of one size, decoded side by side
                out, threads = self._map(lambda i: self.one(raws[i], functools.partial(slot, i)), range(len(raws)),
                                         wanted)
            else:
                out, threads = self._map(self.one, raws, wanted)
            seconds = time.perf_counter() - started
        finally:
            with self._lock:
                self._batches -= 1
                alone = alone and self._begun == begun
        # (a batch timed while another shared the threads misled the tuner into too few)
        self.tuner.record(threads, len(raws), seconds if alone else None)
        return out

    def _with_gpu_jpeg(self, raws: list) -> list[torch.Tensor | Exception]:
        # the bytes first (read in parallel), then the JPEG files in one call on the GPU
        encoded = [isinstance(raw, (bytes, bytearray, memoryview, Deferred)) for raw in raws]
        raws = self._map(_load_jpeg, raws)[0]
        out: list[torch.Tensor | Exception | None] = [None] * len(raws)
        jpegs = []
        for i, raw in enumerate(raws):
            if isinstance(raw, Exception):
                out[i] = raw
            elif encoded[i] and isinstance(raw, torch.Tensor) and raw.ndim == 1:  # a JPEG file's bytes
                data = memoryview(raw.numpy())
                size = header_size(data)
                if size is not None and self.max_pixels is not None and size[0] * size[1] > self.max_pixels:
                    out[i] = self.one(bytes(data))  # raises the limit's error, without decoding
                else:
                    jpegs.append(i)
        if jpegs:
            for i, image in zip(jpegs, self._decode_on_gpu([raws[i] for i in jpegs]) or ()):
                out[i] = image
            for i in jpegs:
                if out[i] is None:
                    raws[i] = bytes(raws[i].numpy())
        left = [i for i, o in enumerate(out) if o is None]
        for i, image in zip(left, self._map(self.one, [raws[i] for i in left])[0]):
            out[i] = image
        return out

    def _decode_on_gpu(self, data: list[torch.Tensor]) -> list[torch.Tensor | None] | None:
        """JPEG files decoded, resized and cropped on the GPU: ``None`` for each file the GPU
        decoder refuses (a CMYK or damaged file: the caller decodes it on the CPU), or ``None``
        for all when the GPU has no memory for them.

        The work runs on a stream of the calling thread's own, so it overlaps the forwards on
        the worker's stream instead of waiting for them, and the shards decoding at once do not
        wait for each other's batches: torchvision's decoder allocates its outputs on the
        current stream and writes them from another, so that stream must hold no work but its
        own. Its results are complete when this returns, and their memory is not reused before
        the work the caller's stream queues on them is done.
        """
        consumer = torch.cuda.current_stream(self.device)
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            try:
                images = self._gpu_decoded(data)
                decoded = [i for i, image in enumerate(images) if image is not None]
                # resized in one call per image size (and at most GPU_RESIZE_BYTES of them), not one per image
                resized = resize_crop_many([conform(images[i], channels_last=False, channels=self.channels)
                                            for i in decoded], self.resize, self.crop, GPU_RESIZE_BYTES)
            except RuntimeError as exc:  # (large photos, other shards' batches on the device)
                if not out_of_memory(exc):
                    raise
                log.info("a batch's JPEG files go through the CPU: the GPU had no memory for them (%s)",
                         str(exc).splitlines()[0])
                return None
            done = torch.cuda.Event(blocking=True)  # waited for asleep: a spinning wait takes a core
            done.record(stream)
        done.synchronize()
        for i, image in zip(decoded, resized):
            image.record_stream(consumer)
            images[i] = image
        return images

    def _gpu_decoded(self, data: list[torch.Tensor], splits: list[int] | None = None) -> list[torch.Tensor | None]:
        """``data`` decoded on the GPU, ``None`` for the files its decoder refuses. One refused
        file fails the decoder's whole call: such a call is split in halves, and so on, until
        only the refused files are left (a few calls more for one file in a batch). ``splits``:
        how many splits are left; where many files are refused, those left go to the CPU rather
        than through a call each."""
        tvio = lazy_import("torchvision.io")
        if splits is None:
            splits = [2 * len(data).bit_length()]  # enough to single out two files
        try:
            return list(tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB, device=self.device))
        except RuntimeError as exc:  # (torchvision wraps every error of its decoding in one)
            if out_of_memory(exc) or breaks_the_device(exc):  # not a file's fault
                raise
            if len(data) == 1 or splits[0] <= 0:
                log.info("%d JPEG file(s) go through the CPU: the GPU decoder refused %s (%s)", len(data),
                         "it" if len(data) == 1 else "one of them", exc)
                return [None] * len(data)
        splits[0] -= 1
        half = len(data) // 2
        return self._gpu_decoded(data[:half], splits) + self._gpu_decoded(data[half:], splits)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._claimed:
            self._claimed = False
            _release_gpu_decoding()


#: Bytes of uint8 images resized in one call on a GPU: torchvision resizes them as float32 there,
#: four times as large, beside the decoded images and their stacked copy.
GPU_RESIZE_BYTES = 64 * 2**20

_gpu_decoding: torch.device | None = None  # the one device of this process that decodes JPEG files
_holders = 0  # the open decoders that decode on it
_told: set[torch.device] = set()  # the devices told they decode on the CPU
_GPU_DECODING_LOCK = threading.Lock()


def _claim_gpu_decoding(device: torch.device) -> bool:
    """Whether ``device`` (with its index) decodes this process's JPEG files: the first CUDA
    device that asks does (until every decoder on it is closed), the others decode on the CPU
    (local workers on several GPUs in one process), said once each. torchvision keeps one GPU JPEG decoder per
    process and builds it anew, leaking the last one, whenever a call names another device."""
    global _gpu_decoding, _holders
    with _GPU_DECODING_LOCK:
        if _gpu_decoding is None:
            _gpu_decoding = device
        if _gpu_decoding == device:
            _holders += 1
            return True
        told = device in _told
        _told.add(device)
    if not told:
        log.info("JPEG files for %s are decoded on the CPU: %s decodes this process's (torchvision keeps one GPU "
                 "decoder per process)", device, _gpu_decoding)
    return False


def _release_gpu_decoding() -> None:
    """A decoder that held the GPU decoding is closed: the last one lets another device have it."""
    global _gpu_decoding, _holders
    with _GPU_DECODING_LOCK:
        _holders -= 1
        if not _holders:
            _gpu_decoding = None


class _Block:
    """The memory a batch's JPEG files decode into: one ``(N, H, W, 3)`` uint8 block whose size
    is that of the first file decoded, so that the batch is a view of it
    (:func:`pipeline._preprocess.stack_images`), not a copy of its images, and no image has an
    array of its own. A file of another size is decoded into an array of its own.

    On the bench's 64 px JPEG files, decoding 256 and making them a normalised batch took 33
    instead of 43 us per image (one core). Pages of the block that no image fills are never
    touched; a block over :attr:`LIMIT` bytes is not made.

    >>> block = _Block(2)
    >>> array, image = block.slot(1, 4, 6)
    >>> array.shape, tuple(image.shape), block.slot(0, 5, 6)
    ((4, 6, 3), (3, 4, 6), None)
    """

    LIMIT = 256 * 2**20

    def __init__(self, images: int):
        self.images = images
        self._lock = threading.Lock()
        self._size: tuple[int, int] | None = None
        self._arrays: np.ndarray | None = None
        self._views: tuple[torch.Tensor, ...] = ()

    def slot(self, i: int, height: int, width: int) -> tuple[np.ndarray, torch.Tensor] | None:
        """Where image ``i`` of the batch is decoded, if its size is the block's (``partial(slot,
        i)`` is its :data:`~pipeline._images.Into`)."""
        if self._size is None:
            with self._lock:  # the decoding threads: the first file's size is the block's
                if self._size is None:
                    if self.images * height * width * 3 <= self.LIMIT:
                        arrays = np.empty((self.images, height, width, 3), np.uint8)
                        self._views = torch.from_numpy(arrays).permute(0, 3, 1, 2).unbind(0)
                        self._arrays = arrays
                    self._size = (height, width)  # last: a thread that sees it sees the block
        if self._arrays is None or self._size != (height, width):
            return None
        return self._arrays[i], self._views[i]


def _load_jpeg(raw: RawImage) -> RawImage | Exception:
    """``raw``, read if it is deferred; a JPEG file's bytes as a 1-d ``uint8`` tensor (what the
    GPU decoder takes: a local file is read by torchvision, with the GIL released); or the
    exception when the fault is the sample's."""
    if isinstance(raw, Deferred):
        if raw.path is not None:
            tvio = lazy_import("torchvision.io")
            try:
                data = tvio.read_file(raw.path)
            except RuntimeError:  # missing, forbidden, empty: the plain read below says which
                pass
            else:
                return data if bytes(data[:3].numpy()) == _JPEG_MAGIC else bytes(data.numpy())
        try:
            raw = raw.load()
        except OSError as exc:
            if is_sample_fault(exc):
                return exc
            raise
    if isinstance(raw, (bytes, bytearray, memoryview)) and bytes(raw[:3]) == _JPEG_MAGIC:
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return raw


__all__ = ["Decoder", "ImageError"]
