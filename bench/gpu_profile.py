"""Where an actor's time goes on a GPU, stage by stage, in one process and without Ray.

Each stage of the JPEG-folder dump (read the files, decode on the GPU, resize, forward, copy the
maps to the host, build and write the Parquet tables), timed alone on one batch, then
:class:`~pipeline._worker.ShardWorker` running several shards at once in threads, as an actor
does. The stage rates say which one caps the dump; the last lines say what the worker reaches.

    python bench/gpu_profile.py --images /tmp/jpegs --count 8192 --json out.json

On the CPU (``--device cpu``) it runs the same code at tiny sizes, to check the script.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pipeline  # noqa: E402
from pipeline._decoder import Decoder  # noqa: E402
from pipeline._models import LayerOutputs, build_model  # noqa: E402
from pipeline._preprocess import resize_crop, to_model_input  # noqa: E402
from pipeline._reduce import reduce_output  # noqa: E402
from pipeline._shards import Shard  # noqa: E402
from pipeline._sources import Deferred  # noqa: E402
from pipeline._sources.generated import generate  # noqa: E402
from pipeline._stats import ValueStats  # noqa: E402
from pipeline._store import OutputStore  # noqa: E402
from pipeline._worker import ShardWorker, _Batch  # noqa: E402
from pipeline._writer import LayerFileWriter, build_table  # noqa: E402


def make_jpegs(root: str, count: int, width: int, height: int) -> list[str]:
    """``count`` photo-sized JPEG files in 8 class folders (made once; kept for the next run)."""
    import torchvision.io as tvio

    files = sorted(glob.glob(f"{root}/*/*.jpg"))
    if len(files) >= count:
        return files[:count]

    def make(i):
        path = f"{root}/{i % 8}/{i:06d}.jpg"
        image = generate(i, max(width, height), 0)[0][:, :height, :width].contiguous()
        tvio.write_jpeg(image, path, quality=90)

    for k in range(8):
        os.makedirs(f"{root}/{k}", exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(make, range(count)))
    return sorted(glob.glob(f"{root}/*/*.jpg"))[:count]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def timed(fn, repeats: int, sync) -> float:
    """The median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default=os.path.join(tempfile.gettempdir(), "actmap-profile-jpegs"))
    parser.add_argument("--count", type=int, default=8192, help="JPEG files for the worker runs")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224, help="the crop; resize to size * 8 / 7")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--shards-at-once", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    work = args.workdir or tempfile.mkdtemp(prefix="actmap-profile-")
    os.makedirs(work, exist_ok=True)
    resize = args.size * 8 // 7
    b = args.batch
    results: dict[str, float] = {}

    def report(name: str, seconds: float, images: int = b, nbytes: int | None = None) -> None:
        results[name] = round(images / seconds, 1)
        extra = f", {nbytes / seconds / 1e9:.2f} GB/s" if nbytes else ""
        print(f"{name:<58} {images / seconds:>9,.0f} images/s ({seconds * 1e3:8.1f} ms per {images}{extra})",
              flush=True)

    t0 = time.perf_counter()
    files = make_jpegs(args.images, max(args.count, b), args.width, args.height)
    size_kb = sum(os.path.getsize(f) for f in files[:b]) / b / 1e3
    print(f"{len(files)} JPEG files of {args.width}x{args.height}, {size_kb:.0f} KB each, ready in "
          f"{time.perf_counter() - t0:.1f}s; device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if cuda else "") + f", {args.threads} threads", flush=True)
    batch_files = files[:b]
    pool = ThreadPoolExecutor(args.threads)

    # -- input: read, decode, resize ------------------------------------------------------------
    def read_all():
        return list(pool.map(_read, batch_files))

    report("read the files: open().read() (threads)", timed(read_all, args.repeats, lambda: None))
    import torchvision.io as tvio

    report("read the files: torchvision read_file (threads)", timed(
        lambda: list(pool.map(tvio.read_file, batch_files)), args.repeats, lambda: None))
    raws = read_all()
    decoder = Decoder(args.threads, device, resize=resize, crop=(args.size, args.size))
    if cuda:
        data = [torch.frombuffer(bytearray(r), dtype=torch.uint8) for r in raws]
        report("decode_jpeg on the GPU, one call", timed(
            lambda: tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB, device=device), args.repeats, sync))
        decoded = tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB, device=device)
        report("resize + crop on the GPU, image by image", timed(
            lambda: [resize_crop(x, resize, (args.size, args.size)) for x in decoded], args.repeats, sync))
        report("resize + crop on the GPU, one call for the batch", timed(
            lambda: resize_crop(torch.stack(decoded), resize, (args.size, args.size)), args.repeats, sync))
    report("Decoder(bytes), as a Parquet source feeds it", timed(lambda: decoder(raws), args.repeats, sync))
    deferred = [Deferred(functools.partial(_read, p), p) for p in batch_files]
    report("Decoder(files), as a local folder feeds it", timed(lambda: decoder(deferred), args.repeats, sync))
    cpu_decoder = Decoder(args.threads, "cpu", resize=resize, crop=(args.size, args.size))
    report("Decoder(bytes) on the CPU, all threads", timed(lambda: cpu_decoder(raws), 1, lambda: None))

    # -- the model and the copies out ------------------------------------------------------------
    overrides = [f"model.name={args.model}", "model.layers=[layer3, layer4]", "model.channels_last=true",
                 "model.precision=" + ("bf16" if cuda else "fp32"), "source.kind=folder",
                 f"source.path={args.images}", f"source.preprocess.resize={resize}",
                 f"source.preprocess.crop={args.size}", f"run.batch_size={b}"]
    config = pipeline.load_config(None, overrides + [f"run.output={work}/unused"])
    model = build_model(config.model).to(memory_format=torch.channels_last).to(device)
    grab = LayerOutputs(model, config.model)
    images = [x.to(device) for x in cpu_decoder(raws)]
    pixels = torch.stack(images)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def forward():
        with torch.inference_mode(), autocast:
            return {k: reduce_output(v, config.dump, k) for k, v in grab(to_model_input(
                pixels, config.source.preprocess.mean_std(), True)).items()}

    report("forward + hooks + cast to float16", timed(forward, args.repeats, sync))
    maps = forward()
    map_bytes = sum(v.numel() * v.element_size() for v in maps.values())
    print(f"maps: {', '.join(f'{k} {tuple(v.shape)} {v.dtype}' for k, v in maps.items())}; "
          f"{map_bytes / b / 1e3:.0f} KB per image", flush=True)
    stats = {k: ValueStats() for k in maps}
    report("value stats on the device", timed(lambda: [stats[k].add(v) for k, v in maps.items()],
                                               args.repeats, sync))
    if cuda:
        report("copy out: .to('cpu', non_blocking=True)", timed(
            lambda: [v.to("cpu", non_blocking=True) for v in maps.values()], args.repeats, sync), nbytes=map_bytes)
        pinned = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in maps.items()}
        report("copy out: into a pinned buffer made once", timed(
            lambda: [pinned[k].copy_(v, non_blocking=True) for k, v in maps.items()], args.repeats, sync),
            nbytes=map_bytes)
        report("copy out: .cpu() (pageable)", timed(lambda: [v.cpu() for v in maps.values()], args.repeats, sync),
               nbytes=map_bytes)
        report("pin_memory() of the uint8 input batch (CPU-decoded path)", timed(
            lambda: pixels.cpu().pin_memory(), args.repeats, sync))
    worker_cfg = pipeline.load_config(None, overrides + [f"run.output={work}/worker"]).to_dict()
    worker = ShardWorker(worker_cfg, device=str(device), decode_threads=args.threads,
                         shards_at_once=args.shards_at_once)
    batch = _Batch([], images, [])

    def worker_forward():
        out = worker._forward(batch, {k: ValueStats() for k in maps})
        if out.ready is not None:
            out.ready.synchronize()

    report("ShardWorker._forward (stack, normalise, model, copy out)", timed(worker_forward, args.repeats, sync))

    # -- the tables and the files ----------------------------------------------------------------
    host = {k: v.float().cpu().to(torch.float16).numpy() for k, v in maps.items()}
    store = OutputStore(os.path.join(work, "tables"))
    ids, indices = [f"{i}" for i in range(b)], list(range(b))

    def write(layer: str, compression: str, name: str) -> None:
        writer = LayerFileWriter(store, f"t/{name}.parquet", compression)
        writer.write(build_table(host[layer], sample_ids=ids, indices=indices, labels={}, label_fields=[],
                                 fixed=True))
        writer.commit()

    for compression in ("zstd", "none"):
        report(f"build + write both layers, 1 thread, {compression}", timed(
            lambda: [write(k, compression, f"one-{k}") for k in host], 3, lambda: None), nbytes=map_bytes)
        parallel = 2 * args.shards_at_once  # a writer per layer and shard at work
        with ThreadPoolExecutor(parallel) as writers:
            report(f"build + write both layers, {parallel} batches at once, {compression}", timed(
                lambda: list(writers.map(lambda i: [write(k, compression, f"par{i}-{k}") for k in host],
                                         range(parallel))), 3, lambda: None),
                images=b * parallel, nbytes=map_bytes * parallel)

    # -- the worker, several shards at once, as an actor runs them ------------------------------
    shard_size = 2 * b
    count = len(files) // shard_size * shard_size
    for label, extra in (("full maps", []), ("pooled to 1x1", ["dump.reduce=pool"])):
        out = os.path.join(work, "worker-" + label.split()[0])
        shutil.rmtree(out, ignore_errors=True)
        cfg = pipeline.load_config(None, overrides + [f"run.output={out}", *extra]).to_dict()
        with ShardWorker(cfg, device=str(device), decode_threads=args.threads,
                         shards_at_once=args.shards_at_once) as w:
            shards = [Shard(i, s, s + shard_size) for i, s in enumerate(range(0, count, shard_size))]
            w.run_shard(shards[0])  # warm-up: cuDNN plans, the decoder's first call
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.shards_at_once) as runners:
                records = list(runners.map(w.run_shard, shards[1:]))
            wall = time.perf_counter() - t0
        done = sum(r.stop - r.start for r in records)
        summed = {k: round(sum(r.seconds[k] for r in records), 2) for k in records[0].seconds}
        written = sum(sum(r.bytes.values()) for r in records)
        report(f"ShardWorker, {args.shards_at_once} shards at once, {label}", wall, images=done)
        print(f"    seconds summed over {len(records)} shards: {summed}; {written / wall / 1e9:.2f} GB/s written",
              flush=True)
        shutil.rmtree(out, ignore_errors=True)
    pool.shutdown()
    grab.remove()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
