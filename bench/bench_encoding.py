"""How fast can one batch of activations go into Parquet and back, per column type?

Reproduces the encoding table of design.md section 3 on this machine: one batch of
ResNet-50-like activations, layer3 (1024x14x14) and layer4 (2048x7x7) in float16 (602 KB per
image), written with ``pq.write_table`` and read back into an ndarray, as

* ``FixedShapeTensorArray`` of float16 (Arrow's canonical tensor extension type),
* ``FixedSizeList`` of uint16 (an element-wise list, the storage of most tensor types),
* ``fixed_size_binary``, one raw value per row (actmap's :func:`pipeline._encoding.encode_fixed`),

each without compression and with zstd, and the disk itself (raw bytes, write + fsync).

Threads: "1 thread" is one writer with ``pa.set_cpu_count(1)``; "N threads" is
``pa.set_cpu_count(N)`` with N writers at once, each writing its own slice of the batch to its
own file (as N actors, or one actor's writer pool, would). "1 file, N" is one ``pq.write_table``
of the whole batch with ``pa.set_cpu_count(N)``: it shows whether pyarrow spreads one file's
encoding over threads by itself.

Throughput is the activation payload (batch x 602,112 bytes) per second, whatever the file's
size; the median of ``--repeats`` runs. Reads come from the page cache (the file was just
written), so they measure decoding, not the disk.

Run ``python bench/bench_encoding.py`` (a batch of 64) or ``--full`` (the batch of 256 of the
design table); ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline._encoding import decode_fixed, encode_fixed

#: The two layers of the design table: ResNet-50 layer3 and layer4 at 224 px.
LAYERS = {"layer3": (1024, 14, 14), "layer4": (2048, 7, 7)}
ENCODINGS = ("FixedShapeTensorArray float16", "FixedSizeList uint16", "fixed_size_binary")
BASELINE = "fixed_size_binary"
RAW = "raw file write + fsync"


# -- encodings: ndarray -> Arrow column -> ndarray ------------------------------------------------


def _encode(kind: str, array: np.ndarray) -> tuple[pa.Array, dict]:
    if kind == "FixedShapeTensorArray float16":
        return pa.FixedShapeTensorArray.from_numpy_ndarray(array), {}
    if kind == "FixedSizeList uint16":
        flat = pa.array(array.reshape(-1).view(np.uint16))
        per_row = int(np.prod(array.shape[1:]))
        return pa.FixedSizeListArray.from_arrays(flat, per_row), {}
    if kind == "fixed_size_binary":
        return encode_fixed(array)
    raise ValueError(f"unknown encoding {kind!r}; valid: {list(ENCODINGS)}")


def _decode(kind: str, column: pa.ChunkedArray, shape: tuple[int, ...], spec: dict) -> np.ndarray:
    if kind == "fixed_size_binary":
        return decode_fixed(column, spec)
    parts = []
    for chunk in column.chunks:
        if kind == "FixedShapeTensorArray float16":
            parts.append(chunk.to_numpy_ndarray())
        else:
            values = chunk.flatten().to_numpy(zero_copy_only=False)
            parts.append(values.view(np.float16).reshape((len(chunk),) + shape))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def make_batch(batch: int, relu: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float16 activations of both layers (negative values zeroed with ``relu``)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in LAYERS.items():
        values = rng.standard_normal((batch, *shape), dtype=np.float32)
        if relu:
            np.maximum(values, 0, out=values)
        out[name] = values.astype(np.float16)
    return out


def write_parquet(kind: str, arrays: dict[str, np.ndarray], path: str, compression: str | None) -> int:
    """Encode ``arrays`` as ``kind`` columns and write one file; returns its size."""
    columns, specs = {}, {}
    for name, array in arrays.items():
        columns[name], specs[name] = _encode(kind, array)
    table = pa.table(columns)
    pq.write_table(table, path, compression=compression, use_dictionary=False, write_statistics=False)
    return os.path.getsize(path)


def read_parquet(kind: str, path: str, use_threads: bool) -> dict[str, np.ndarray]:
    """Read a file written by :func:`write_parquet` back into ndarrays."""
    table = pq.read_table(path, use_threads=use_threads)
    out = {}
    for name, shape in LAYERS.items():
        spec = {"dtype": "float16", "shape": list(shape)}
        out[name] = _decode(kind, table.column(name), shape, spec)
    return out


def write_raw(arrays: dict[str, np.ndarray], path: str) -> int:
    """Write the arrays' bytes to ``path`` and fsync it: what the disk takes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size = 0
        for array in arrays.values():
            size += os.write(fd, memoryview(np.ascontiguousarray(array)).cast("B"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


# -- timing ---------------------------------------------------------------------------------------


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm: allocators, page cache, lazy imports
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _slices(arrays: dict[str, np.ndarray], parts: int) -> list[dict[str, np.ndarray]]:
    rows = next(iter(arrays.values())).shape[0]
    bounds = np.linspace(0, rows, parts + 1).astype(int)
    return [{k: v[a:b] for k, v in arrays.items()} for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _parallel(pool: ThreadPoolExecutor, jobs: Sequence[Callable[[], object]]) -> None:
    for future in [pool.submit(job) for job in jobs]:
        future.result()


def measure(batch: int = 64, repeats: int = 3, threads: int | None = None, relu: bool = False,
            directory: str | None = None, check: bool = True) -> list[dict]:
    """Measure every (encoding, compression) and the raw disk; returns one dict per row.

    Each row has ``encoding``, ``compression``, ``mb`` (file size), ``payload_mb``, and the
    rates in GB/s: ``write_1``, ``write_n``, ``write_1file_n``, ``read_1``, ``read_n`` (``None``
    where it does not apply), plus ``threads``.
    """
    threads = threads or os.cpu_count() or 1
    arrays = make_batch(batch, relu)
    payload = sum(a.nbytes for a in arrays.values())
    gb = payload / 1e9
    slices = _slices(arrays, threads)
    workdir = tempfile.mkdtemp(prefix="bench-encoding-", dir=directory)
    saved_cpu = pa.cpu_count()
    rows: list[dict] = []
    try:
        with ThreadPoolExecutor(threads) as pool:
            for compression in (None, "zstd"):
                for kind in ENCODINGS:
                    whole = os.path.join(workdir, "whole.parquet")
                    parts = [os.path.join(workdir, f"part-{i}.parquet") for i in range(len(slices))]
                    pa.set_cpu_count(1)
                    w1 = _median_seconds(lambda: write_parquet(kind, arrays, whole, compression), repeats)
                    size = os.path.getsize(whole)
                    r1 = _median_seconds(lambda: read_parquet(kind, whole, use_threads=False), repeats)
                    if check:
                        back = read_parquet(kind, whole, use_threads=False)
                        for name in LAYERS:
                            if not np.array_equal(back[name].view(np.uint16), arrays[name].view(np.uint16)):
                                raise AssertionError(f"{kind} ({compression}) did not give {name} back")
                    pa.set_cpu_count(threads)
                    w1f = _median_seconds(lambda: write_parquet(kind, arrays, whole, compression), repeats)
                    wn = _median_seconds(lambda: _parallel(pool, [
                        (lambda s=s, p=p: write_parquet(kind, s, p, compression)) for s, p in zip(slices, parts)]),
                        repeats)
                    rn = _median_seconds(lambda: _parallel(pool, [
                        (lambda p=p: read_parquet(kind, p, use_threads=True)) for p in parts]), repeats)
                    rows.append({"encoding": kind, "compression": compression or "none", "mb": size / 1e6,
                                 "payload_mb": payload / 1e6, "threads": threads,
                                 "write_1": gb / w1, "write_n": gb / wn, "write_1file_n": gb / w1f,
                                 "read_1": gb / r1, "read_n": gb / rn})
            raw = os.path.join(workdir, "raw.bin")
            raw_parts = [os.path.join(workdir, f"raw-{i}.bin") for i in range(len(slices))]
            w1 = _median_seconds(lambda: write_raw(arrays, raw), repeats)
            wn = _median_seconds(lambda: _parallel(pool, [
                (lambda s=s, p=p: write_raw(s, p)) for s, p in zip(slices, raw_parts)]), repeats)
            rows.append({"encoding": RAW, "compression": "none", "mb": payload / 1e6,
                         "payload_mb": payload / 1e6, "threads": threads, "write_1": gb / w1,
                         "write_n": gb / wn, "write_1file_n": None, "read_1": None, "read_n": None})
    finally:
        pa.set_cpu_count(saved_cpu)
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


# -- report ---------------------------------------------------------------------------------------

RATES = ("write_1", "write_n", "write_1file_n", "read_1", "read_n")


def _cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def format_table(rows: Sequence[dict], batch: int) -> str:
    """The rates in GB/s, then each rate as a ratio to fixed_size_binary (same compression)."""
    n = rows[0]["threads"]
    head = ["column type", "compr.", "file MB", "write 1T", f"write {n}T", f"1 file, {n}T",
            "read 1T", f"read {n}T"]
    lines = [f"one batch of {batch} x (layer3 1024x14x14 + layer4 2048x7x7) float16 = "
             f"{rows[0]['payload_mb']:.1f} MB; GB/s of payload, median", ""]
    body = [[r["encoding"], r["compression"], f"{r['mb']:.1f}"] + [_cell(r[k], ".3f") for k in RATES]
            for r in rows]
    lines += _grid(head, body)
    base = {r["compression"]: r for r in rows if r["encoding"] == BASELINE}
    lines += ["", f"ratio to {BASELINE} with the same compression (raw: to uncompressed)", ""]
    body = []
    for r in rows:
        ref = base[r["compression"]]
        body.append([r["encoding"], r["compression"], f"{r['mb'] / ref['mb']:.2f}"] +
                    [_cell(None if r[k] is None else r[k] / ref[k], ".2f") for k in RATES])
    lines += _grid(head, body)
    return "\n".join(lines)


def _grid(head: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "| " + " | ".join(  # noqa: E731
        str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    return [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(b) for b in body]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Parse the options, measure, print the tables; returns the rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="images in the batch (default 64)")
    parser.add_argument("--full", action="store_true", help="the design table's batch of 256")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell, after one untimed; the median is shown (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="N of the N-thread columns (default: all cores)")
    parser.add_argument("--relu", action="store_true", help="zero the negative values, like ReLU outputs "
                        "(compresses better; default: plain random values, as in the design table)")
    parser.add_argument("--dir", default=None, help="where the files go (default: the system temp folder)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    batch = 256 if args.full else args.batch
    rows = measure(batch, args.repeats, args.threads, args.relu, args.dir)
    print(format_table(rows, batch))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": batch, "relu": args.relu, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
