import pytest

from pipeline._shards import Shard, plan_shards


@pytest.mark.parametrize("n, size", [(0, 4), (1, 4), (4, 4), (10, 3), (1000, 256)])
def test_plan_covers_every_sample_once(n, size):
    shards = plan_shards(n, size)
    covered = [i for s in shards for i in range(s.start, s.stop)]
    assert covered == list(range(n))
    assert [s.id for s in shards] == list(range(len(shards)))
    assert all(0 < len(s) <= size for s in shards)


def test_plan_is_a_pure_function():
    assert plan_shards(1000, 64) == plan_shards(1000, 64)


def test_file_names_are_a_function_of_layer_and_shard():
    shard = Shard(12, 0, 5)
    assert shard.file_name("backbone.body.layer3") == "layer=backbone.body.layer3/part-00012.parquet"


def test_bad_plan_arguments():
    with pytest.raises(ValueError, match="shard_size >= 1"):
        plan_shards(10, 0)
