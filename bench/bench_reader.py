"""How fast does a DataLoader read a layer back: in order, block-shuffled, or fully shuffled?

Writes one layer the way the actors do (``pipeline.writer``: one file per shard, one row group per
batch, zstd), then reads every row through ``torch.utils.data.DataLoader`` over
``pipeline.ActivationDataset``, one after the other in one process:

* ``sequential`` -- the rows in storage order (no shuffling);
* ``block shuffle`` -- ``ActivationDataset(..., shuffle=True, window=W)``: row groups in a random
  order, rows shuffled within windows of W rows (:mod:`pipeline._shuffle`);
* ``random order`` -- ``DataLoader(shuffle=True)``, a uniform permutation of the rows: each batch
  touches rows all over the dump, so row groups are read (and decoded) again and again.

Rates are rows per second (median of ``--repeats`` epochs after one untimed epoch), and each as a
ratio to ``sequential``. Reads come from the page cache (the files were just written).

Run ``python bench/bench_reader.py``; ``--help`` lists the options.
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

import numpy as np
import pyarrow as pa
import torch

from pipeline import ActivationDataset
from pipeline._shards import plan_shards
from pipeline._store import OutputStore
from pipeline._writer import LayerFileWriter, build_table

SEQUENTIAL, BLOCK, RANDOM = "sequential", "block shuffle", "random order"
LAYER = "layer3"


def write_layer(root: str, rows: int, shape: Sequence[int], batch: int, shard: int, seed: int = 0) -> None:
    """One layer of ReLU-like float16 rows in files of ``shard`` rows and row groups of ``batch``."""
    store = OutputStore(root)
    rng = np.random.default_rng(seed)
    fields = [pa.field("label", pa.int64())]
    for s in plan_shards(rows, shard):
        writer = LayerFileWriter(store, s.file_name(LAYER), "zstd")
        for start in range(s.start, s.stop, batch):
            stop = min(start + batch, s.stop)
            values = np.maximum(rng.standard_normal((stop - start, *shape), dtype=np.float32), 0).astype(np.float16)
            writer.write(build_table(values, sample_ids=[str(i) for i in range(start, stop)],
                                     indices=list(range(start, stop)), labels={"label": [i % 4 for i in range(start, stop)]},
                                     label_fields=fields, fixed=True, metadata={"layer": LAYER}))
        writer.commit()


def _epoch(loader: torch.utils.data.DataLoader) -> tuple[float, int]:
    started = time.perf_counter()
    rows = 0
    for activation, _ in loader:
        rows += len(activation)
    return time.perf_counter() - started, rows


def measure(root: str, batch: int, window: int, repeats: int, workers: int) -> list[dict]:
    """Rows/s of each way to read, in one process, one after the other."""
    plain = ActivationDataset(root, LAYER)
    shuffled = ActivationDataset(root, LAYER, shuffle=True, window=window)
    ways = {SEQUENTIAL: (plain, False), BLOCK: (shuffled, False), RANDOM: (plain, True)}
    results = []
    for name, (data, uniform) in ways.items():
        rates = []
        for epoch in range(repeats + 1):
            data.set_epoch(epoch)
            generator = torch.Generator().manual_seed(epoch)
            loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=uniform, generator=generator,
                                                 num_workers=workers)
            seconds, rows = _epoch(loader)
            if rows != len(data):
                raise RuntimeError(f"{name}: read {rows} rows of {len(data)}")
            if epoch:  # the first epoch warms the page cache and the imports
                rates.append(rows / seconds)
        results.append({"read": name, "rows_per_s": statistics.median(rates)})
    base = results[0]["rows_per_s"]
    for r in results:
        r["vs_sequential"] = r["rows_per_s"] / base
    return results


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16384, help="rows in the layer (default 16384)")
    parser.add_argument("--shape", type=int, nargs="+", default=[256, 4, 4], help="per-row shape (default 256 4 4)")
    parser.add_argument("--row-group", type=int, default=32, help="rows per row group: the actors' batch (default 32)")
    parser.add_argument("--shard", type=int, default=256, help="rows per file (default 256)")
    parser.add_argument("--batch", type=int, default=64, help="DataLoader batch size (default 64)")
    parser.add_argument("--window", type=int, default=1024, help="block-shuffle window in rows (default 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per way (default 3)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    parser.add_argument("--dir", help="where to write the layer (default: a temporary folder, removed after)")
    parser.add_argument("--json", help="also write the table to this file")
    args = parser.parse_args(argv)

    root = tempfile.mkdtemp(prefix="actmap-bench-reader-", dir=args.dir)
    try:
        write_layer(root, args.rows, args.shape, args.row_group, args.shard)
        results = measure(root, args.batch, args.window, args.repeats, args.workers)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    row_bytes = int(np.prod(args.shape)) * 2
    print(f"{args.rows} rows of {'x'.join(map(str, args.shape))} float16 ({row_bytes:,} B), row groups of "
          f"{args.row_group}, files of {args.shard}; DataLoader batch {args.batch}, {args.workers} workers; "
          f"block-shuffle window {args.window} rows")
    print(f"{'read':<15} {'rows/s':>10} {'MB/s':>8} {'vs sequential':>14}")
    for r in results:
        print(f"{r['read']:<15} {r['rows_per_s']:>10,.0f} {r['rows_per_s'] * row_bytes / 1e6:>8,.1f} "
              f"{r['vs_sequential']:>13.2f}x")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "rows": results}, out, indent=1)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
