"""Ray metrics from the actors (rows, bytes, bad samples, shard seconds) and a progress line that
moves with every batch."""

import io
import re
import time
import urllib.request

import pytest

from pipeline import run
from pipeline.config import Config
from pipeline._metrics import ActorMetrics, InFlightPoller

pytestmark = pytest.mark.usefixtures("ray_cluster")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _scrape(ray, output: str, want: str, count: float = 1, timeout: float = 60.0) -> list[tuple[str, dict, float]]:
    """The ``ray_actmap_*`` samples of this dump from the node's Prometheus endpoint (on loopback),
    once the samples of ``want`` add up to ``count`` (the metrics are exported every few seconds:
    a scrape may come between one shard's export and the next)."""
    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + timeout
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        samples = []
        for line in text.splitlines():
            if line.startswith("ray_actmap_"):
                tags = dict(re.findall(r'(\w+)="([^"]*)"', line))
                if tags.get("output") == output:
                    samples.append((line.split("{")[0], tags, float(line.rsplit(" ", 1)[1])))
        if sum(v for name, _, v in samples if name == want) >= count or time.monotonic() > deadline:
            return samples
        time.sleep(1.0)


def test_progress_moves_per_batch_and_ray_metrics_count_the_dump(tmp_path, ray_cluster):
    out = str(tmp_path / "out")
    # 2 shards of 12 samples in batches of 2 that take 0.2 s each to read: the driver polls the
    # actor twice a second, so it sees counts between the shard boundaries (0, 12, 24)
    config = Config.from_dict({"model": {"name": "support.models:tiny", "layers": ["relu1", "conv2"]},
                               "source": {"kind": "dataset", "target": "support.datasets:Slow",
                                          "kwargs": {"n": 24, "size": 8, "delay": 0.1, "bad": 5},
                                          "preprocess": {"normalize": "none"}},
                               "run": {"output": out, "batch_size": 2, "shard_size": 12, "actors": 1}})
    stream = _Terminal()
    summary = run(config, stream=stream)
    assert summary.rows == {"relu1": 23, "conv2": 23}
    shown = {int(n) for n in re.findall(r"\]\s+(\d+)/24 samples", stream.getvalue())}
    assert shown - {0, 12, 24}, f"the progress line moved only per shard: {sorted(shown)}"
    assert max(shown) == 24

    samples = _scrape(ray_cluster, out, "ray_actmap_shards_total", count=2)

    def total(name, **tags):
        return sum(v for n, t, v in samples if n == name and all(t.get(k) == w for k, w in tags.items()))

    assert total("ray_actmap_rows_total") == 23
    assert total("ray_actmap_bad_samples_total") == 1
    assert total("ray_actmap_shards_total") == 2
    assert total("ray_actmap_bytes_total", layer="conv2") == summary.bytes["conv2"]
    assert total("ray_actmap_bytes_total", layer="relu1") == summary.bytes["relu1"]
    assert total("ray_actmap_shard_seconds_count") == 2
    actors = {t["actor"] for n, t, _ in samples if n == "ray_actmap_rows_total"}
    assert len(actors) == 1 and all(len(a) == 12 for a in actors)


def test_poller_sums_the_shards_in_flight_of_live_actors(ray_cluster):
    @ray_cluster.remote
    class Fake:
        def __init__(self, shards):
            self.shards = shards

        def progress(self):
            return self.shards

    actors = [Fake.remote({1: 5, 2: 7}), Fake.remote({3: 11})]
    poller = InFlightPoller(actors, every=0.2)
    assert poller.poll({0, 1}, finished={}) == 0  # nothing answered yet: never waits
    deadline = time.monotonic() + 30
    while (found := poller.poll({0, 1}, finished={2: {}})) != 16 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert found == 16  # shard 2 is finished: counted by its record, not here
    assert poller.poll({0}, finished={}) == 12  # actor 1 is dead: its shards go elsewhere
    poller.close()
    for actor in actors:
        ray_cluster.kill(actor)


def test_poller_asks_each_actor_at_most_once_per_period_however_often_it_polls(ray_cluster):
    @ray_cluster.remote
    class Counting:
        def __init__(self):
            self.asked = 0

        def progress(self):
            self.asked += 1
            return {}

        def count(self):
            return self.asked

    actor = Counting.remote()
    poller = InFlightPoller([actor], every=1.0)
    started = time.monotonic()
    while time.monotonic() - started < 2.5:  # as a driver whose shards end every 20 ms
        poller.poll({0}, finished={})
        time.sleep(0.02)
    poller.close()
    assert 2 <= ray_cluster.get(actor.count.remote()) <= 3  # at 0, 1 and 2 s; not 125 times
    ray_cluster.kill(actor)


def test_actor_metrics_forget_a_failed_shard():
    metrics = ActorMetrics("out")
    metrics.batch(0, rows=4, bad=0)
    metrics.batch(1, rows=2, bad=2)
    metrics.shard_failed(0)
    assert metrics.in_flight() == {1: 4}
