"""The actor's decoding pool: order, bad images in place, parallel reads, threads used; the
GPU path's logic (run here with the CPU standing in for the GPU decoder)."""

import contextlib
import io
import threading
import time

import pytest
import torch
import torchvision.io as tvio
from PIL import Image

from pipeline import _decoder
from pipeline._decoder import Decoder
from pipeline._images import ImageError
from pipeline._preprocess import resize_crop
from pipeline._sources import Deferred, GeneratedSource
from pipeline._sources.generated import generate


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
    # the caller's own thread and two of the pool's
    assert seen - {threading.current_thread().name} and len(seen) == 3
    assert sum(name.startswith("actmap-decode") for name in seen) == 2


def test_an_error_that_is_not_the_samples_stops_the_threads_and_is_raised_once_they_have():
    reads, gate = [], threading.Event()

    def read(i):
        def load():
            reads.append(i)
            if i == 0:
                raise ConnectionResetError("the connection dropped")  # not the sample's fault: raised
            gate.wait(timeout=10)
            return _png(i)
        return Deferred(load)

    decoder = Decoder(threads=2)
    decoder.tuner.pick = lambda trial=True: 2
    threading.Timer(0.2, gate.set).start()  # the other thread's read is still going when 0 fails
    with pytest.raises(ConnectionResetError):
        decoder([read(i) for i in range(64)])
    done = list(reads)
    assert len(done) <= 3, f"the threads kept taking images after the error: {done}"
    time.sleep(0.3)
    assert reads == done, "work went on after the call returned"
    decoder.close()


def test_a_failed_read_is_a_bad_image():
    def missing():
        raise FileNotFoundError("no such file: x.png")

    out = Decoder(threads=1)([Deferred(missing)])
    assert isinstance(out[0], FileNotFoundError)


def _jpeg(value: int, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value, 255 - value, value // 2)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class _Calls(list):
    recorded: list
    synced: list  # the streams waited for, in order
    devices: list  # the devices the decoder was given, in order


@pytest.fixture
def cpu_for_gpu(monkeypatch):
    """The GPU decoder's path with the CPU doing the decoding (no GPU here)."""
    calls = _Calls()
    real = tvio.decode_jpeg

    def decode_jpeg(data, mode, device):
        assert str(device).startswith("cuda") and all(t.dtype == torch.uint8 and t.ndim == 1 for t in data)
        calls.append(len(data))
        calls.devices.append(str(device))
        return real(data, mode=mode)

    class Stream:  # what the decoder asks of its stream
        def __init__(self, device=None):
            self.device = device

    class Event:  # how it waits for its stream: asleep (a spinning wait takes a core)
        def __init__(self, blocking=False):
            assert blocking, "a blocking event"
            self.stream = None

        def record(self, stream):
            self.stream = stream

        def synchronize(self):
            calls.append("synchronize")
            calls.synced.append(self.stream)

    recorded = []
    monkeypatch.setattr(tvio, "decode_jpeg", decode_jpeg)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(_decoder, "_gpu_decoding", None)  # (no device of this process has claimed it)
    monkeypatch.setattr(_decoder, "_told", set())
    monkeypatch.setattr(_decoder, "_holders", 0)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "the worker's stream")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: recorded.append(stream), raising=False)
    calls.recorded, calls.synced, calls.devices = recorded, [], []
    return calls


def test_the_gpu_path_decodes_a_batch_of_jpeg_files_in_one_call_like_the_cpu(tmp_path, cpu_for_gpu):
    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg(i * 40, size=(40, 30) if i % 2 else (36, 48)))
    (tmp_path / "png.jpg").write_bytes(_png(7))  # a PNG under a JPEG name
    raws = [Deferred((tmp_path / f"{i}.jpg").read_bytes, str(tmp_path / f"{i}.jpg")) for i in range(6)]
    raws += [Deferred(lambda: (tmp_path / "png.jpg").read_bytes(), str(tmp_path / "png.jpg")),
             _jpeg(200),                                      # bytes, as a Parquet source gives them
             torch.full((3, 20, 20), 9, dtype=torch.uint8),  # an image already decoded
             Deferred(lambda: open(tmp_path / "gone.jpg", "rb").read(), str(tmp_path / "gone.jpg")),
             b"\xff\xd8\xff" + b"\x00" * 10]                 # a JPEG's start, then nothing: a bad sample
    gpu = Decoder(threads=2, device="cuda", resize=16, crop=(12, 12))
    cpu = Decoder(threads=2, resize=16, crop=(12, 12))
    # without the broken file, then with it: it fails the decoder's call, which is split in
    # halves until the broken file is alone, and only it goes through the CPU
    for batch, calls in ((raws[:-1], [7, "synchronize"]),
                         (raws, [7, "synchronize", 8, 4, 4, 2, 2, 1, 1, "synchronize"])):
        got, expected = gpu(batch), cpu(batch)
        for i, (g, e) in enumerate(zip(got, expected)):
            if isinstance(e, Exception):
                assert type(g) is type(e), i
            else:
                assert torch.equal(g, e), i
        assert isinstance(got[9], FileNotFoundError)
        assert cpu_for_gpu == calls  # one decoder call per batch of good files
    assert isinstance(got[10], ImageError)
    # the GPU's results: their stream waited for, their memory kept for the worker's stream
    assert cpu_for_gpu.recorded == ["the worker's stream"] * 14
    gpu.close(), cpu.close()


def test_the_gpu_path_refuses_an_oversized_jpeg_from_its_header(tmp_path, cpu_for_gpu):
    path = tmp_path / "big.jpg"
    path.write_bytes(_jpeg(10, size=(64, 64)))
    raws = [Deferred(path.read_bytes, str(path)), _jpeg(20, size=(8, 8))]
    out = Decoder(threads=1, device="cuda", max_pixels=32 * 32)(raws)
    assert isinstance(out[0], ImageError) and "64x64" in str(out[0])
    assert out[1].shape == (3, 8, 8) and cpu_for_gpu == [1, "synchronize"]


def test_the_gpu_path_paints_generated_images_on_the_threads_and_decodes_only_jpeg_files(cpu_for_gpu):
    generated = GeneratedSource(4, 24, seed=3).read(range(4))
    raws = [s.image for s in generated] + [_jpeg(60)]
    gpu = Decoder(threads=2, device="cuda", resize=16, crop=(12, 12))
    out = gpu(raws)
    for sample, image in zip(generated, out):
        assert torch.equal(image, resize_crop(generate(sample.index, 24, 3)[0], 16, (12, 12)))
    assert out[4].shape == (3, 12, 12) and cpu_for_gpu == [1, "synchronize"]  # the JPEG file alone
    gpu.close()


def test_each_shards_thread_decodes_on_a_gpu_stream_of_its_own(cpu_for_gpu):
    # one stream made when first needed and shared by the shards at once: two first calls
    # could each make one, and a thread then waited for the other's stream, not its own
    gpu = Decoder(threads=2, device="cuda")
    both = threading.Barrier(2, timeout=10)

    def shard():
        both.wait()  # the two first calls at once
        for _ in range(2):
            gpu([_jpeg(1), _jpeg(2)])

    threads = [threading.Thread(target=shard) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    gpu.close()
    assert len(cpu_for_gpu.synced) == 4 and len(set(map(id, cpu_for_gpu.synced))) == 2


def test_one_gpu_of_a_process_decodes_its_jpeg_files_the_others_use_the_cpu(cpu_for_gpu, caplog):
    # torchvision keeps one GPU decoder per process, built anew (the last one leaked) whenever
    # a call names another device: local workers on two GPUs took turns rebuilding it
    first, second = Decoder(threads=1, device="cuda"), Decoder(threads=1, device="cuda:1")
    with caplog.at_level("INFO", logger="pipeline._decoder"):
        for _ in range(2):
            assert first([_jpeg(1)])[0].shape == second([_jpeg(1)])[0].shape == (3, 30, 40)
    assert cpu_for_gpu == [1, "synchronize"] * 2, "cuda:1 decodes on the CPU"
    told = [r.getMessage() for r in caplog.records if "decoded on the CPU" in r.getMessage()]
    assert told == ["JPEG files for cuda:1 are decoded on the CPU: cuda:0 decodes this process's (torchvision keeps "
                    "one GPU decoder per process)"]
    same = Decoder(threads=1, device="cuda:0")  # 'cuda' was the current device, cuda:0
    same([_jpeg(1)])
    assert cpu_for_gpu[-2:] == [1, "synchronize"], "cuda:0 decodes on the GPU, as cuda did"
    assert set(cpu_for_gpu.devices) == {"cuda:0"}, "torchvision is given one name: it rebuilds its decoder for another"
    same.close()
    first.close()  # the next run of this process may decode on another GPU
    second([_jpeg(1)])
    assert cpu_for_gpu[-2:] == [1, "synchronize"] and _decoder._gpu_decoding == torch.device("cuda:1")
    second.close()
    assert _decoder._gpu_decoding is None


def test_a_batch_the_gpu_has_no_memory_for_goes_through_the_cpu(cpu_for_gpu, monkeypatch, caplog):
    def no_memory(*args):  # resizing large photos as float32 (the decoding went well)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 37.50 GiB")

    monkeypatch.setattr(_decoder, "resize_crop_many", no_memory)
    gpu, cpu = Decoder(threads=1, device="cuda", resize=16), Decoder(threads=1, resize=16)
    with caplog.at_level("INFO", logger="pipeline._decoder"):
        got = gpu([_jpeg(3), _jpeg(4)])
    assert all(torch.equal(g, e) for g, e in zip(got, cpu([_jpeg(3), _jpeg(4)])))
    assert "the GPU had no memory for them (CUDA out of memory. Tried to allocate 37.50 GiB)" in caplog.text


def test_a_batch_of_files_the_gpu_decoder_refuses_goes_to_the_cpu_in_a_bounded_number_of_calls(cpu_for_gpu):
    # (a dataset of CMYK files, say): not a call for each file, after the first few
    broken = b"\xff\xd8\xff" + b"\x00" * 10
    got = Decoder(threads=1, device="cuda", resize=16)([_jpeg(5)] + [broken] * 64)
    assert got[0].shape == (3, 16, 21) and all(isinstance(g, ImageError) for g in got[1:])
    calls = [c for c in cpu_for_gpu if c != "synchronize"]
    assert calls[0] == 65 and len(calls) <= 1 + 2 * 2 * 7, calls  # 2 x 7 splits: 65 takes 7 bits


@pytest.mark.parametrize("error", [
    torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    # torchvision wraps every error of its decoding in a plain RuntimeError
    RuntimeError("Error while decoding JPEG images: CUDA error: an illegal memory access was encountered")])
def test_a_cuda_error_in_the_gpu_decoder_is_raised_not_sent_to_the_cpu(cpu_for_gpu, monkeypatch, error):
    # the process's device is broken (its worker ends the process): no file is at fault
    def broken(data, mode, device):
        raise error

    monkeypatch.setattr(tvio, "decode_jpeg", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        Decoder(threads=1, device="cuda", resize=16)([_jpeg(3), _jpeg(4)])


def test_the_gpu_decoder_out_of_memory_sends_its_batch_to_the_cpu_at_once(cpu_for_gpu, monkeypatch, caplog):
    def no_memory(data, mode, device):
        cpu_for_gpu.append(len(data))
        raise RuntimeError("Error while decoding JPEG images: CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tvio, "decode_jpeg", no_memory)
    with caplog.at_level("INFO", logger="pipeline._decoder"):
        got = Decoder(threads=1, device="cuda", resize=16)([_jpeg(3), _jpeg(4)])
    assert all(g.shape == (3, 16, 21) for g in got) and cpu_for_gpu == [2], "not split: no file is at fault"
    assert "the GPU had no memory for them" in caplog.text


def test_images_of_one_size_are_resized_together_in_groups_of_bounded_bytes(monkeypatch):
    from pipeline import _preprocess

    calls, resize = [], _preprocess.resize_crop
    monkeypatch.setattr(_preprocess, "resize_crop", lambda x, *a: calls.append(tuple(x.shape)) or resize(x, *a))
    images = [torch.randint(0, 255, (3, 10, 10), dtype=torch.uint8) for _ in range(7)] + \
             [torch.randint(0, 255, (3, 20, 20), dtype=torch.uint8)]
    got = _preprocess.resize_crop_many(images, 6, None, max_bytes=3 * 10 * 10 * 3)
    assert calls == [(3, 3, 10, 10), (3, 3, 10, 10), (3, 10, 10), (3, 20, 20)]
    assert all(torch.equal(g, resize(image, 6, None)) for g, image in zip(got, images))


def test_decoding_threads_may_import_torchvision_at_once():
    """A fresh process's decoding threads, as an actor's on its first batch: one imports
    torchvision's decoders for a PNG file while another imports its resize. Each import is
    whole when used (before, one thread failed with a circular import in every try)."""
    import subprocess
    import sys

    code = """if True:
        import io, threading
        import torch
        from PIL import Image
        from pipeline._images import decode
        from pipeline._preprocess import resize_crop
        buf = io.BytesIO(); Image.new("RGB", (52, 48)).save(buf, "PNG")
        errors, start = [], threading.Barrier(4)
        def work(k):
            start.wait()
            try:
                resize_crop(decode(buf.getvalue()) if k % 2 else torch.zeros(3, 48, 52, dtype=torch.uint8), 32, (32, 32))
            except Exception as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        [t.start() for t in threads]; [t.join() for t in threads]
        print(errors)
    """
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "[]"


def _random_jpeg(seed: int, size: tuple[int, int]) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=g)
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("threads", [1, 3])
def test_a_batch_of_equal_jpeg_files_is_decoded_into_one_block_that_becomes_the_batch(threads):
    from pipeline._images import decode
    from pipeline._preprocess import stack_images

    raws = [_random_jpeg(i, (20, 12)) for i in range(9)]
    decoder = Decoder(threads=threads)
    out = decoder(raws)
    decoder.close()
    expected = [decode(raw) for raw in raws]  # each on its own
    assert all(torch.equal(image, e) for image, e in zip(out, expected))
    batch = stack_images(out)
    assert torch.equal(batch, torch.stack([e.contiguous() for e in expected]))
    # no copy: the batch is the memory the files were decoded into
    assert batch.untyped_storage().data_ptr() == out[0].untyped_storage().data_ptr()
    assert all(image.data_ptr() == batch[i].data_ptr() for i, image in enumerate(out))


def test_files_of_other_sizes_bad_files_and_other_formats_beside_a_block_decode_as_alone():
    from pipeline._images import decode
    from pipeline._preprocess import stack_images

    raws = [_random_jpeg(0, (20, 12)), _random_jpeg(1, (12, 20)), b"garbage", _png(7, (20, 12)),
            _random_jpeg(2, (20, 12)), torch.zeros(3, 12, 20, dtype=torch.uint8)]
    decoder = Decoder(threads=2)
    out = decoder(raws)
    decoder.close()
    assert isinstance(out[2], ImageError)
    for i in (0, 1, 3, 4, 5):
        assert torch.equal(out[i], decode(raws[i]))
    # images of the block with a gap (the others left out), in reverse order, or one image
    # twice: a copy, equal all the same
    for images in ([out[0], out[4]], [out[4], out[0]], [out[0], out[0]]):
        batch = stack_images(images)
        assert torch.equal(batch, torch.stack([i.contiguous() for i in images]))
        assert batch.untyped_storage().data_ptr() != out[0].untyped_storage().data_ptr()


def test_a_resize_or_a_crop_decodes_without_a_block():
    raws = [_random_jpeg(i, (20, 12)) for i in range(3)]
    decoder = Decoder(threads=1, resize=8, crop=(8, 8))
    out = decoder(raws)
    decoder.close()
    assert all(tuple(image.shape) == (3, 8, 8) for image in out)
    assert len({image.untyped_storage().data_ptr() for image in out}) == 3
