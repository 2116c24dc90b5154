"""Shared fixtures: one small local Ray for every test that needs a cluster."""

from __future__ import annotations

import os
import sys
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


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray with 4 logical CPUs, shared by the whole session."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
    yield ray
    ray.shutdown()
