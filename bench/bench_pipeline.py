"""actmap against the raw forward and a Ray Data baseline, measured in one run.

For one model and config (default: ResNet-18, layers layer3 + layer4, generated images of
112 px), on the same images, with the same batch size:

a. the raw forward: torch, ``inference_mode``, the batches already stacked and normalised in
   memory (on the device), the whole model;
b. the forward with hooks on the layers, through the wrapper the actors use
   (:class:`pipeline._models.LayerOutputs`: an ``ActivationMapGrabber``, ``stop_early`` as
   configured), then also each map cast to the stored dtype and copied to host memory;
c. actmap end to end: ``pipeline.run`` (the trial sample, actor start, every shard), and its
   steady-state rate from the shard records, with where the actors' time went
   (``load_wait``, ``forward``, ``write_wait`` from ``OUT/_actmap/shards/*.json``);
d. Ray Data: ``from_numpy`` -> ``map_batches`` (a callable class that builds the model with
   ``ActivationMapGrabber``, ``compute=ActorPoolStrategy(size=actors)``) -> ``write_parquet``,
   end to end, the same images and layers.

Each rate is also given as a ratio to (a), measured in the same run. On the CPU, (a) and (b) run
in ``actors`` fresh processes of ``cpus_per_actor`` torch threads each, the layout of the actor
pool (Ray gives each actor ``OMP_NUM_THREADS = cpus_per_actor``): one process with all the
threads is not the same machine use, and on a loaded host intra-op threads that spin-wait for
each other can run several times slower than single-threaded processes. On a GPU they run here.

Sources: ``generated`` (default) makes actmap's actors generate the images themselves (the
project's ``source.kind: generated``, the same images (a) and (d) get from memory), so its load
stage includes the generator; ``memory`` has them read a ``.npy`` file of the pre-generated
images (``source.kind: dataset``), which isolates the pipeline from the generator's cost.

Run ``python bench/bench_pipeline.py``; ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

# the rows of the table, in order
RAW = "raw forward"
HOOKS = "forward + hooks"
HOST = "forward + hooks + cast + copy to host"
ACTMAP = "actmap end to end"
STEADY = "actmap steady state"
RAYDATA = "Ray Data end to end"
RECHECK = "raw forward, again"

log = logging.getLogger("bench_pipeline")


# -- images ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def pregenerate(count: int, size: int, seed: int = 0) -> np.ndarray:
    """The ``(count, 3, size, size)`` uint8 images of ``source.kind: generated`` with ``seed``."""
    from pipeline._sources.generated import generate

    out = np.empty((count, 3, size, size), dtype=np.uint8)

    def fill(i: int) -> None:
        out[i] = generate(i, size, seed)[0].numpy()

    # torch on one thread per image (the generator's tiny interpolations run slower on several),
    # the images on every core (numpy's work releases the GIL)
    with _torch_threads(1), ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(fill, range(count)))
    return out


class MemoryImages(torch.utils.data.Dataset):
    """The images of a ``.npy`` file ``(N, 3, H, W)`` uint8, as ``(image, label 0)`` items.

    The ``memory`` source of this benchmark (``source.target:
    bench.bench_pipeline:MemoryImages``): reading it costs a memory copy, so actmap's load stage
    measures the pipeline, not the generator.
    """

    def __init__(self, path: str):
        self.path = path
        self.images = np.load(path, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return torch.from_numpy(np.array(self.images[i])), 0


# -- configs --------------------------------------------------------------------------------------


def make_config(args: argparse.Namespace, output: str, images_path: str | None = None) -> dict:
    """The actmap config dict of this benchmark (a plain dict for ``Config.from_dict``)."""
    if args.source == "memory":
        source = {"kind": "dataset", "target": "bench.bench_pipeline:MemoryImages",
                  "kwargs": {"path": images_path}}
    else:
        source = {"kind": "generated", "count": args.count, "image_size": args.size, "seed": args.seed}
    return {
        "model": {"name": args.model, "layers": list(args.layers), "precision": args.precision,
                  "channels_last": args.channels_last, "stop_early": not args.no_stop_early},
        "source": source,
        "dump": {"dtype": args.dtype, "compression": args.compression},
        "run": {"output": output, "actors": args.actors, "cpus_per_actor": args.cpus_per_actor,
                "gpus_per_actor": "auto" if args.gpus_per_actor is None else args.gpus_per_actor,
                "batch_size": args.batch,
                "shard_size": args.shard_size},
    }


def _autocast(device: torch.device, precision: str):
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision in dtypes:
        return torch.autocast(device.type, dtype=dtypes[precision])
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- (a), (b): the raw forward ----------------------------------------------------------------------

MODES = (RAW, HOOKS, HOST)


def _raw_worker(rank: int, config: dict, images: np.ndarray, batch: int, device: str, threads: int,
                warmup: int, repeats: int, modes: Sequence[str], barrier, results) -> None:
    """Time the raw modes over ``images`` in this process; puts ``(rank, {mode: [(t0, t1), ...]})``.

    The modes take turns, ``repeats`` rounds. Every process waits at ``barrier`` before each
    timed pass, so the passes line up and the pool's rate is (all images) / (last end - first
    start). Times are ``time.monotonic()``, one clock for every process of the machine.
    """
    import copy

    from pipeline.config import Config
    from pipeline._models import LayerOutputs, build_model
    from pipeline._preprocess import to_model_input
    from pipeline._reduce import reduce_output

    try:
        torch.set_num_threads(threads)
        device = torch.device(device)
        cfg = Config.from_dict(config)
        spec = cfg.model
        mean_std = cfg.source.preprocess.mean_std()
        model = build_model(spec)
        if spec.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model = model.to(device)
        layers = LayerOutputs(copy.deepcopy(model), spec)  # the hooks go on a copy
        batches = [to_model_input(torch.from_numpy(np.array(images[i:i + batch])).to(device), mean_std,
                                  spec.channels_last) for i in range(0, len(images), batch)]

        def to_host(x):
            for name, out in layers(x).items():
                reduce_output(out, cfg.dump, name).to("cpu").numpy()

        steps = {RAW: model, HOOKS: layers, HOST: to_host}
        times: dict[str, list] = {mode: [] for mode in modes}
        with torch.inference_mode(), _autocast(device, spec.precision.value):
            for mode in modes:
                for x in batches[:warmup]:
                    steps[mode](x)
            for _ in range(repeats):
                for mode in modes:
                    _sync(device)
                    barrier.wait()
                    t0 = time.monotonic()
                    for x in batches:
                        steps[mode](x)
                    _sync(device)
                    times[mode].append((t0, time.monotonic()))
        layers.remove()
        results.put((rank, times))
    except BaseException as exc:
        barrier.abort()
        results.put((rank, f"{type(exc).__name__}: {exc}"))
        raise


def raw_forward(config: dict, images: np.ndarray, batch: int, device: torch.device, processes: int,
                threads: int, warmup: int = 2, repeats: int = 1, modes: Sequence[str] = MODES,
                timeout: float = 900.0) -> list[dict]:
    """Rates of the forward alone, with hooks, and with the maps cast and on the host.

    With ``processes`` > 1 (the CPU, one per actor) the images are split between that many
    fresh processes of ``threads`` torch threads each, the layout of the actor pool; else the
    forward runs here. Each rate is the median over ``repeats`` rounds.
    """
    import multiprocessing as mp
    import queue as queues
    import threading

    spec = config["model"]
    if processes <= 1:
        results: queues.Queue = queues.Queue()
        with _torch_threads(threads):
            _raw_worker(0, config, images, batch, str(device), threads, warmup, repeats, tuple(modes),
                        threading.Barrier(1), results)
        outcomes = [results.get()]
    else:
        ctx = mp.get_context("spawn")
        barrier, results = ctx.Barrier(processes, timeout=timeout), ctx.Queue()
        bounds = np.linspace(0, len(images), processes + 1).astype(int)
        workers = [ctx.Process(target=_raw_worker, args=(rank, config, images[a:b], batch, str(device), threads,
                                                          warmup, repeats, tuple(modes), barrier, results),
                               daemon=True)
                   for rank, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
        for w in workers:
            w.start()
        try:
            outcomes = []
            deadline = time.monotonic() + timeout
            while len(outcomes) < len(workers):
                try:
                    outcomes.append(results.get(timeout=1.0))
                except queues.Empty:
                    dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                    if dead or time.monotonic() > deadline:
                        barrier.abort()
                        raise RuntimeError(f"a raw-forward process ended with exit code {dead[0]} (see its "
                                           "output above)" if dead else f"the raw forward took over {timeout:g} s")
        finally:
            for w in workers:
                w.join(timeout=30)
                if w.is_alive():
                    w.kill()
    failed = [o for o in outcomes if isinstance(o[1], str)]
    if failed:
        raise RuntimeError(f"the raw forward failed in process {failed[0][0]}: {failed[0][1]}")
    where = (f"{processes} process(es) x {threads} torch thread(s)" if device.type == "cpu" else str(device))
    notes = {RAW: f"{spec['name']}, whole model, {where}",
             HOOKS: f"{', '.join(spec['layers'])}; stop_early={spec['stop_early']}",
             HOST: f"to {config['dump']['dtype']}, .cpu().numpy()"}
    rows = []
    for mode in modes:
        windows = [max(o[1][mode][r][1] for o in outcomes) - min(o[1][mode][r][0] for o in outcomes)
                   for r in range(repeats)]
        rows.append(_row(mode, len(images), float(np.median(windows)),
                         notes[mode] + (f"; median of {repeats}" if repeats > 1 else "")))
    return rows


def _row(name: str, images: int, seconds: float, note: str = "") -> dict:
    return {"run": name, "images": images, "seconds": seconds,
            "images_per_s": images / seconds if seconds > 0 else 0.0, "note": note}


# -- (c): actmap ----------------------------------------------------------------------------------


def run_actmap(config: dict) -> tuple[list[dict], dict]:
    """``pipeline.run`` end to end; its rows and the breakdown of the actors' time."""
    import pipeline
    from pipeline.config import Config

    cfg = Config.from_dict(config)
    summary = pipeline.run(cfg, stream=None)
    records = [json.loads(p.read_text()) for p in sorted(Path(cfg.run.output, "_actmap", "shards").glob("*.json"))]
    if not records:
        raise RuntimeError(f"no shard records under {cfg.run.output}/_actmap/shards")
    totals = {"load_wait": 0.0, "device_wait": 0.0, "forward": 0.0, "write_wait": 0.0, "total": 0.0}
    by_actor: dict[object, list[dict]] = {}
    for r in records:
        by_actor.setdefault(r["worker"]["pid"], []).append(r)
        for key in totals:
            totals[key] += r["seconds"].get(key, 0.0)
    bad = sum(len(r["bad"]) for r in records)
    # Steady state: as if every actor started at once, all rows over the busiest actor's shard
    # seconds, each actor's first shard (its warm-up: first forwards, kernel selection) left out
    # when every actor did more than one. An actor runs two shards at once and the forwards
    # take turns, so a shard's wait for the other's forward (device_wait) is not its own time.
    warm = all(len(rs) > 1 for rs in by_actor.values())
    used = [sorted(rs, key=lambda r: r["shard"])[1 if warm else 0:] for rs in by_actor.values()]
    busiest = max(sum(r["seconds"]["total"] - r["seconds"].get("device_wait", 0.0) for r in rs)
                  for rs in used)
    steady_rows = sum(r["stop"] - r["start"] - len(r["bad"]) for rs in used for r in rs)
    steady = steady_rows / busiest if busiest > 0 else 0.0
    images = summary.new_samples - bad
    written = sum(summary.bytes.values())
    rows = [_row(ACTMAP, images, summary.seconds, f"{summary.actors} actor(s), {summary.shards} shards, "
                 f"incl. trial sample + actor start"),
            _row(STEADY, steady_rows, busiest, "rows / busiest actor's shard seconds less device waits"
                 + (", first shard of each actor left out" if warm else ", all shards (warm-up included)"))]
    stages = ("load_wait", "device_wait", "forward", "write_wait")
    other = totals["total"] - sum(totals[k] for k in stages)
    breakdown = {
        "seconds": {**{k: totals[k] for k in stages}, "other": other, "total": totals["total"]},
        "fractions": {k: (v / totals["total"] if totals["total"] else 0.0) for k, v in
                      {**{k: totals[k] for k in stages}, "other": other}.items()},
        "fixed_seconds": summary.seconds - (images / steady if steady else 0.0),
        "mb_written": written / 1e6,
        "mb_per_s": written / 1e6 / summary.seconds if summary.seconds else 0.0,
        "actors": summary.actors, "shards": len(records), "bad": bad,
        "rows": dict(summary.rows),
    }
    return rows, breakdown


# -- (d): Ray Data --------------------------------------------------------------------------------


class GrabLayers:
    """Ray Data's callable class: the model, wrapped in an ActivationMapGrabber, built once."""

    def __init__(self, config: dict):
        import warnings

        from extender import ActivationMapGrabber
        from pipeline.config import Config
        from pipeline._models import build_model

        # Ray Data hands read-only arrays; the input is only read (to_model_input makes a new tensor)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        cfg = Config.from_dict(config)
        self.spec, self.dump = cfg.model, cfg.dump
        self.mean_std = cfg.source.preprocess.mean_std()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_model(self.spec)
        if self.spec.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.grabber = ActivationMapGrabber(model.to(self.device), list(self.spec.layers),
                                            stop_early=self.spec.stop_early, detach=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline._preprocess import to_model_input
        from pipeline._reduce import reduce_output

        pixels = torch.from_numpy(batch["data"]).to(self.device)
        x = to_model_input(pixels, self.mean_std, self.spec.channels_last)
        with torch.inference_mode(), _autocast(self.device, self.spec.precision.value):
            _, maps = self.grabber(x)
        return {name: reduce_output(out, self.dump, name).cpu().numpy() for name, out in maps.items()}


def run_ray_data(config: dict, images: np.ndarray, batch: int, actors: int, cpus: float, gpus: float,
                 output: str) -> list[dict]:
    """``from_numpy -> map_batches(GrabLayers, ActorPoolStrategy) -> write_parquet``, end to end."""
    import pyarrow.parquet as pq
    import ray
    import ray.data

    if __name__ != "__main__":  # imported (tests): ship this module's code to the Ray Data actors
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    t0 = time.perf_counter()
    blocks = [images[i:i + batch] for i in range(0, len(images), batch)]  # aligned with the batches
    ds = ray.data.from_numpy(blocks)
    ds = ds.map_batches(GrabLayers, fn_constructor_kwargs={"config": config}, batch_size=batch,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=cpus, num_gpus=gpus)
    ds.write_parquet(output)
    seconds = time.perf_counter() - t0
    written = sum(pq.ParquetFile(p).metadata.num_rows for p in Path(output).rglob("*.parquet"))
    if written != len(images):
        raise RuntimeError(f"Ray Data wrote {written} rows, expected {len(images)}")
    return [_row(RAYDATA, len(images), seconds, f"ActorPoolStrategy(size={actors}), incl. actor start")]


# -- the whole benchmark ----------------------------------------------------------------------------


def _ensure_ray(cpus_needed: float) -> bool:
    """Start a local Ray unless one is up; returns whether it was started here."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only local cluster
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    # Ray Data's write tasks need a CPU beside the actors'; logical CPUs, not cores
    ray.init(num_cpus=max(os.cpu_count() or 1, int(np.ceil(cpus_needed))), include_dashboard=False,
             logging_level=logging.WARNING, runtime_env={"env_vars": {"PYTHONPATH": path}})
    return True


def _images(args: argparse.Namespace, workdir: str) -> tuple[np.ndarray, str | None]:
    """The images, from the ``--images`` cache when it holds them; and the ``.npy`` path (if any)."""
    shape = (args.count, 3, args.size, args.size)
    if args.images and os.path.exists(args.images):
        cached = np.load(args.images, mmap_mode="r")
        if cached.shape == shape and cached.dtype == np.uint8:
            return np.ascontiguousarray(cached), args.images
        log.warning("%s holds %s %s, not %s uint8: generating anew", args.images, cached.shape, cached.dtype, shape)
    images = pregenerate(args.count, args.size, args.seed)
    path = args.images or (os.path.join(workdir, "images.npy") if args.source == "memory" else None)
    if path:
        np.save(path, images)
    return images, path


def measure(args: argparse.Namespace) -> dict:
    """Run (a)-(d) as ``args`` say; returns ``{"rows", "breakdown", "settings"}``."""
    import ray

    device = torch.device(args.device)
    if args.gpus_per_actor is None:
        args.gpus_per_actor = 1.0 if device.type == "cuda" else 0.0
    if args.source == "memory" and str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the driver's trial sample imports bench.bench_pipeline
    workdir = tempfile.mkdtemp(prefix="bench-pipeline-", dir=args.workdir)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    try:
        t0 = time.perf_counter()
        images, images_path = _images(args, workdir)
        generate_s = time.perf_counter() - t0
        config = make_config(args, os.path.join(workdir, "actmap"), images_path)
        processes = args.actors if device.type == "cpu" else 1
        cpus = _cpus_per_actor(args, device)
        threads = max(1, int(cpus)) if device.type == "cpu" else torch.get_num_threads()
        rows = raw_forward(config, images, args.batch, device, processes, threads, repeats=args.repeats)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # leave the GPU's memory to the actors
        started = _ensure_ray(args.actors * cpus + 1)
        try:
            actmap_rows, breakdown = run_actmap(config)
            rows += actmap_rows
            if not args.no_raydata:
                # Ray Data's read and write tasks need a CPU beside its actors'
                rows += run_ray_data(config, images, args.batch, args.actors,
                                     cpus if device.type == "cpu" else max(1, cpus - 1),
                                     args.gpus_per_actor, os.path.join(workdir, "raydata"))
        finally:
            if started:
                ray.shutdown()
        if not args.no_recheck:  # the host's speed may have drifted while the others ran
            again = raw_forward(config, images, args.batch, device, processes, threads, modes=(RAW,))[0]
            rows.append({**again, "run": RECHECK, "note": "the same, after the others: drift of the host"})
    finally:
        if args.keep:
            print(f"outputs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    raw = rows[0]["images_per_s"]
    for row in rows:
        row["vs_raw"] = row["images_per_s"] / raw if raw else 0.0
    settings = {k: v for k, v in vars(args).items() if k not in ("json",)}
    settings.update(cpus_per_actor=cpus, device_name=_device_name(device), torch=torch.__version__, ray=ray.__version__,
                    cores=os.cpu_count(), load_average_before=load,
                    load_average_after=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                    pregenerate_s=generate_s)
    return {"rows": rows, "breakdown": breakdown, "settings": settings}


def _cpus_per_actor(args: argparse.Namespace, device: torch.device) -> float:
    """``--cpus-per-actor``, with ``auto`` resolved as actmap resolves it on this machine."""
    if args.cpus_per_actor != "auto":
        return float(args.cpus_per_actor)
    if device.type == "cuda":
        return float(max(1, (os.cpu_count() or 1) // max(1, torch.cuda.device_count())))
    return 1.0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {os.cpu_count()} cores"


def format_report(result: dict) -> str:
    """The rates table and the actmap breakdown, as text."""
    s, b = result["settings"], result["breakdown"]
    lines = [f"{s['model']} {'+'.join(s['layers'])}, {s['count']} images of {s['size']} px "
             f"({s['source']} source), batch {s['batch']}, {s['precision']}"
             f"{', channels_last' if s['channels_last'] else ''}, {s['actors']} actor(s) x "
             f"{s['cpus_per_actor']:g} CPU / {s['gpus_per_actor']:g} GPU, on {s['device_name']}"
             + (f"; load average {s['load_average_before']:.2f} -> {s['load_average_after']:.2f}"
                if s.get("load_average_before") is not None else ""), ""]
    head = ["run", "images", "seconds", "images/s", "x raw forward", "note"]
    body = [[r["run"], str(r["images"]), f"{r['seconds']:.2f}", f"{r['images_per_s']:,.1f}",
             f"{r['vs_raw']:.3f}", r["note"]] for r in result["rows"]]
    lines += _grid(head, body, right=(1, 2, 3, 4))
    again = [r for r in result["rows"] if r["run"] == RECHECK]
    if again:
        lines.append(f"the raw forward measured again at the end ran at {again[0]['vs_raw']:.2f}x the first: "
                     "read every ratio with that much noise")
    sec, frac = b["seconds"], b["fractions"]
    lines += ["", f"actmap: where the actors' time went (summed over {b['shards']} shards on "
              f"{b['actors']} actor(s))", ""]
    body = [[name, f"{sec[key]:.2f}", f"{frac[key]:.1%}"] for name, key in (
        ("load wait (loader thread behind)", "load_wait"),
        ("device wait (the actor's other shard held it)", "device_wait"),
        ("forward (stack, normalise, model, cast)", "forward"),
        ("write wait (writer thread behind)", "write_wait"), ("other (commit files, record)", "other"))]
    body.append(["shard total", f"{sec['total']:.2f}", "100.0%"])
    lines += _grid(["stage", "seconds", "share"], body, right=(1, 2))
    lines += ["", f"fixed cost outside the steady state (trial sample, actor start, tail): "
              f"{b['fixed_seconds']:.1f} s; written {b['mb_written']:.1f} MB "
              f"({b['mb_per_s']:.1f} MB/s over the whole run)"]
    return "\n".join(lines)


def _grid(head: Sequence[str], body: Sequence[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "| " + " | ".join(  # noqa: E731
        c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    return [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in body]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="torchvision model (default resnet18)")
    parser.add_argument("--layers", default="layer3,layer4", type=lambda s: s.split(","),
                        help="comma-separated layer ids (default layer3,layer4)")
    parser.add_argument("--size", type=int, default=112, help="image size in px (default 112)")
    parser.add_argument("--count", type=int, default=768, help="images (default 768)")
    parser.add_argument("--batch", type=int, default=32, help="batch size, everywhere (default 32)")
    parser.add_argument("--actors", type=int, default=2, help="actmap actors = Ray Data pool size (default 2)")
    parser.add_argument("--cpus-per-actor", type=lambda v: v if v == "auto" else float(v), default="auto",
                        help="CPUs per actor, or auto as actmap resolves it (default: 1 on the CPU, the "
                             "host's CPUs per GPU on a GPU)")
    parser.add_argument("--gpus-per-actor", type=float, default=None,
                        help="GPUs per actor (default: 1 with --device cuda, else 0)")
    parser.add_argument("--shard-size", type=int, default=128, help="actmap shard size (default 128)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"], help="device of the raw forward (actors pick the GPU "
                        "when they get one)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-stop-early", action="store_true", help="run the whole model with hooks")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                        help="stored dtype (default float16)")
    parser.add_argument("--compression", default="zstd", choices=["none", "zstd", "snappy", "lz4"])
    parser.add_argument("--source", default="generated", choices=["generated", "memory"],
                        help="what actmap's actors read (see the module docstring)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the raw modes; the median "
                        "is shown (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-raydata", action="store_true", help="skip the Ray Data baseline")
    parser.add_argument("--no-recheck", action="store_true", help="skip the second raw forward at the end")
    parser.add_argument("--images", default=None, help="a .npy cache of the generated images: read "
                        "when it holds them (with this --count, --size; --seed is not checked), else written")
    parser.add_argument("--workdir", default=None, help="where the dumps go (default: the temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the dumps")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse the options, measure, print the report; returns the result dict."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = measure(args)
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
