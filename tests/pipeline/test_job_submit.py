"""`actmap run` submitted as a Ray job through the real job server, as on a cluster.

A Ray head is started with `ray start --head` (dashboard and job API on 127.0.0.1), the job is
sent with `ray job submit --working-dir` the way cluster.yaml documents it, and the dump it wrote
is read back: complete, every sample exactly once, written by actors of that cluster.

The head runs with token authentication: Ray turns ``--node-ip-address=127.0.0.1`` into the
host's address and its GCS and raylet listen on every interface, so a head without a token would
take code from anyone on the network while the test runs. The token lives only in the
environment of the processes started here. Nothing here calls ``ray.init``, and the teardown
stops exactly the processes of this head (all are in the session `ray start` leads, and carry a
marker in their environment); `ray stop --force` would also kill the session's in-process Ray and
any other Ray on the machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipeline import inspect_dump, read_table
from support.processes import free_ports, stop_marked

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
RAY = Path(sys.executable).parent / "ray"
MARKER = "ACTMAP_TEST_RAY_HEAD"

COUNT = 40
LAYERS = ["conv2", "fc"]
JOB_CONFIG = {
    "model": {"name": "support.models:tiny", "layers": LAYERS},
    "source": {"kind": "generated", "count": COUNT, "image_size": 16, "seed": 3},
    "dump": {"dtype": "float32"},
    "run": {"actors": 1, "cpus_per_actor": 1, "batch_size": 4, "shard_size": 8},
}


@dataclasses.dataclass
class Head:
    url: str
    env: dict[str, str]
    token: str

    def get(self, path: str, token: str | None = None) -> dict:
        request = urllib.request.Request(self.url + path)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


@pytest.fixture
def ray_head() -> Iterator[Head]:
    """A Ray head started with `ray start --head`, for this test alone."""
    temp = tempfile.mkdtemp(prefix="actmap-rayjob-", dir="/tmp")  # short: Ray's socket paths
    token = secrets.token_hex(32)
    marker = f"{MARKER}={os.path.basename(temp)}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_TMPDIR": temp,  # its session files and address file stay out of /tmp/ray
        "PATH": os.pathsep.join([str(RAY.parent), env.get("PATH", "")]),  # `actmap` for the job
        # the job's `actmap` imports this checkout's packages, not whichever the venv installed
        "PYTHONPATH": str(ROOT),
        MARKER: os.path.basename(temp),
    })
    gcs, dashboard, agent, client = free_ports(4)
    start = [str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
             f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
             "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp}/ray", "--disable-usage-stats"]
    # in a session of its own, which every process of the head stays in
    starter = subprocess.Popen(start, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = starter.communicate(timeout=120)
        assert starter.returncode == 0, f"ray start failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
        yield Head(f"http://127.0.0.1:{dashboard}", env, token)
    finally:
        left = stop_marked(marker, session=starter.pid)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"processes of the test head could not be stopped: {left}"


def test_actmap_run_as_a_ray_job(ray_head: Head, tmp_path: Path):
    # the job's folder: its config and the model's code, which travels with --working-dir
    workdir = tmp_path / "job"
    workdir.mkdir()
    (workdir / "dump.yaml").write_text(yaml.safe_dump(JOB_CONFIG))
    shutil.copytree(TESTS / "support", workdir / "support", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "out"
    submission = f"actmap-test-{secrets.token_hex(4)}"

    submit = [str(RAY), "job", "submit", "--address", ray_head.url, "--submission-id", submission,
              "--working-dir", str(workdir), "--",
              "actmap", "run", "dump.yaml", "--set", f"run.output={out}", "--quiet"]
    started = time.monotonic()
    job = subprocess.run(submit, env=ray_head.env, capture_output=True, text=True, timeout=300)
    logs = f"{job.stdout[-6000:]}\n{job.stderr[-3000:]}"
    assert job.returncode == 0, f"the job failed:\n{logs}"
    assert f"{COUNT} samples, {len(LAYERS)} layer(s)" in job.stdout + job.stderr, logs

    # the job server agrees, and only a caller with the token may ask it
    info = ray_head.get(f"/api/jobs/{submission}", token=ray_head.token)
    assert info["status"] == "SUCCEEDED", info
    with pytest.raises(urllib.error.HTTPError) as refused:
        ray_head.get(f"/api/jobs/{submission}")
    assert refused.value.code == 401

    # complete, every sample exactly once in every layer
    dump = inspect_dump(str(out))
    assert dump.complete, dump.format()
    assert dump.shards_done == dump.shards_planned == COUNT // JOB_CONFIG["run"]["shard_size"]
    for layer in LAYERS:
        table = read_table(str(out), layer)
        assert table.column("index").to_pylist() == list(range(COUNT)), layer
        ids = table.column("sample_id").to_pylist()
        assert len(set(ids)) == len(ids) == COUNT, layer
        assert dump.layers[layer]["rows"] == COUNT

    # the actors were this cluster's, not a Ray the job started for itself
    records = [json.loads(p.read_text()) for p in sorted((out / "_actmap" / "shards").glob("*.json"))]
    assert len(records) == dump.shards_planned
    assert {r["worker"]["node"] for r in records} == {info["driver_node_id"]}
    print(f"job submit to done: {time.monotonic() - started:.1f}s")


def test_a_stopped_ray_job_lets_go_of_its_output_and_its_rerun_resumes(ray_head: Head, tmp_path: Path):
    # `ray job stop` sends SIGTERM: the run stops as on Ctrl-C, clears its temporary files and lets
    # go of its lock (a run killed outright kept it, and a rerun on another host waited out the lease)
    workdir = tmp_path / "job"
    workdir.mkdir()
    samples = 2 * COUNT  # 10 shards of 8, 0.3 s a sample: 12 s of reads on the actor's 2 lanes
    slow = {**JOB_CONFIG, "source": {"kind": "dataset", "target": "support.datasets:Slow",
                                     "kwargs": {"n": samples, "size": 16, "delay": 0.3},
                                     "preprocess": {"normalize": "none"}}}
    (workdir / "dump.yaml").write_text(yaml.safe_dump(slow))
    shutil.copytree(TESTS / "support", workdir / "support", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "out"

    def submit(submission: str, *extra: str) -> list[str]:
        return [str(RAY), "job", "submit", "--address", ray_head.url, "--submission-id", submission,
                "--working-dir", str(workdir), *extra, "--", "actmap", "run", "dump.yaml", "--set",
                f"run.output={out}", "--quiet"]

    first = f"actmap-test-{secrets.token_hex(4)}"
    # the job server's supervisor waits this long after SIGTERM before it kills (3 s by default)
    env_vars = json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}})
    sent = subprocess.run(submit(first, "--no-wait", "--runtime-env-json", env_vars), env=ray_head.env,
                          capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr[-3000:]
    records = out / "_actmap" / "shards"
    deadline = time.monotonic() + 240
    while not (records.is_dir() and any(records.glob("*.json"))):
        assert time.monotonic() < deadline, "no shard of the first job finished"
        status = ray_head.get(f"/api/jobs/{first}", token=ray_head.token)["status"]
        assert status in ("PENDING", "RUNNING"), f"the first job is {status} before its first shard"
        time.sleep(0.5)
    stop = subprocess.run([str(RAY), "job", "stop", "--address", ray_head.url, first], env=ray_head.env,
                          capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr[-3000:]
    assert ray_head.get(f"/api/jobs/{first}", token=ray_head.token)["status"] == "STOPPED"
    logs = subprocess.run([str(RAY), "job", "logs", "--address", ray_head.url, first], env=ray_head.env,
                          capture_output=True, text=True, timeout=60).stdout
    assert "actmap: terminated (SIGTERM); rerun the same command to resume" in logs, logs[-3000:]
    assert not (out / "_actmap" / "lock.json").exists(), "the stopped job let go of the output"
    assert not list(out.rglob(".*.tmp"))
    done = len(list(records.glob("*.json")))
    assert done < samples // slow["run"]["shard_size"]

    again = subprocess.run(submit(f"actmap-test-{secrets.token_hex(4)}"), env=ray_head.env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, f"{again.stdout[-6000:]}\n{again.stderr[-3000:]}"
    assert "taking over the lock" not in again.stdout + again.stderr
    assert f"({done} already done)" in again.stdout + again.stderr
    dump = inspect_dump(str(out))
    assert dump.complete, dump.format()
    assert read_table(str(out), "fc").column("index").to_pylist() == list(range(samples))
