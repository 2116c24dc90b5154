"""Shards at once on an actor of one CPU: local Parquet files against object storage that answers late.

An actor of one CPU runs two shards at once (:attr:`pipeline._scheduling.ActorPlan.shards_per_actor`):
on object storage one shard works while the other's reads wait on the store. This measures one
and two shards at once on both kinds of input: the same Parquet table (``--rows`` rows of 64 px JPEG images, 20 files) read
from the local disk, and from an S3 endpoint on loopback (a moto server in a process of its own)
behind a proxy that holds every request ``--latency-ms`` before passing it on. Each run is
``pipeline.run`` with the cheap model of ``bench_sources.py`` and the actors of one CPU this
machine holds, the shards at once forced to 1 and to 2; the rate is rows over the shards' span
(first shard's start to the last one's end), the median of ``--repeats`` runs, the settings
taking turns.

    python bench/bench_remote.py                  # 25,000 rows, 30 ms, 3 runs each: about 4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_sources import _table, make_data  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def serve_late(listen: int, target: int, delay: float) -> None:
    """A TCP proxy from ``listen`` to ``target`` that holds each piece of a request ``delay``
    seconds (the answers pass at once): every request costs a round trip to a far store."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hold: float) -> None:
        try:
            while data := await reader.read(1 << 16):
                if hold:
                    await asyncio.sleep(hold)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pipe(client_reader, server_writer, delay), pipe(server_reader, client_writer, 0.0))

    async def main() -> None:
        async with await asyncio.start_server(handle, "127.0.0.1", listen) as server:
            await server.serve_forever()

    asyncio.run(main())


def dump(source: str, output: str, shards_at_once: int) -> dict:
    """One run with the shards at once forced; its rows/s over the shards' span."""
    from pipeline import run
    from pipeline._scheduling import ActorPlan
    from pipeline.config import Config

    config = Config.from_dict({"model": {"name": "bench.bench_sources:cheap_model", "layers": ["conv"]},
                               "source": {"kind": "parquet", "path": source, "id_column": "key"},
                               "dump": {"dtype": "float16"},
                               "run": {"output": output, "batch_size": 256, "shard_size": 2048}})
    shutil.rmtree(output, ignore_errors=True)
    chosen = ActorPlan.shards_per_actor
    ActorPlan.shards_per_actor = property(lambda self: shards_at_once)
    try:
        summary = run(config, stream=None)
    finally:
        ActorPlan.shards_per_actor = chosen
    records = [json.loads(Path(p).read_text()) for p in glob.glob(f"{output}/_actmap/shards/*.json")]
    span = max(r["finished"] for r in records) - min(r["started"] for r in records)
    rows = sum(r["rows"]["conv"] for r in records)
    return {"rows": rows, "span": span, "actors": summary.actors,
            "load_wait": sum(r["seconds"]["load_wait"] for r in records)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=25_000)
    parser.add_argument("--latency-ms", type=float, default=30.0, help="added to every request to the store")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/actmap-bench-remote")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--serve-late", nargs=3, type=float, help=argparse.SUPPRESS)  # the proxy's own process
    args = parser.parse_args(argv)
    if args.serve_late:
        listen, target, delay = args.serve_late
        serve_late(int(listen), int(target), delay)
        return {}

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    local = make_data(work, args.rows, 64, ["parquet"])["parquet"]["all"]
    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        os.environ[key] = value  # the actors of the Ray started here inherit them
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # the actors import the model from this checkout
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    store, late = _free_port(), _free_port()
    processes = [subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(store)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                 subprocess.Popen([sys.executable, __file__, "--serve-late", str(late), str(store),
                                   str(args.latency_ms / 1000)])]
    import ray

    started = not ray.is_initialized()
    if started:  # one Ray for all the runs; its actors inherit the environment set above
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    try:
        _wait_for(store)
        _wait_for(late)
        import pyarrow.fs as pafs

        query = "scheme=http&allow_bucket_creation=true&endpoint_override=127.0.0.1:"
        fs, root = pafs.FileSystem.from_uri(f"s3://bench/table?{query}{store}")
        fs.create_dir(root, recursive=True)
        pafs.copy_files(local, root, destination_filesystem=fs)
        sources = {"local disk": local, f"S3, {args.latency_ms:g} ms a request": f"s3://bench/table?{query}{late}"}
        runs: dict[tuple[str, int], list[dict]] = {(name, k): [] for name in sources for k in (1, 2)}
        for _ in range(args.repeats):
            for (name, k), found in runs.items():
                found.append(dump(sources[name], str(work / "out"), k))
                if found[-1]["rows"] != args.rows:
                    raise RuntimeError(f"{name}, {k} at once: {found[-1]['rows']} rows written, not {args.rows}")
    finally:
        for process in processes:
            process.terminate()
            process.wait()
        if started:
            ray.shutdown()
    results: dict = {"settings": vars(args), "cpus": os.cpu_count(), "runs": {}}
    table = []
    for name in sources:
        rates = {}
        for k in (1, 2):
            found = runs[(name, k)]
            span = statistics.median(r["span"] for r in found)
            rates[k] = args.rows / span
            results["runs"][f"{name}, {k}"] = {"span": span, "rows_per_s": rates[k], "runs": found}
            spans = ", ".join(format(r["span"], ".2f") for r in found)
            waits = ", ".join(format(r["load_wait"], ".2f") for r in found)
            print(f"{name}, {k} shard(s) at once: spans {spans} s; load waits {waits} s", flush=True)
            table.append((name, k, found[0]["actors"], span, rates[k], rates[k] / rates[1]))
    print(f"\n{args.rows:,} Parquet rows, actors of one CPU, {os.cpu_count()} cores; medians of {args.repeats} runs")
    print(_table(["source", "shards at once", "actors", "span (s)", "rows/s", "x one at a time"], table))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
