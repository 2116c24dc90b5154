"""Value statistics computed by the actors while they write, merged by `actmap inspect`."""

import json

import numpy as np
import pytest
import torch

from pipeline import inspect_dump, read_layer
from pipeline.config import Config
from pipeline._manifest import SHARDS_DIR, new_manifest, prepare_output
from pipeline._shards import plan_shards
from pipeline._stats import ValueStats, _device_numbers, merge_records
from pipeline._store import OutputStore
from pipeline._worker import ShardWorker


def _expected(values: np.ndarray) -> dict:
    values = values.astype(np.float64).ravel()
    finite = values[np.isfinite(values)]
    return {"count": values.size, "finite": finite.size, "zeros": int((values == 0).sum()),
            "nan": int(np.isnan(values).sum()), "inf": int(np.isinf(values).sum()),
            "min": float(finite.min()), "max": float(finite.max()), "sum": float(finite.sum())}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_stats_of_batches_with_zeros_nan_and_inf(dtype):
    x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0, 0, :2] = 0
    x[0, 0, 2] = -0.0
    x[1, 1, 1], x[2, 2, 2], x[3, 0, 0] = float("nan"), float("inf"), float("-inf")
    s = ValueStats()
    s.add(x[:1])  # all finite: the fast path
    s.add(x[1:3])  # NaN and inf: the masked path
    s.add(x[3:])
    got = s.to_dict()
    want = _expected(x.float().numpy())
    assert want["zeros"] == 3 and want["nan"] == 1 and want["inf"] == 2
    assert {k: got[k] for k in want if k != "sum"} == {k: want[k] for k in want if k != "sum"}
    assert got["sum"] == pytest.approx(want["sum"], rel=1e-5)


def test_the_device_path_gives_the_cpu_paths_numbers():
    """The masked computation that runs on GPUs (kept as tensors until the shard ends)."""
    x = torch.tensor([[0.0, 2.0, float("nan")], [-1.0, float("inf"), 0.5]], dtype=torch.float16)
    numbers = [v.item() for v in _device_numbers(x.reshape(-1))]
    assert numbers == [1, 1, 1, 4, 1.5, -1.0, 2.0]  # zeros, nan, inf, finite, sum, min, max
    none_finite = [v.item() for v in _device_numbers(torch.tensor([float("nan")]))]
    assert none_finite[:4] == [0, 1, 0, 0]
    lazy = ValueStats()
    lazy.count += x.numel()
    lazy._pending.append(_device_numbers(x.reshape(-1)))  # what add() does off the CPU
    eager = ValueStats()
    eager.add(x)
    assert lazy.to_dict() == eager.to_dict()


def test_merge_and_round_trip():
    a, b = ValueStats(), ValueStats()
    a.add(torch.tensor([1.0, 2.0]))
    b.add(torch.tensor([float("nan")]))
    merged = merge_records([{"stats": {"l": a.to_dict()}}, {"stats": {"l": b.to_dict()}}, {"no": "stats"}])["l"]
    assert merged.to_dict() == {"count": 3, "finite": 2, "sum": 3.0, "min": 1.0, "max": 2.0, "zeros": 0, "nan": 1,
                                "inf": 0}
    assert json.loads(json.dumps(b.to_dict()))["min"] is None and ValueStats.from_dict(b.to_dict()) == b
    assert b.format() == "no finite values, zeros 0.0%, NaN 1, inf 0" and ValueStats().format() == "no values"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_shard_records_carry_the_stats_of_what_was_written(tmp_path, dtype):
    config = Config.from_dict({"model": {"name": "support.models:overflowing", "layers": ["conv1", "relu1"]},
                               "source": {"count": 10, "image_size": 16}, "dump": {"dtype": dtype},
                               "run": {"output": str(tmp_path / "out"), "batch_size": 4, "shard_size": 5}})
    worker = ShardWorker(config.to_dict())
    prepare_output(OutputStore(config.run.output), new_manifest(config, worker.identity, worker.source.identity(), 10))
    records = [worker.run_shard(shard) for shard in plan_shards(10, 5)]
    worker.close()
    on_disk = json.loads((tmp_path / "out" / SHARDS_DIR / "00001.json").read_text())
    assert on_disk["stats"] == records[1].stats
    merged = merge_records(records)
    for layer in ("conv1", "relu1"):
        got = merged[layer].to_dict()
        want = _expected(read_layer(config.run.output, layer))
        assert {k: got[k] for k in want if k != "sum"} == {k: want[k] for k in want if k != "sum"}
        assert got["sum"] == pytest.approx(want["sum"], rel=1e-5)
    assert (merged["conv1"].inf > 0) == (dtype == "float16")  # values beyond float16's range
    assert merged["relu1"].zeros > 0 and merged["relu1"].min == 0
    text = inspect_dump(config.run.output).format()
    assert f"    values: {merged['relu1'].format()}" in text
    assert "layer conv1" in text and "inf" in text


def test_finite_values_whose_float32_sum_overflows_give_a_finite_mean():
    """Values near float32's largest (3.4e38): their sum overflowed to inf, shown as the mean
    of values none of which is inf (and written to the record as JSON's non-standard Infinity)."""
    x = torch.full((4, 3), 3e38, dtype=torch.float32)
    stats = ValueStats()
    stats.add(x)
    lazy = ValueStats()
    lazy.count += x.numel()
    lazy._pending.append(_device_numbers(x.reshape(-1)))  # what add() does off the CPU
    for s in (stats, lazy):
        assert s.to_dict()["sum"] == pytest.approx(3.6e39) and s.to_dict()["inf"] == 0
