"""How the Ray executor starts the local Ray it owns."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline._ray_executor import inherited, local_ray_environment

ROOT = Path(__file__).resolve().parents[2]


def test_the_environment_given_to_a_local_ray_leaves_what_the_user_set_and_is_taken_back(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    monkeypatch.delenv("ACTMAP_TEST_ADDED", raising=False)
    with inherited({"MALLOC_ARENA_MAX": "2", "ACTMAP_TEST_ADDED": "yes"}):
        assert os.environ["MALLOC_ARENA_MAX"] == "8"
        assert os.environ["ACTMAP_TEST_ADDED"] == "yes"
    assert os.environ["MALLOC_ARENA_MAX"] == "8"
    assert "ACTMAP_TEST_ADDED" not in os.environ


def test_a_local_ray_gets_one_malloc_arena_per_cpu_it_may_use_and_two_at_least(monkeypatch):
    for cpus, arenas in ((set(), "2"), ({0}, "2"), ({0, 1}, "2"), (set(range(16)), "16")):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cpus=cpus: cpus)
        assert local_ray_environment() == {"MALLOC_ARENA_MAX": arenas}


@pytest.mark.parametrize("ray_address", [None, "local"])
def test_the_actors_of_a_local_ray_started_here_get_its_environment_and_the_driver_gets_it_back(ray_address):
    # a process of its own: the tests' own Ray is up already, and ray_session would use it. The
    # driver keeps its own SIGTERM handler too (the CLI's, which stops a run as Ctrl-C does):
    # ray.init puts one of Ray's in its place
    probe = """
import os, signal, ray
from pipeline._ray_executor import ray_session

@ray.remote(num_cpus=0)
class Probe:
    def arenas(self):
        return os.environ.get("MALLOC_ARENA_MAX")

def mine(signum, frame):
    pass

signal.signal(signal.SIGTERM, mine)
with ray_session() as started:
    seen = ray.get(Probe.remote().arenas.remote())
    kept = signal.getsignal(signal.SIGTERM) is mine
print(started, seen, os.environ.get("MALLOC_ARENA_MAX"), kept)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "RAY_ADDRESS")}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", local_ray_environment()["MALLOC_ARENA_MAX"], "None", "True"]
