import pytest

from pipeline._scheduling import ActorPlan, ShardQueue, local_devices, plan_actors
from pipeline._shards import plan_shards
from pipeline.config import RunSpec
from pipeline.errors import ConfigError, ShardFailedError


def test_plan_actors():
    assert plan_actors(RunSpec(), {"CPU": 2.0}, 10) == ActorPlan(2, 1.0, 0.0)
    assert plan_actors(RunSpec(), {"CPU": 2.0}, 1) == ActorPlan(1, 1.0, 0.0)
    assert plan_actors(RunSpec(gpus_per_actor=0.25), {"CPU": 64.0, "GPU": 2.0}, 100) == ActorPlan(8, 8.0, 0.25)
    assert plan_actors(RunSpec(gpus_per_actor=0.25, cpus_per_actor=1), {"CPU": 64.0, "GPU": 2.0}, 100) == ActorPlan(8, 1.0, 0.25)
    assert plan_actors(RunSpec(actors=3, gpus_per_actor=0), {"CPU": 1.0, "GPU": 8.0}, 100) == ActorPlan(3, 1.0, 0.0)
    # a GPU actor gets its share of the CPUs of its node: the node with the fewest per GPU
    nodes = [{"CPU": 8.0}, {"CPU": 16.0, "GPU": 1.0}, {"CPU": 48.0, "GPU": 4.0}]
    assert plan_actors(RunSpec(), {"CPU": 72.0, "GPU": 5.0}, 100, nodes) == ActorPlan(5, 12.0, 1.0)
    # from 16 CPUs per GPU, two actors share each GPU with half its CPUs each (two Python processes)
    node = [{"CPU": 16.0, "GPU": 1.0}]
    assert plan_actors(RunSpec(), {"CPU": 16.0, "GPU": 1.0}, 100, node) == ActorPlan(2, 8.0, 0.5)
    # too few shards to fill every share: a GPU each, with all its CPUs (Ray would pack two
    # halves onto one GPU and leave another idle)
    assert plan_actors(RunSpec(), {"CPU": 16.0, "GPU": 1.0}, 1, node) == ActorPlan(1, 16.0, 1.0)
    four = [{"CPU": 64.0, "GPU": 4.0}]
    assert plan_actors(RunSpec(), {"CPU": 64.0, "GPU": 4.0}, 6, four) == ActorPlan(4, 16.0, 1.0)
    assert plan_actors(RunSpec(), {"CPU": 64.0, "GPU": 4.0}, 8, four) == ActorPlan(8, 8.0, 0.5)
    assert plan_actors(RunSpec(gpus_per_actor=1), {"CPU": 16.0, "GPU": 1.0}, 100, node) == ActorPlan(1, 16.0, 1.0)
    assert plan_actors(RunSpec(actors=1), {"CPU": 16.0, "GPU": 1.0}, 100, node) == ActorPlan(1, 16.0, 1.0)
    assert plan_actors(RunSpec(cpus_per_actor=16), {"CPU": 16.0, "GPU": 1.0}, 100, node) == ActorPlan(1, 16.0, 1.0)
    nodes = [{"CPU": 64.0, "GPU": 4.0}, {"CPU": 96.0, "GPU": 4.0}]  # the fewest CPUs per GPU decide
    assert plan_actors(RunSpec(), {"CPU": 160.0, "GPU": 8.0}, 100, nodes) == ActorPlan(16, 8.0, 0.5)
    nodes = [{"CPU": 12.0, "GPU": 1.0}, {"CPU": 96.0, "GPU": 4.0}]
    assert plan_actors(RunSpec(), {"CPU": 108.0, "GPU": 5.0}, 100, nodes) == ActorPlan(5, 12.0, 1.0)
    # GPUs asked of a cluster with none (yet): an actor gets one CPU, not CPUs divided by zero
    assert plan_actors(RunSpec(actors=1, gpus_per_actor=1), {"CPU": 4.0}, 10, [{"CPU": 4.0}]) == ActorPlan(1, 1.0, 1.0)
    with pytest.raises(ConfigError, match="run.gpus_per_actor: 2.0 GPUs per actor, but the cluster has 1"):
        plan_actors(RunSpec(gpus_per_actor=2), {"CPU": 4.0, "GPU": 1.0}, 10)


def test_a_fraction_of_a_cpu_per_actor_starts_no_more_actors_than_cpus():
    assert plan_actors(RunSpec(cpus_per_actor=0.001), {"CPU": 2.0}, 500) == ActorPlan(2, 0.001, 0.0)
    assert plan_actors(RunSpec(cpus_per_actor=0.1), {"CPU": 2.0}, 500) == ActorPlan(2, 0.1, 0.0)
    assert plan_actors(RunSpec(cpus_per_actor=0.5), {"CPU": 3.5}, 500) == ActorPlan(3, 0.5, 0.0)
    assert plan_actors(RunSpec(cpus_per_actor=2), {"CPU": 8.0}, 500) == ActorPlan(4, 2.0, 0.0)
    assert plan_actors(RunSpec(cpus_per_actor=0.5), {"CPU": 0.0}, 500) == ActorPlan(1, 0.5, 0.0)  # none seen yet
    # a number of actors that is given is kept (the cluster's room is checked against it)
    assert plan_actors(RunSpec(actors=6, cpus_per_actor=0.25), {"CPU": 2.0}, 500) == ActorPlan(6, 0.25, 0.0)


def test_queue_hands_out_each_shard_once():
    q = ShardQueue(plan_shards(10, 3))
    taken = []
    while (s := q.take()) is not None:
        taken.append(s)
    assert [s.id for s in taken] == [0, 1, 2, 3]
    assert not q.idle
    for s in taken:
        q.finished(s)
    assert q.idle and q.done == [0, 1, 2, 3]


def test_each_lane_takes_consecutive_shards_and_the_lanes_done_first_take_the_rest():
    # lanes 0-2 take a shard each in turn; lane 3 (a worker that never came up) takes none.
    # A resumed run passes over the shards already done
    done = {0, 1, 50, 51, 52}
    q = ShardQueue(plan_shards(100, 1), lanes=4, done=done)
    taken: dict[int, list[int]] = {lane: [] for lane in range(3)}
    while not q.idle:
        for lane in taken:
            if (shard := q.take(lane)) is not None:
                taken[lane].append(shard.id)
                q.finished(shard)
    ids = sorted(i for lane in taken.values() for i in lane)
    assert ids == sorted(set(range(100)) - done)
    assert taken[0][:10] == list(range(2, 12)) and taken[1][:10] == list(range(25, 35))
    # a lane's shards follow each other but where it took over the second half of another's run
    jumps = sum(b != a + 1 for lane in taken.values() for a, b in zip(lane, lane[1:]))
    assert jumps <= 8, taken


def test_failed_shard_is_retried_first_then_gives_up():
    shards = plan_shards(4, 2)
    q = ShardQueue(shards, max_attempts=3)
    first = q.take()
    q.failed(first, "boom")
    assert q.take() == first
    q.failed(first, "boom")
    assert q.take() == first
    with pytest.raises(ShardFailedError, match="shard 0 \\(samples 0-2\\) failed 3 times; last error: boom"):
        q.failed(first, "boom")


@pytest.mark.parametrize("run, gpus, shards, devices", [
    ({}, 0, 10, ["cpu"]),  # auto: the CPU, one worker
    ({"actors": 3}, 0, 10, ["cpu"] * 3),
    ({"actors": 3}, 0, 2, ["cpu"] * 2),  # never more workers than shards
    ({}, 2, 10, ["cuda:0", "cuda:1"]),  # auto: one per GPU, worker i on GPU i
    ({}, 4, 3, ["cuda:0", "cuda:1", "cuda:2"]),
    ({"actors": 1}, 4, 10, ["cuda:0"]),
    ({"gpus_per_actor": 0}, 2, 10, ["cpu"]),  # 0 runs on the CPU where there are GPUs
    ({"actors": 4, "gpus_per_actor": 0.5}, 2, 10, ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]),
    ({"actors": 4, "gpus_per_actor": 0.3}, 2, 10, ["cuda:0", "cuda:0", "cuda:0", "cuda:1"]),  # 3 fit on one
    ({"gpus_per_actor": 0.5}, 1, 10, ["cuda:0", "cuda:0"]),
    ({"gpus_per_actor": 2}, 5, 10, ["cuda:0", "cuda:2"]),  # the first GPU of its own two
])
def test_local_workers_are_placed_on_gpus_as_ray_places_actors(run, gpus, shards, devices):
    assert local_devices(RunSpec(**run), visible_gpus=gpus, shards=shards) == devices


@pytest.mark.parametrize("run, gpus, message", [
    ({"gpus_per_actor": 1}, 0, "run.gpus_per_actor: 1 GPUs per worker, but this machine has none that torch can "
                               "use (torch.cuda.device_count() is 0); use 0 to run on the CPU"),
    ({"actors": 2, "gpus_per_actor": 0.5}, 0, "run.gpus_per_actor: 0.5 GPUs per worker, but this machine has none"),
    ({"gpus_per_actor": 2}, 1, "run.gpus_per_actor: 2 GPUs per worker, but this machine has 1; use 0 to run on the "
                               "CPU, or at most 1"),
    ({"gpus_per_actor": 1.5}, 4, "run.gpus_per_actor: 1.5 GPUs per worker: above 1, a worker takes whole GPUs; "
                                 "use 1 or 2"),
    ({"actors": 3, "gpus_per_actor": 1}, 2, "run.actors: 3 workers of 1 GPU each, but this machine has 2 GPUs, room "
                                            "for 2 of them; set run.actors to at most 2 (or auto)"),
    ({"actors": 5, "gpus_per_actor": 0.5}, 2, "run.actors: 5 workers of 0.5 GPU each, but this machine has 2 GPUs, "
                                              "room for 4 of them"),
])
def test_local_workers_asking_for_gpus_the_machine_lacks_are_refused(run, gpus, message):
    with pytest.raises(ConfigError) as info:
        local_devices(RunSpec(**run), visible_gpus=gpus, shards=10)
    assert str(info.value).startswith(message)
