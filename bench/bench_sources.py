"""The input path, measured per source kind against its floor and against Ray Data, in one run.

For each kind (``parquet``: N rows in 20 files; ``folder``: N files; ``webdataset``: N samples
in 20 tars; ``generated``), on the same small JPEG images (``--size`` px, ~2 KB):

a. the floor: plain reads (pyarrow row-group batches, ``open().read()``, ``tarfile``) and the same
   decoder (:func:`pipeline._images.decode`) in a plain loop, on 1 thread and on N threads (the
   files split across them);
b. the source alone, as an actor uses it: opened from the index file the driver writes, each
   shard's ``stream`` in batches through the actor's :class:`~pipeline._decoder.Decoder` with 1 and
   N threads (rows/s and MB/s of encoded input), one shard at a time; with N threads also two
   shards at once into the one decoder, as an actor runs them (each shard's samples are made
   in its own thread while the other's decode);
c. actmap end to end (``python -m pipeline run``, a fresh process) with a model so cheap that the
   input sets the pace (average-pool to 8x8, a 1x1 convolution), on N/4 and on N samples,
   ``--repeats`` runs each, the sizes taking turns, the median kept (a fresh process's start-up
   swings by seconds: with the fastest of 3, two runs of the same code gave 13,800 and 37,700
   rows/s): the marginal rate ``(N - N/4) / (t(N) - t(N/4))`` cancels the start-up; so does the
   same over the shards' span (first shard's start to last one's end, from the shard records),
   which leaves out the start-up and the tear-down altogether; the steady rate is N over that
   span of the N-sample run (each actor's warm-up included); the
   driver's own peak memory (``RUSAGE_SELF`` when it ends) and the actors' (from the shard
   records) for both sizes;
d. the same job with Ray Data (``read_parquet`` / ``read_images`` / ``read_webdataset`` ->
   ``map_batches`` with the same model on an actor pool of one actor -> ``write_parquet``), its
   marginal rate the same way, and over its span (from the first batch that reaches the model,
   which the actor notes, to the return of ``write_parquet``: Ray Data's start-up left out, as
   actmap's span leaves out actmap's). Encoded bytes (Parquet, WebDataset) are decoded two ways: in the
   model's actor (the job as written above), and in a ``map_batches`` of tasks of their own
   before it (so both cores decode). The read and decode tasks get a CPU of their own beside
   the actor's, or the pipeline waits for ever on a 2-CPU machine.

And the driver's planning of a folder of ``--plan-files`` files (default 1,000,000 empty files):
the listing, sort, index file and digest that ``FolderSource`` does, against one
``os.scandir`` walk and one ``pyarrow.fs`` listing of the same tree.

Every rate is measured when you run it; ratios compare runs made one after the other in this
process. ``python bench/bench_sources.py --help`` lists the options; the defaults take about
10 minutes on a 2-core machine (most of it Ray Data and making the 1,000,000 files once).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline._decoder import Decoder  # noqa: E402
from pipeline._images import decode  # noqa: E402
from pipeline._sources.generated import generate  # noqa: E402

log = logging.getLogger("bench_sources")
KINDS = ("parquet", "folder", "webdataset", "generated")
FILES = 20  # Parquet files and tars


# -- the cheap model ------------------------------------------------------------------------------


def cheap_model() -> torch.nn.Module:
    """A model whose forward costs next to nothing: average-pool to 8x8, then a 1x1 convolution
    (layer ``conv``, 16x8x8 outputs). Named ``bench.bench_sources:cheap_model`` in configs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("pool", torch.nn.AdaptiveAvgPool2d(8))
    model.add_module("conv", torch.nn.Conv2d(3, 16, 1))
    return model


# -- the data -------------------------------------------------------------------------------------


def _jpeg(i: int, size: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(generate(i, size, 0)[0].permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_data(work: Path, n: int, size: int, kinds: Sequence[str]) -> dict[str, dict[str, str]]:
    """The datasets of N and N/4 samples per kind under ``work`` (made once, then reused)."""
    images_path = work / f"images-{n}-{size}.npy"
    paths: dict[str, dict[str, str]] = {}
    if not images_path.exists() and any(k != "generated" for k in kinds):
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            blobs = list(pool.map(lambda i: _jpeg(i, size), range(n)))
        np.save(images_path, np.array(blobs, dtype=object), allow_pickle=True)
    blobs = np.load(images_path, allow_pickle=True) if images_path.exists() else None
    per_file = -(-n // FILES)
    for kind in kinds:
        full, quarter = work / f"{kind}-{n}-{size}", work / f"{kind}-{n}-{size}-quarter"
        paths[kind] = {"all": str(full), "quarter": str(quarter)}
        if kind == "generated" or full.exists():
            continue
        tmp = work / f".{kind}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if kind == "parquet":
            for f in range(FILES):
                rows = range(f * per_file, min(n, (f + 1) * per_file))
                table = pa.table({"image": pa.array([blobs[i] for i in rows], pa.binary()),
                                  "key": [f"img-{i:07d}" for i in rows], "label": [i % 10 for i in rows]})
                pq.write_table(table, tmp / f"part-{f:03d}.parquet", row_group_size=1000)
        elif kind == "folder":
            for i in range(n):
                folder = tmp / f"class{i % 10}"
                folder.mkdir(exist_ok=True)
                (folder / f"{i:07d}.jpg").write_bytes(blobs[i])
        elif kind == "webdataset":
            for f in range(FILES):
                with tarfile.open(tmp / f"shard-{f:04d}.tar", "w") as tar:
                    for i in range(f * per_file, min(n, (f + 1) * per_file)):
                        for ext, data in (("jpg", blobs[i]), ("cls", str(i % 10).encode())):
                            info = tarfile.TarInfo(f"{i:07d}.{ext}")
                            info.size = len(data)
                            tar.addfile(info, io.BytesIO(data))
        tmp.rename(full)
        _quarter(kind, full, quarter, n)
    return paths


def _quarter(kind: str, full: Path, quarter: Path, n: int) -> None:
    """The first quarter of a dataset (hard links: no copy)."""
    shutil.rmtree(quarter, ignore_errors=True)
    if kind in ("parquet", "webdataset"):
        quarter.mkdir()
        for path in sorted(full.iterdir())[: FILES // 4]:
            os.link(path, quarter / path.name)
    else:
        files = sorted(full.rglob("*.jpg"))
        files = sorted(files, key=lambda p: p.relative_to(full).as_posix())[: n // 4]
        for path in files:
            target = quarter / path.relative_to(full)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)


# -- (a) the floor ----------------------------------------------------------------------------------


def _split(items: list, parts: int) -> list[list]:
    return [items[i::parts] for i in range(parts)]


def floor(kind: str, path: str, n: int, size: int, threads: int) -> tuple[int, int, float]:
    """Plain reads + the decoder in a plain loop on ``threads`` threads: (rows, bytes, seconds)."""
    def parquet(files):
        rows = nbytes = 0
        for f in files:
            for batch in pq.ParquetFile(f).iter_batches(columns=["image"]):
                for data in batch.column(0).to_pylist():
                    decode(data)
                    rows, nbytes = rows + 1, nbytes + len(data)
        return rows, nbytes

    def folder(files):
        nbytes = 0
        for f in files:
            with open(f, "rb") as handle:
                data = handle.read()
            decode(data)
            nbytes += len(data)
        return len(files), nbytes

    def webdataset(files):
        rows = nbytes = 0
        for f in files:
            with tarfile.open(f, "r|") as tar:
                for member in tar:
                    if member.name.endswith(".jpg"):
                        data = tar.extractfile(member).read()
                        decode(data)
                        rows, nbytes = rows + 1, nbytes + len(data)
        return rows, nbytes

    def generated(indices):
        for i in indices:
            generate(i, size, 0)
        return len(indices), 3 * size * size * len(indices)

    work: Callable = {"parquet": parquet, "folder": folder, "webdataset": webdataset, "generated": generated}[kind]
    if kind == "generated":
        items = list(range(n))
    elif kind == "folder":
        items = sorted(glob.glob(f"{path}/*/*.jpg"))
    else:
        items = sorted(glob.glob(f"{path}/*"))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(work, _split(items, threads)))
    seconds = time.perf_counter() - t0
    return sum(r[0] for r in results), sum(r[1] for r in results), seconds


# -- (b) the source alone ---------------------------------------------------------------------------


def source_spec(kind: str, path: str, n: int, size: int) -> dict:
    if kind == "generated":
        return {"kind": "generated", "count": n, "image_size": size}
    if kind == "parquet":
        return {"kind": "parquet", "path": path, "id_column": "key"}
    if kind == "webdataset":
        return {"kind": "webdataset", "path": f"{path}/shard-*.tar"}
    return {"kind": "folder", "path": path}


def source_alone(kind: str, path: str, n: int, size: int, threads: int, shard: int, batch: int,
                 at_once: int = 1) -> tuple[int, float]:
    """The source as the driver opens it, read shard by shard and decoded as an actor does:
    (rows, seconds). With ``at_once`` > 1, that many shards stream at once into the one
    decoder, as an actor runs them (one thread each; the decoding threads are shared)."""
    import pyarrow.fs as pafs

    from pipeline._sources import IndexFile, MemoryIndex, open_source, write_index
    from pipeline.config import SourceSpec

    spec = SourceSpec.from_dict(source_spec(kind, path, n, size))
    source = open_source(spec)
    index = getattr(source, "index", None)
    if isinstance(index, MemoryIndex):  # as an actor opens it: by the index file the driver wrote
        folder = tempfile.mkdtemp()
        write_index(pafs.LocalFileSystem(), f"{folder}/index.parquet", index)
        source = open_source(spec, IndexFile(pafs.LocalFileSystem(), f"{folder}/index.parquet"))
    decoder = Decoder(threads)

    def one_shard(start: int) -> int:
        rows = 0
        stream = source.stream(start, min(start + shard, len(source)))
        while True:
            samples = [s for _, s in zip(range(batch), stream)]
            if not samples:
                return rows
            raws = [s.image for s in samples if hasattr(s, "image")]
            for image in decoder(raws):
                if isinstance(image, Exception):
                    raise image
            rows += len(raws)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(at_once) as shards:
        rows = sum(shards.map(one_shard, range(0, len(source), shard)))
    seconds = time.perf_counter() - t0
    decoder.close()
    return rows, seconds


# -- (c) actmap end to end --------------------------------------------------------------------------


def actmap_run(kind: str, path: str, n: int, size: int, output: str, batch: int, shard: int) -> dict:
    """``python -m pipeline run`` in a fresh process: seconds, the driver's and actors' peak memory."""
    source = source_spec(kind, path, n, size)
    config = {"model": {"name": "bench.bench_sources:cheap_model", "layers": ["conv"]},
              "source": source, "dump": {"dtype": "float16"},
              "run": {"output": output, "batch_size": batch, "shard_size": shard}}
    config_path = output + ".yaml"
    Path(config_path).write_text(json.dumps(config))
    shutil.rmtree(output, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    rss_path = output + ".driver-rss"
    # the CLI, then the driver's own peak memory (wait4 would also count the Ray processes it
    # reaped, and ru_maxrss starts at this process's peak, which holds the bench's images)
    script = ("import sys; from pipeline.cli import main; from pipeline._metrics import peak_rss_mb; "
              f"code = main(sys.argv[1:]); open({rss_path!r}, 'w').write(str(peak_rss_mb())); sys.exit(code)")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script, "run", config_path, "--quiet"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    err = done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"actmap run failed:\n{err[-3000:]}")
    records = [json.loads(Path(p).read_text()) for p in glob.glob(f"{output}/_actmap/shards/*.json")]
    rows = sum(r["rows"]["conv"] for r in records)
    if rows != (n if kind != "generated" else n):
        raise RuntimeError(f"actmap wrote {rows} rows, expected {n}:\n{err[-2000:]}")
    busy = max(r["finished"] for r in records) - min(r["started"] for r in records)
    return {"seconds": seconds, "busy_seconds": busy, "driver_rss_mb": float(Path(rss_path).read_text()),
            "actor_rss_mb": max(r["worker"].get("max_rss_mb", 0) for r in records),
            "load_wait": sum(r["seconds"]["load_wait"] for r in records),
            "shard_seconds": sum(r["seconds"]["total"] for r in records)}


# -- (d) Ray Data -----------------------------------------------------------------------------------


def _ray_data_decode(batch: dict) -> dict:
    """Ray Data's decoding stage: the encoded images of a batch as one ``(N, H, W, C)`` array."""
    return {"image": np.stack([decode(bytes(b)).permute(1, 2, 0).numpy() for b in batch["image"]])}


class RayDataModel:
    """Ray Data's callable class: the cheap model over a batch of decoded images. With ``marks``
    (a folder), each actor writes there when its first batch came in (the start of its span)."""

    def __init__(self, size: int, marks: str | None = None):
        from pipeline._preprocess import to_model_input

        self.model, self.size, self.to_input = cheap_model().eval(), size, to_model_input
        self.marks, self.started = marks, False

    def __call__(self, batch: dict) -> dict:
        if self.marks and not self.started:
            self.started = True
            Path(self.marks, str(os.getpid())).write_text(repr(time.time()))
        if batch["image"].dtype == object:  # encoded bytes: decoded here, in the actor
            batch = _ray_data_decode(batch)
        images = np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2))  # (N, H, W, C) decoded
        x = self.to_input(torch.from_numpy(images), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
        with torch.inference_mode():
            out = self.model(x).to(torch.float16)
        return {"activation": out.reshape(len(out), -1).numpy()}


def ray_data_run(kind: str, path: str, n: int, size: int, output: str, batch: int,
                 decode_tasks: bool = True) -> dict[str, float]:
    """One Ray Data run: its seconds, start to end, and its span: from the first batch that
    reached the model to the last row written (its start-up left out, as actmap's span does)."""
    import ray
    import ray.data

    if __name__ != "__main__":
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    shutil.rmtree(output, ignore_errors=True)
    marks = tempfile.mkdtemp()
    t0 = time.perf_counter()
    if kind == "parquet":
        ds = ray.data.read_parquet(path).select_columns(["image"])
    elif kind == "folder":
        ds = ray.data.read_images(path, mode="RGB")
    elif kind == "webdataset":
        ds = ray.data.read_webdataset(sorted(glob.glob(f"{path}/*.tar")), decoder=None)
        ds = ds.rename_columns({"jpg": "image"}).select_columns(["image"])
    else:
        ds = ray.data.range(n).map_batches(
            lambda b: {"image": np.stack([generate(int(i), size, 0)[0].numpy() for i in b["id"]])
                       .transpose(0, 2, 3, 1)}, batch_size=batch)
    if kind in ("parquet", "webdataset") and decode_tasks:  # encoded bytes: decoded by tasks of their own
        ds = ds.map_batches(_ray_data_decode, batch_size=batch, batch_format="numpy", num_cpus=1)
    ds = ds.map_batches(RayDataModel, fn_constructor_kwargs={"size": size, "marks": marks}, batch_size=batch,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    ds.write_parquet(output)
    seconds, ended = time.perf_counter() - t0, time.time()
    began = min(float(Path(p).read_text()) for p in glob.glob(f"{marks}/*"))
    shutil.rmtree(marks)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in glob.glob(f"{output}/**/*.parquet", recursive=True))
    if rows != n:
        raise RuntimeError(f"Ray Data wrote {rows} rows, expected {n}")
    return {"seconds": seconds, "span": ended - began}


# -- planning a large folder ------------------------------------------------------------------------


def plan_folder(work: Path, files: int, repeats: int = 5) -> dict:
    import pyarrow.fs as pafs

    from pipeline._sources import FolderSource, write_index

    tree = work / f"plan-{files}"
    if not tree.exists():
        tmp = work / ".plan.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        per = 1000
        for d in range(-(-files // per)):
            folder = tmp / f"d{d:05d}"
            folder.mkdir(parents=True)
            for i in range(d * per, min(files, (d + 1) * per)):
                os.close(os.open(folder / f"{i:08d}.jpg", os.O_CREAT | os.O_WRONLY))
        tmp.rename(tree)

    def scandir_walk() -> int:  # the names of every file, as one listing has to give them
        names, stack = [], [str(tree)]
        while stack:
            with os.scandir(stack.pop()) as entries:
                for e in entries:
                    if e.is_dir():
                        stack.append(e.path)
                    else:
                        names.append(e.path)
        return len(names)

    def pyarrow_listing() -> int:
        infos = pafs.LocalFileSystem().get_file_info(pafs.FileSelector(str(tree), recursive=True))
        return sum(1 for i in infos if i.type == pafs.FileType.File)

    def plan() -> int:
        source = FolderSource(str(tree))
        out = tempfile.mkdtemp()
        write_index(pafs.LocalFileSystem(), f"{out}/index.parquet", source.index)
        shutil.rmtree(out)
        return len(source)

    # each once to warm the dentry cache (as the first listing of a real run would not be), then
    # rounds of the three one after the other: the medians, and the median of each round's
    # ratio, stand against a machine whose load moves
    fns = {"scandir": scandir_walk, "pyarrow": pyarrow_listing, "plan": plan}
    result: dict = {f"{name}_count": fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    result.update({name: statistics.median(t) for name, t in times.items()})
    for base in ("scandir", "pyarrow"):
        result[f"plan_vs_{base}"] = statistics.median(p / b for p, b in zip(times["plan"], times[base]))
    return result


# -- the report -------------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{c:,.2f}" if isinstance(c, float) else (f"{c:,}" if isinstance(c, int) else str(c))
                                            for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def _marginal(rows: int, seconds: float) -> float:
    """Rows per second of the difference between two runs; NaN where the larger run was not
    the slower one (its start-up varied by more than the work it adds: no rate to tell)."""
    return rows / seconds if seconds > 0 else float("nan")


def start_up_swing(runs: Sequence[dict]) -> float:
    """How far the part of a run outside its shards' span (start-up and tear-down) moved across
    ``runs`` (max - min, seconds). A start-to-end marginal rate whose difference is smaller
    says nothing the noise does not.

    >>> start_up_swing([{"seconds": 14.0, "busy_seconds": 2.0}, {"seconds": 15.5, "busy_seconds": 2.5}])
    1.0
    """
    fixed = [r["seconds"] - r["busy_seconds"] for r in runs]
    return max(fixed) - min(fixed)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--rows", type=int, default=100_000, help="Parquet rows (default 100,000)")
    parser.add_argument("--files", type=int, default=20_000, help="folder files and tar samples (default 20,000)")
    parser.add_argument("--generated", type=int, default=20_000, help="generated images (default 20,000)")
    parser.add_argument("--size", type=int, default=64, help="image size in px (default 64)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="N (default: the cores)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=2048)
    parser.add_argument("--plan-files", type=int, default=1_000_000, help="0 skips the planning benchmark")
    parser.add_argument("--plan-repeats", type=int, default=5, help="rounds of the planning benchmark (default 5)")
    parser.add_argument("--no-e2e", action="store_true", help="skip actmap end to end")
    parser.add_argument("--alone-repeats", type=int, default=3,
                        help="runs of each floor and source alone, taking turns, the median kept (default 3)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="end-to-end runs per size (the sizes taking turns), the median kept (default 5)")
    parser.add_argument("--no-raydata", action="store_true", help="skip Ray Data")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "actmap-bench-sources"),
                        help="datasets are made here once and reused")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    kinds = [k for k in args.kinds.split(",") if k]
    sizes = {"parquet": args.rows, "folder": args.files, "webdataset": args.files, "generated": args.generated}
    results: dict = {"settings": vars(args), "cpus": os.cpu_count(), "kinds": {}}
    print(f"input path, {os.cpu_count()} cores, images of {args.size} px, N = {args.threads} threads, "
          f"batch {args.batch}, shard {args.shard_size}", flush=True)
    warmed = False
    decode(_jpeg(0, args.size))  # the decoder's first call imports torchvision (seconds): not timed
    for kind in kinds:
        n = sizes[kind]
        paths = make_data(work, sizes["folder"] if kind == "webdataset" else n, args.size, [kind])[kind]
        rows = []
        res: dict = {"n": n}
        # one pass untimed: every timed one finds the files in the page cache, the first one too
        floor(kind, paths["all"], n, args.size, args.threads)
        for threads in sorted({1, args.threads}):
            # the floor and the source take turns; the median of each (this host drifts by tens of %)
            floors, alone, paired = [], [], []
            for _ in range(args.alone_repeats):
                floors.append(floor(kind, paths["all"], n, args.size, threads))
                alone.append(source_alone(kind, paths["all"], n, args.size, threads, args.shard_size, args.batch))
                if threads > 1:
                    paired.append(source_alone(kind, paths["all"], n, args.size, threads, args.shard_size, args.batch,
                                               at_once=2))
            count, nbytes, s = floors[0][0], floors[0][1], statistics.median(f[2] for f in floors)
            res[f"floor_{threads}"] = count / s
            rows.append((f"floor, {threads} thread(s)", count, s, count / s, nbytes / s / 1e6, 1.0))
            count, s = alone[0][0], statistics.median(a[1] for a in alone)
            res[f"source_{threads}"] = count / s
            res[f"seconds_{threads}"] = {"floor": [f[2] for f in floors], "source": [a[1] for a in alone]}
            rows.append((f"source alone, {threads} thread(s)", count, s, count / s, nbytes / s / 1e6,
                         (count / s) / res[f"floor_{threads}"]))
            if paired:
                s = statistics.median(a[1] for a in paired)
                res[f"source_{threads}_two_shards"] = count / s
                res[f"seconds_{threads}"]["two_shards"] = [a[1] for a in paired]
                rows.append((f"source alone, {threads} threads, 2 shards at once", count, s, count / s,
                             nbytes / s / 1e6, (count / s) / res[f"floor_{threads}"]))
        top = res[f"floor_{args.threads}"]
        if not args.no_e2e:
            if not warmed:  # the first run of a process pays for cold caches: not the source's cost
                actmap_run("generated", "", 256, args.size, str(work / "out-warm-up"), args.batch, args.shard_size)
                warmed = True
            # the median of a few runs per size, the sizes taking turns: a run's fixed cost (Ray,
            # imports, the trial sample) varies by seconds on a shared machine
            tries: dict[str, list[dict]] = {"quarter": [], "all": []}
            for _ in range(args.repeats):
                for q in tries:
                    tries[q].append(actmap_run(kind, paths[q], n if q == "all" else n // 4, args.size,
                                               str(work / f"out-{kind}-{q}"), args.batch, args.shard_size))
            # times: the medians; peak memory: the most any run took
            runs = {q: {k: (max if k.endswith("rss_mb") else statistics.median)([r[k] for r in found]) for k in found[0]}
                    for q, found in tries.items()}
            print(f"{kind}: actmap runs, seconds (start to exit / first shard start to last shard end): " + "; ".join(
                f"{q} " + ", ".join(f"{r['seconds']:.2f}/{r['busy_seconds']:.2f}" for r in found)
                for q, found in tries.items()), flush=True)
            marginal = _marginal(n - n // 4, runs["all"]["seconds"] - runs["quarter"]["seconds"])
            if marginal != marginal:
                print(f"{kind}: actmap's median run over N was not slower than over N/4 (the start-up varied by "
                      "more than the work added): no marginal rate start to end; see the span's", flush=True)
            swing = start_up_swing(tries["quarter"] + tries["all"])
            added = runs["all"]["seconds"] - runs["quarter"]["seconds"]
            if 0 < added < swing:
                print(f"{kind}: the work N adds to N/4 ({added:.2f} s start to end) is less than the start-ups' swing "
                      f"across the runs ({swing:.2f} s): the start-to-end marginal rate is within the noise; the "
                      "span's is the measure (or a larger N)", flush=True)
            span = runs["all"]["busy_seconds"] - runs["quarter"]["busy_seconds"]
            steady = n / runs["all"]["busy_seconds"]
            res["actmap"] = {"marginal": marginal, "marginal_span": _marginal(n - n // 4, span), "steady": steady,
                             "start_up_swing": swing,
                             **{q: r for q, r in runs.items()}, "runs": tries}
            rows.append(("actmap end to end, marginal", n - n // 4, runs["all"]["seconds"] - runs["quarter"]["seconds"],
                         marginal, float("nan"), marginal / top))
            rows.append(("actmap, marginal over the shards' span", n - n // 4, span, res["actmap"]["marginal_span"],
                         float("nan"), res["actmap"]["marginal_span"] / top))
            rows.append(("actmap, first shard start to last shard end", n, runs["all"]["busy_seconds"], steady,
                         float("nan"), steady / top))
        if not args.no_raydata:
            import ray

            if not ray.is_initialized():
                # one CPU for the actor pool, one (at least) for the read tasks
                ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, logging_level=logging.WARNING,
                         runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
            # encoded bytes: decoded in the model's actor, then in tasks of their own
            variants = [("raydata_in_actor", False, "decoding in the model's actor"),
                        ("raydata", True, "decoding in tasks")] if kind in ("parquet", "webdataset") else \
                [("raydata", True, "")]
            for key, decode_tasks, label in variants:
                found: dict[str, list[dict]] = {"quarter": [], "all": []}
                for _ in range(args.repeats):
                    for q, count in (("quarter", n // 4), ("all", n)):
                        found[q].append(ray_data_run(kind, paths[q], count, args.size, str(work / f"rd-{q}"),
                                                     args.batch, decode_tasks))
                median = {q: {k: statistics.median(r[k] for r in runs) for k in ("seconds", "span")}
                          for q, runs in found.items()}
                print(f"{kind}: Ray Data runs{', ' + label if label else ''}, seconds (start to end / first batch "
                      "in the model to the last row written): " + "; ".join(
                          f"{q} " + ", ".join(f"{r['seconds']:.2f}/{r['span']:.2f}" for r in runs)
                          for q, runs in found.items()), flush=True)
                whole, span = (median["all"][k] - median["quarter"][k] for k in ("seconds", "span"))
                res[key] = {"marginal": _marginal(n - n // 4, whole), "marginal_span": _marginal(n - n // 4, span),
                            "quarter": median["quarter"]["seconds"], "all": median["all"]["seconds"], "runs": found}
                suffix = f", {label}" if label else ""
                rows.append((f"Ray Data end to end, marginal{suffix}", n - n // 4, whole, res[key]["marginal"],
                             float("nan"), res[key]["marginal"] / top))
                rows.append((f"Ray Data, marginal over its span{suffix}", n - n // 4, span, res[key]["marginal_span"],
                             float("nan"), res[key]["marginal_span"] / top))
            ray.shutdown()  # its processes would take CPU from the next actmap runs
        print(f"\n{kind}: {n:,} samples")
        print(_table(["run", "rows", "seconds", "rows/s", "MB/s", "x floor (same threads; end to end: N)"], rows))
        if "actmap" in res:
            a = res["actmap"]
            print(f"peak memory, N/4 -> N samples: driver {a['quarter']['driver_rss_mb']:.0f} -> "
                  f"{a['all']['driver_rss_mb']:.0f} MB, actor {a['quarter']['actor_rss_mb']:.0f} -> "
                  f"{a['all']['actor_rss_mb']:.0f} MB")
            for key, label in (("raydata_in_actor", "Ray Data decoding in its model's actor"),
                               ("raydata", "Ray Data" + (" decoding in tasks" if "raydata_in_actor" in res else ""))):
                if key in res:
                    print(f"actmap / {label}, marginal: {a['marginal'] / res[key]['marginal']:.2f}x; over the spans: "
                          f"{a['marginal_span'] / res[key]['marginal_span']:.2f}x")
        results["kinds"][kind] = res
        sys.stdout.flush()
    if args.plan_files:
        plan = plan_folder(work, args.plan_files, args.plan_repeats)
        results["plan"] = plan
        print(f"\nplanning a folder of {plan['plan_count']:,} files (medians of {args.plan_repeats} rounds): "
              f"{plan['plan']:.2f} s; one os.scandir walk {plan['scandir']:.2f} s ({plan['plan_vs_scandir']:.2f}x, "
              f"the median of the rounds' ratios), one pyarrow.fs listing {plan['pyarrow']:.2f} s "
              f"({plan['plan_vs_pyarrow']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
