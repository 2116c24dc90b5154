"""CPU per row of the same ``ShardWorker`` in plain processes and in Ray actors, side by side.

Does Ray's actor machinery cost an actor CPU beyond the work itself? Two workers dump the same
Parquet rows (``bench_sources``'s dataset: 100,000 JPEG images of 64 px in 20 files, made once
and cached) with ``bench_sources``'s cheap model, each with one decoding thread and two shards
at once, as the executor runs them on a 2-core host:

- ``plain``: two processes (spawned), each taking every other shard;
- ``ray``: two Ray actors of one CPU (``max_concurrency`` 3, as the executor makes them), fed
  shards as they free up.

For each: the span (the first shard's start to the last one's end), rows/s, and the workers'
CPU seconds over the span (``getrusage`` in the processes; ``/proc`` for the actors, whose
start-up is left out as the plain processes' is), per row. The variants take turns,
``--repeats`` rounds, and the medians are printed.

    python bench/bench_actor_cpu.py --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_sources import make_data  # noqa: E402
from pipeline._shards import ShardPlan  # noqa: E402
from pipeline.config import Config  # noqa: E402

WORKERS = 2
AT_ONCE = 2


def _config(data: str, output: str, batch: int, shard: int) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    return Config.from_dict({
        "model": {"name": "bench.bench_sources:cheap_model", "layers": ["conv"]},
        "source": {"kind": "parquet", "path": data, "id_column": "key"}, "dump": {"dtype": "float16"},
        "run": {"output": output, "batch_size": batch, "shard_size": shard}}).to_dict()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _plain_worker(config: dict, shards: list[dict], results) -> None:
    import torch

    from pipeline._worker import ShardWorker

    torch.set_num_threads(1)  # as Ray sets it in an actor of one CPU
    worker = ShardWorker(config, decode_threads=1, shards_at_once=AT_ONCE)
    began, used = time.time(), resource.getrusage(resource.RUSAGE_SELF)
    with ThreadPoolExecutor(AT_ONCE) as pool:
        list(pool.map(worker.run_shard, shards))
    now = resource.getrusage(resource.RUSAGE_SELF)
    results.put((began, time.time(), now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime))
    worker.close()


def plain(config: dict, shards: list[dict]) -> tuple[float, float]:
    """Two plain processes: (span seconds, CPU seconds)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_plain_worker, args=(config, shards[i::WORKERS], results))
                 for i in range(WORKERS)]
    for process in processes:
        process.start()
    found = [results.get() for _ in processes]
    for process in processes:
        process.join()
    return max(f[1] for f in found) - min(f[0] for f in found), sum(f[2] for f in found)


def in_ray(config: dict, shards: list[dict]) -> tuple[float, float]:
    """Two Ray actors of one CPU: (span seconds, CPU seconds)."""
    import ray

    from pipeline._worker import ShardWorker

    remote = ray.remote(ShardWorker).options(num_cpus=1, max_concurrency=AT_ONCE + 1)
    actors = [remote.remote(config=config, decode_threads=1, shards_at_once=AT_ONCE) for _ in range(WORKERS)]
    pids = [info["pid"] for info in ray.get([a.info.remote() for a in actors])]
    began, used = time.time(), [_cpu_seconds(p) for p in pids]
    todo, pending = list(shards), {}
    for actor in actors:
        for _ in range(AT_ONCE):
            if todo:
                pending[actor.run_shard.remote(todo.pop(0))] = actor
    while pending:
        (done,), _ = ray.wait(list(pending), num_returns=1)
        actor = pending.pop(done)
        ray.get(done)
        if todo:
            pending[actor.run_shard.remote(todo.pop(0))] = actor
    span, cpu = time.time() - began, sum(_cpu_seconds(p) - u for p, u in zip(pids, used))
    for actor in actors:
        ray.kill(actor)
    return span, cpu


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3, help="rounds, the variants taking turns (default 3)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=2048)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "actmap-bench-sources"),
                        help="the dataset is made here once and reused (shared with bench_sources.py)")
    args = parser.parse_args(argv)
    import ray

    data = make_data(Path(args.workdir), args.rows, 64, ["parquet"])["parquet"]["all"]
    shards = [dataclasses.asdict(s) for s in ShardPlan(args.rows, args.shard_size)]
    output = tempfile.mkdtemp()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=WORKERS, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    found: dict[str, list[tuple[float, float]]] = {"plain": [], "ray": []}
    try:
        for _ in range(args.repeats):
            for name, fn in (("plain", plain), ("ray", in_ray)):
                span, cpu = fn(_config(data, f"{output}/{name}", args.batch, args.shard_size), shards)
                found[name].append((span, cpu))
                print(f"{name:5s} span {span:5.2f} s, {args.rows / span:8,.0f} rows/s, CPU {cpu:5.2f} s, "
                      f"{cpu / args.rows * 1e6:4.0f} µs/row", flush=True)
    finally:
        if started_here:
            ray.shutdown()
        shutil.rmtree(output, ignore_errors=True)
    medians: dict = {name: {"span": statistics.median(r[0] for r in runs), "cpu": statistics.median(r[1] for r in runs)}
               for name, runs in found.items()}
    print(f"medians of {args.repeats}: " + "; ".join(
        f"{name} {args.rows / m['span']:,.0f} rows/s, {m['cpu'] / args.rows * 1e6:.0f} µs of CPU per row"
        for name, m in medians.items()))
    return medians


if __name__ == "__main__":
    main()
