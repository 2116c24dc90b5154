"""A dump spread over two Ray nodes: every node takes shards, every sample lands exactly once.

`ray.cluster_utils.Cluster` starts a head and a second node (a raylet each) on this machine.
The driver runs in a subprocess of its own, since the session's in-process Ray may already be
initialised in the pytest process. Each node has 2 CPUs and each actor asks for 2, so the two
actors (scheduled with SPREAD by the driver) must sit on different nodes; the shard records
then show which node wrote what.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from pipeline import inspect_dump, read_table
from support.processes import free_ports, stop_marked

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
MARKER = "ACTMAP_TEST_RAY_CLUSTER"

COUNT = 48
SHARD_SIZE = 6
LAYERS = ["relu1", "pool"]

DRIVER = textwrap.dedent("""
    import json, sys

    import ray
    from ray.cluster_utils import Cluster

    from pipeline import Config, run

    config, head_agent_port = json.loads(sys.argv[1]), int(sys.argv[2])
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "dashboard_agent_listen_port": head_agent_port})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        summary = run(Config.from_dict(config), stream=None)
        print("RESULT " + json.dumps({"nodes": nodes, "rows": summary.rows, "actors": summary.actors}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_shards_run_on_both_nodes_exactly_once(tmp_path: Path):
    out = tmp_path / "out"
    config = {
        "model": {"name": "support.models:tiny", "layers": LAYERS},
        "source": {"kind": "generated", "count": COUNT, "image_size": 16, "seed": 5},
        "run": {"output": str(out), "actors": 2, "cpus_per_actor": 2, "gpus_per_actor": 0,
                "batch_size": 4, "shard_size": SHARD_SIZE},
    }
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    temp = tempfile.mkdtemp(prefix="actmap-raynodes-", dir="/tmp")  # short: Ray's socket paths
    marker = f"{MARKER}={os.path.basename(temp)}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({
        # the repository first: its packages win over the tests/ folders of the same names
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]),
        "RAY_TMPDIR": temp,  # session files and the address file stay out of /tmp/ray
        "RAY_AUTH_MODE": "token",  # its ports listen beyond the loopback: not open to anyone
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        MARKER: os.path.basename(temp),
    })
    agent_port = free_ports(1)[0]
    # in a session of its own, which every process of its cluster stays in
    driver = subprocess.Popen([sys.executable, str(script), json.dumps(config), str(agent_port)], env=env,
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        stdout, stderr = driver.communicate(timeout=240)
    finally:
        left = stop_marked(marker, session=driver.pid)
        shutil.rmtree(temp, ignore_errors=True)
    logs = f"{stdout[-4000:]}\n{stderr[-6000:]}"
    assert driver.returncode == 0, logs
    assert not left, f"processes of the test cluster could not be stopped: {left}"
    (line,) = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    assert len(result["nodes"]) == 2 and result["actors"] == 2, result
    assert result["rows"] == {layer: COUNT for layer in LAYERS}, result

    # the shards ran on both nodes of the cluster, each once
    records = [json.loads(p.read_text()) for p in sorted((out / "_actmap" / "shards").glob("*.json"))]
    assert sorted(r["shard"] for r in records) == list(range(COUNT // SHARD_SIZE))
    per_node = collections.Counter(r["worker"]["node"] for r in records)
    assert set(per_node) == set(result["nodes"]), per_node

    # the output is complete and holds every sample exactly once
    dump = inspect_dump(str(out))
    assert dump.complete, dump.format()
    for layer in LAYERS:
        table = read_table(str(out), layer)
        assert table.column("index").to_pylist() == list(range(COUNT)), layer
        ids = table.column("sample_id").to_pylist()
        assert len(set(ids)) == len(ids) == COUNT, layer
