"""Shared fixtures: one small local Ray per test process for every test that needs a cluster."""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# test helpers (tiny models and datasets in tests/support) importable here and in Ray workers.
# The repository root goes first: tests/extender and tests/pipeline would otherwise shadow the
# real packages as namespace packages (the editable install's finder is asked after the path).
sys.path[:0] = [str(ROOT), str(TESTS)]
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(TESTS), os.environ.get("PYTHONPATH")) if p)
# a loopback-only cluster started by the tests needs no token
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray Data lists a Parquet dataset's footers with 32 actors per read (a process each, killed
# after the read); the tests' dumps have a few small files, which one actor reads at once
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
# Ray's monitor reports whether a new cluster autoscales (some tests wait for that) once it has
# load metrics, usually on its second round: 1 s after the first, not 5
os.environ.setdefault("AUTOSCALER_UPDATE_INTERVAL_S", "1")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray with 4 logical CPUs, shared by the tests of one test process (each of
    pytest-xdist's processes starts its own, on the first test that asks).

    Its workers inherit ``PYTHONPATH`` from this process (set above), as the raylet does: no
    ``runtime_env`` is needed, and one made the workers slower to come (Ray Data's reads took
    about twice as long).
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture
def s3(monkeypatch):
    """An S3 endpoint on 127.0.0.1 (a moto server) and the URI query that points pyarrow at it:
    ``f"s3://bucket/prefix?{s3}"``."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto keeps its buckets in this process across servers: every test starts with none
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST"))
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    yield f"endpoint_override={host}:{port}&scheme=http&allow_bucket_creation=true"
    server.stop()

