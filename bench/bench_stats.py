"""What do the value statistics (``actmap inspect``'s min, max, mean, zeros, NaN/inf) cost a dump?

The actors count each batch's stored values on the device, right after the cast to the storage
dtype (:class:`pipeline._stats.ValueStats`), so the writer threads do no extra work; on the CPU
the counting takes the forward thread's time instead. Two measurements, one process, CPU only:

1. **Actor throughput**: ``ShardWorker.run_shard`` over the same shards (no Ray), with the
   statistics and with ``ValueStats.add`` made a no-op, alternating the two (ABAB...) so that
   drifts of the machine hit both; rows/s, the median of ``--repeats`` rounds after one
   untimed round. Two jobs: the README's default dump (ResNet-18, 64 px, layer3 + layer4) and an
   output-heavy one (ResNet-18 at 128 px, layer1: 64x32x32 per image, 6.6x the default's bytes).
2. **Per batch**: the time of ``ValueStats.add`` on one batch of 32 ReLU-like float16 maps
   against the time the writer takes to encode and write the same batch (``build_table`` +
   ``LayerFileWriter.write``, zstd): what the statistics would cost a writer thread on the CPU.

Run ``python bench/bench_stats.py``; ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from unittest import mock

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import Config
from pipeline._shards import plan_shards
from pipeline._stats import ValueStats
from pipeline._store import OutputStore
from pipeline._worker import ShardWorker
from pipeline._writer import LayerFileWriter, build_table

JOBS = {
    "default dump": {"model": {"name": "resnet18", "layers": ["layer3", "layer4"]}, "source": {"image_size": 64}},
    "output-heavy": {"model": {"name": "resnet18", "layers": ["layer1"]}, "source": {"image_size": 128}},
}
BATCH_SHAPES = {"256x4x4": (256, 4, 4), "1024x14x14": (1024, 14, 14)}


def _rows_per_s(worker: ShardWorker, count: int, shard: int) -> float:
    started = time.perf_counter()
    for s in plan_shards(count, shard):
        worker.run_shard(s)
    return count / (time.perf_counter() - started)


def actor_throughput(job: str, count: int, batch: int, repeats: int, root: str) -> dict:
    data = json.loads(json.dumps(JOBS[job]))
    data["source"]["count"] = count
    data["run"] = {"output": f"{root}/{job.replace(' ', '-')}", "batch_size": batch, "shard_size": 4 * batch}
    worker = ShardWorker(Config.from_dict(data).to_dict(), device="cpu")
    rates: dict[bool, list[float]] = {True: [], False: []}
    try:
        for round_ in range(repeats + 1):
            for with_stats in ((True, False) if round_ % 2 else (False, True)):
                if with_stats:
                    rate = _rows_per_s(worker, count, 4 * batch)
                else:
                    with mock.patch.object(ValueStats, "add", lambda self, values: None):
                        rate = _rows_per_s(worker, count, 4 * batch)
                if round_:
                    rates[with_stats].append(rate)
    finally:
        worker.close()
    without, with_ = statistics.median(rates[False]), statistics.median(rates[True])
    return {"job": job, "rows_per_s_without": without, "rows_per_s_with": with_,
            "cost_percent": (without / with_ - 1) * 100}


def per_batch(shape_name: str, batch: int, repeats: int, root: str) -> dict:
    rng = np.random.default_rng(0)
    values = np.maximum(rng.standard_normal((batch, *BATCH_SHAPES[shape_name]), dtype=np.float32), 0).astype(np.float16)
    tensor = torch.from_numpy(values)
    fields = [pa.field("label", pa.int64())]
    store = OutputStore(root)

    def write() -> None:
        writer = LayerFileWriter(store, "layer=x/part-00000.parquet", "zstd")
        writer.write(build_table(values, sample_ids=[str(i) for i in range(batch)], indices=list(range(batch)),
                                 labels={"label": [0] * batch}, label_fields=fields, fixed=True))
        writer.commit()

    def count() -> None:
        ValueStats().add(tensor)

    timed: dict[str, list[float]] = {"write": [], "stats": []}
    for round_ in range(repeats + 1):
        for name, fn in (("write", write), ("stats", count)):
            started = time.perf_counter()
            fn()
            if round_:
                timed[name].append(time.perf_counter() - started)
    w, s = statistics.median(timed["write"]), statistics.median(timed["stats"])
    return {"shape": shape_name, "batch": batch, "write_ms": w * 1e3, "stats_ms": s * 1e3,
            "stats_vs_write_percent": s / w * 100}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="*", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--count", type=int, default=512, help="images per round (default 512)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--repeats", type=int, default=4, help="timed rounds each way (default 4)")
    parser.add_argument("--batch-repeats", type=int, default=15, help="timed rounds of the per-batch part")
    parser.add_argument("--dir", help="where to write (default: a temporary folder, removed after)")
    parser.add_argument("--json", help="also write the tables to this file")
    args = parser.parse_args(argv)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as an actor with one CPU
    root = tempfile.mkdtemp(prefix="actmap-bench-stats-", dir=args.dir)
    try:
        actors = [actor_throughput(job, args.count, args.batch, args.repeats, root) for job in args.jobs]
        batches = [per_batch(name, args.batch, args.batch_repeats, root) for name in BATCH_SHAPES]
    finally:
        shutil.rmtree(root, ignore_errors=True)
        torch.set_num_threads(threads)
    print(f"actor throughput with and without the statistics (CPU, 1 thread, {args.count} images, batch "
          f"{args.batch}, median of {args.repeats} alternating rounds)")
    print(f"{'job':<14} {'without rows/s':>15} {'with rows/s':>12} {'cost':>7}")
    for r in actors:
        print(f"{r['job']:<14} {r['rows_per_s_without']:>15,.1f} {r['rows_per_s_with']:>12,.1f} "
              f"{r['cost_percent']:>6.1f}%")
    print(f"\none batch of {args.batch} float16 maps: ValueStats.add against the writer's encode + write (zstd)")
    print(f"{'shape':<12} {'write ms':>9} {'stats ms':>9} {'stats/write':>12}")
    for r in batches:
        print(f"{r['shape']:<12} {r['write_ms']:>9.2f} {r['stats_ms']:>9.2f} {r['stats_vs_write_percent']:>11.1f}%")
    result = {"actors": actors, "batches": batches}
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), **result}, out, indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
