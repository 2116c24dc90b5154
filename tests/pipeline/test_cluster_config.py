"""cluster.yaml: valid for the Ray cluster launcher, and set up the way the project needs it.

No cloud is touched: the file is checked against the JSON schema that ships inside the installed
Ray package, then through Ray's own config preparation (what `ray up` runs first), then for the
points that matter here: autoscaling GPU workers, a dashboard that is not exposed, an install of
the project on every node, and the same auth mode on every node.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _ray_start(commands: list[str]) -> list[list[str]]:
    """The argument lists of the `ray start` calls in a list of shell commands."""
    calls = []
    for command in commands:
        for part in command.split(";"):
            words = shlex.split(part)
            while words and "=" in words[0] and not words[0].startswith("-"):
                words = words[1:]  # leading VAR=value assignments
            if words[:2] == ["ray", "start"]:
                calls.append(words[2:])
    return calls


def _option(args: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in ``args``."""
    for i, arg in enumerate(args):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(args):
            return args[i + 1]
    return None


def _gpu_types(config: dict) -> dict[str, dict]:
    return {name: spec for name, spec in config["available_node_types"].items()
            if spec.get("resources", {}).get("GPU", 0) > 0}


def test_matches_the_schema_shipped_with_ray(config, schema):
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(config), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors)


def test_ray_prepares_and_validates_it(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(json.loads(json.dumps(config)))  # what `ray up` does before any cloud call
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_head_is_a_cpu_node(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    # the driver runs there; actors go to the GPU workers
    assert head["resources"].get("CPU") == 0


def test_gpu_workers_autoscale_from_zero(config):
    gpu = _gpu_types(config)
    assert gpu, "no node type with GPU resources"
    assert config["head_node_type"] not in gpu
    for name, spec in gpu.items():
        assert spec["min_workers"] == 0, name
        assert spec["max_workers"] >= 1, name
        assert spec["max_workers"] <= config["max_workers"], name
        assert spec["resources"]["GPU"] >= 1 and spec["resources"]["CPU"] >= 1, name
        assert spec["node_config"]["InstanceType"][0] in "gp", spec["node_config"]["InstanceType"]
    assert config["idle_timeout_minutes"] > 0


def test_dashboard_only_on_the_head_loopback(config):
    heads = _ray_start(config["head_start_ray_commands"])
    assert len(heads) == 1 and "--head" in heads[0], config["head_start_ray_commands"]
    args = heads[0]
    assert _option(args, "dashboard-host") == "127.0.0.1"
    assert _option(args, "dashboard-port") == "8265"
    assert _option(args, "include-dashboard") in (None, "true", "True")
    every = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "0.0.0.0" not in every
    # and no Ray port opened to the world by a custom security group
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        opened = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        assert "0.0.0.0/0" not in opened or rule.get("FromPort") == rule.get("ToPort") == 22, rule


def test_workers_join_the_head(config):
    (head,) = _ray_start(config["head_start_ray_commands"])
    workers = _ray_start(config["worker_start_ray_commands"])
    assert len(workers) == 1
    assert _option(workers[0], "address") == f"$RAY_HEAD_IP:{_option(head, 'port')}"


def test_every_node_uses_token_auth(config):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), config[key]
    # the token the nodes share is the one `ray get-auth-token --generate` wrote locally
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_setup_installs_the_project(config):
    installs = [shlex.split(c) for c in config["setup_commands"] if c.lstrip().startswith("pip install")]
    assert installs, config["setup_commands"]
    targets = [w for words in installs for w in words[2:] if not w.startswith("-")]
    mounts = config["file_mounts"]
    local = {remote: local for remote, local in mounts.items() if not local.startswith("~")}
    # every synced source exists in this checkout ...
    for remote, path in local.items():
        assert (ROOT / path).exists(), f"file_mounts {remote}: {path} is not in the repository"
    # ... and the installed folder is the synced project: its pyproject and both packages
    project = [t for t in targets if f"{t}/pyproject.toml" in local]
    assert project, f"no setup command installs the synced project: {targets}"
    for package in ("pipeline", "extender"):
        assert local.get(f"{project[0]}/{package}") == f"./{package}"
    assert "**/__pycache__" in config.get("rsync_exclude", [])


def test_comments_say_how_to_submit_the_job():
    text = CLUSTER_YAML.read_text()
    for step in ("ray up cluster.yaml", "ray dashboard cluster.yaml",
                 "ray job submit --address http://127.0.0.1:8265 --working-dir .", "actmap run",
                 "ray down cluster.yaml"):
        assert step in text, step
