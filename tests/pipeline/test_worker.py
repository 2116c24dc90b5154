"""The actor's work, run in this process without Ray."""

import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline._models import build_model
from pipeline._images import decode
from pipeline._preprocess import to_model_input
from pipeline._reader import decode_column, read_layer, read_table
from pipeline._records import BadSample, LayerSpec, ShardRecord
from pipeline._shards import Shard
from pipeline._sources import open_source
from pipeline._worker import ShardWorker
from pipeline.config import Config
from pipeline.errors import (BadSampleError, ConfigError, DeviceMemoryError, LayerOutputError, ReservedColumnError,
                             ShapeChangedError, WeightsMismatchError)
from support.samples import pixels

TINY = {"name": "support.models:tiny", "layers": ["relu1", "conv2"]}


def _config(tmp_path, **sections):
    data = {"model": dict(TINY), "source": {"count": 10, "image_size": 16},
            "run": {"output": str(tmp_path / "out"), "batch_size": 4}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return Config.from_dict(data)


def _run_shard(config, shard, **kwargs):
    """One shard run by a worker that is closed after."""
    with ShardWorker(config.to_dict(), **kwargs) as worker:
        return worker.run_shard(shard)


def _direct(config, indices):
    """The layers' outputs of a plain forward of the same model on the same samples."""
    model = build_model(config.model)
    seen = {}
    hooks = [dict(model.named_modules())[name].register_forward_hook(
        lambda m, a, out, name=name: seen.__setitem__(name, out)) for name in config.model.layers]
    samples = open_source(config.source).read(indices)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in config.source.preprocess.mean_std())
    x = (torch.stack([pixels(s) for s in samples]).float() / 255 - mean) / std
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_shard_matches_a_direct_forward(tmp_path):
    config = _config(tmp_path)
    record = _run_shard(config, Shard(1, 4, 10))
    assert record.rows == {"relu1": 6, "conv2": 6}
    assert record.files == {"relu1": "layer=relu1/part-00001.parquet", "conv2": "layer=conv2/part-00001.parquet"}
    assert record.bad == () and all(v > 0 for v in record.bytes.values())
    on_disk = json.loads((tmp_path / "out" / "_actmap" / "shards" / "00001.json").read_text())
    assert ShardRecord.from_dict(on_disk) == record
    expected = _direct(config, range(4, 10))
    for layer in ("relu1", "conv2"):
        got = read_layer(config.run.output, layer)
        assert got.dtype == np.float16 and got.shape == tuple(expected[layer].shape)
        np.testing.assert_allclose(got, expected[layer].numpy(), rtol=1e-3, atol=1e-3)
    table = read_table(config.run.output, "relu1")
    assert table.column("sample_id").to_pylist() == [str(i) for i in range(4, 10)]
    assert table.column("label").to_pylist() == [s.labels["label"] for s in open_source(config.source).read(range(4, 10))]


def test_hooks_are_removed_on_close(tmp_path):
    worker = ShardWorker(_config(tmp_path).to_dict())
    model = worker.outputs.wrapper.wrapped_model
    worker.close()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    worker.close()  # twice is harmless


def test_a_trial_with_no_readable_sample_counts_the_samples_there_are(tmp_path):
    (tmp_path / "data").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "data" / name).write_bytes(b"not an image")
    config = _config(tmp_path, source={"kind": "folder", "path": str(tmp_path / "data")})
    with ShardWorker(config.to_dict()) as worker, pytest.raises(ConfigError) as error:
        worker.probe()
    assert str(error.value).startswith("source: none of the 2 samples can be read (a.png: ")


def test_a_dataset_whose_first_samples_are_bad_is_not_refused_by_the_trial(tmp_path):
    # eight bad rows first (a table sorted with its empty rows at the top) refused the whole dataset
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(20):
        image = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), i, np.uint8)).save(image, format="PNG")
        (folder / f"{i:02d}.png").write_bytes(b"not an image" if i < 9 else image.getvalue())
    config = _config(tmp_path, source={"kind": "folder", "path": str(folder)})
    with ShardWorker(config.to_dict()) as worker:
        assert set(worker.probe()) == {"relu1", "conv2"}
    for i in range(9, 20):
        (folder / f"{i:02d}.png").write_bytes(b"not an image")
    with ShardWorker(config.to_dict()) as worker, pytest.raises(ConfigError) as error:
        worker.probe()
    assert str(error.value).startswith("source: none of the first 8 samples, nor any of 8 more spread over all 20, "
                                       "can be read (00.png: ")


def test_a_worker_types_the_labels_as_the_driver_did(tmp_path):
    # each worker typed a dataset's labels from its own reads of the first items: one whose
    # reads failed then wrote files of other columns, and the dump did not read back
    from pipeline._executor import WorkerSpec
    from pipeline._sources import DatasetSource

    config = _config(tmp_path, source={"kind": "dataset", "target": "support.datasets:Labelled",
                                       "kwargs": {"tagged_from": 100, "n": 200}})
    types = DatasetSource("support.datasets:Labelled", {"n": 4}).label_types()
    spec = WorkerSpec(config, "digest", {}, label_types=types)
    arguments = {**spec.arguments(), "expected_digest": None}
    with ShardWorker(**arguments) as worker:
        assert worker.label_fields == [pa.field("tag", pa.int64())]  # (on its own: null, as items 0-99 say)


def test_a_source_that_does_not_open_leaves_no_hooks(tmp_path, monkeypatch):
    import pipeline._worker

    built = []
    monkeypatch.setattr(pipeline._worker, "build_model", lambda spec: built.append(build_model(spec)) or built[-1])
    with pytest.raises(ConfigError, match="source.path: .* does not exist"):
        ShardWorker(_config(tmp_path, source={"kind": "folder", "path": str(tmp_path / "nope")}).to_dict())
    assert len(built) == 1
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in built[0].modules())


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-6), ("bfloat16", 1e-2)])
def test_storage_dtypes(tmp_path, dtype, rtol):
    config = _config(tmp_path, dump={"dtype": dtype})
    _run_shard(config, Shard(0, 0, 3))
    expected = _direct(config, range(3))["conv2"].numpy()
    got = read_layer(config.run.output, "conv2")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol)
    as_torch = read_layer(config.run.output, "conv2", as_torch=True)
    assert as_torch.dtype == getattr(torch, dtype)


def test_reductions(tmp_path):
    config = _config(tmp_path, dump={"reduce": "pool", "pool_size": [2, 2], "dtype": "float32"})
    _run_shard(config, Shard(0, 0, 3))
    expected = torch.nn.functional.adaptive_avg_pool2d(_direct(config, range(3))["conv2"], 2)
    np.testing.assert_allclose(read_layer(config.run.output, "conv2"), expected.numpy(), rtol=1e-5, atol=1e-6)
    config = _config(tmp_path / "b", dump={"reduce": "channel_mean", "dtype": "float32"})
    _run_shard(config, Shard(0, 0, 3))
    expected = _direct(config, range(3))["relu1"].mean(1)
    np.testing.assert_allclose(read_layer(config.run.output, "relu1"), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_pooling_into_a_size_larger_than_the_map_is_warned_of(tmp_path, caplog, monkeypatch):
    from pipeline import _reduce

    monkeypatch.setattr(_reduce, "_UPSAMPLED", set())
    config = _config(tmp_path, dump={"reduce": "pool", "pool_size": [64, 64]}, model={"layers": ["conv2"]})
    _run_shard(config, Shard(0, 0, 8))
    shape = read_layer(config.run.output, "conv2").shape
    warnings = [r.getMessage() for r in caplog.records if "pooling repeats" in r.getMessage()]
    assert shape[-2:] == (64, 64) and len(warnings) == 1, "once per layer, though each batch is pooled"
    assert warnings[0].startswith("layer 'conv2' gives ") and "smaller than dump.pool_size 64x64" in warnings[0]


def test_stump_mode_stops_after_the_layer(tmp_path):
    config = _config(tmp_path, model={"mode": "stump", "layers": ["conv1"]})
    with ShardWorker(config.to_dict()) as worker:
        model = worker.outputs.wrapper.wrapped_model
        calls = []
        model.fc.register_forward_hook(lambda *a: calls.append(1))
        worker.run_shard(Shard(0, 0, 4))
    assert calls == []
    expected = _direct(config, range(4))["conv1"].numpy()
    np.testing.assert_allclose(read_layer(config.run.output, "conv1"), expected, rtol=1e-3, atol=1e-3)


def test_bad_samples_are_recorded_and_skipped(tmp_path):
    config = _config(tmp_path, source={"kind": "dataset", "target": "support.datasets:Squares",
                                       "kwargs": {"n": 8, "size": 8, "bad": 5}, "preprocess": {"normalize": "none"}})
    record = _run_shard(config, Shard(0, 0, 8))
    assert record.bad == (BadSample(5, "5", "ValueError: item 5 is corrupt"),)
    assert record.rows["conv2"] == 7
    assert read_table(config.run.output, "conv2").column("index").to_pylist() == [0, 1, 2, 3, 4, 6, 7]


def test_strict_mode_fails_fast_and_leaves_no_file(tmp_path):
    config = _config(tmp_path, run={"strict": True},
                     source={"kind": "dataset", "target": "support.datasets:Squares",
                             "kwargs": {"n": 8, "size": 8, "bad": 5}, "preprocess": {"normalize": "none"}})
    with pytest.raises(BadSampleError, match=r"sample '5' \(index 5\): ValueError: item 5 is corrupt"):
        _run_shard(config, Shard(0, 0, 8))
    out = tmp_path / "out"
    assert not list(out.rglob("*.parquet")) and not list(out.rglob(".*.tmp"))


def test_variable_shapes_from_a_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    sizes = [(16, 12), (20, 20), (16, 12), (9, 14)]
    for i, size in enumerate(sizes):
        buf = io.BytesIO()
        Image.new("RGB", size, (i * 50, 100, 20)).save(buf, format="PNG")
        (images / f"{i}.png").write_bytes(buf.getvalue())
    (images / "4.png").write_bytes(b"not a png")
    config = _config(tmp_path, source={"kind": "folder", "path": str(images)}, dump={"dtype": "float32"})
    assert not config.shapes_fixed()
    record = _run_shard(config, Shard(0, 0, 5))
    assert [b.sample_id for b in record.bad] == ["4.png"]
    got = read_layer(config.run.output, "relu1")
    assert [a.shape for a in got] == [(8, h, w) for w, h in sizes]
    model = build_model(config.model)
    source = open_source(config.source)
    for sample, array in zip(source.read(range(4)), got):
        x = to_model_input(decode(sample.image)[None], config.source.preprocess.mean_std())
        with torch.no_grad():
            expected = model.relu1(model.conv1(x))[0]
        np.testing.assert_allclose(array, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_probe_catches_what_would_fail_later(tmp_path):
    with ShardWorker(_config(tmp_path).to_dict()) as worker:
        assert worker.probe() == {"relu1": LayerSpec((8, 16, 16), "float16", "channels_first"),
                                  "conv2": LayerSpec((16, 8, 8), "float16", "channels_first")}
    bad = _config(tmp_path, model={"layers": ["fc"]}, dump={"reduce": "pool"})
    with ShardWorker(bad.to_dict()) as worker, pytest.raises(
            ConfigError, match=r"model: a trial forward of sample '0' failed: layer 'fc' gives 2-d "
                               r"outputs \(1, 4\); dump.reduce 'pool' needs"):
        worker.probe()
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (9, 7)).save(images / "0.png")
    with ShardWorker(_config(tmp_path, source={"kind": "folder", "path": str(images)}).to_dict()) as worker:
        assert worker.probe()["conv2"] == LayerSpec(None, "float16", "channels_first"), "variable shapes: no one shape"


def test_unknown_layer_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model.layers: .*'conv3'.*"):
        ShardWorker(_config(tmp_path, model={"layers": ["conv3"]}).to_dict())


def test_weights_digest_mismatch_is_refused(tmp_path):
    with pytest.raises(WeightsMismatchError, match="does not build the same weights"):
        ShardWorker(_config(tmp_path).to_dict(), expected_digest="0" * 64)


def test_weights_file_is_loaded(tmp_path):
    model = build_model(_config(tmp_path).model)
    state = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    config = _config(tmp_path, model={"weights": str(tmp_path / "w.pt")})
    assert torch.equal(build_model(config.model).conv1.weight, torch.full_like(model.conv1.weight, 0.5))
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="model.weights: cannot load"):
        build_model(_config(tmp_path, model={"weights": str(tmp_path / "bad.pt")}).model)


@pytest.mark.parametrize("precision, channels_last, tol", [("bf16", False, 5e-2), ("fp16", True, 1e-2),
                                                           ("fp32", True, 1e-3)])
def test_precisions_and_memory_format(tmp_path, precision, channels_last, tol):
    config = _config(tmp_path, model={"precision": precision, "channels_last": channels_last},
                     dump={"dtype": "float32"})
    _run_shard(config, Shard(0, 0, 4))
    expected = _direct(config, range(4))["conv2"].numpy()
    got = read_layer(config.run.output, "conv2")
    assert got.shape == expected.shape  # stored in NCHW order whatever the memory format
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)


def test_output_given_as_a_uri(tmp_path):
    """Any filesystem pyarrow opens: the store never assumes a local path."""
    uri = (tmp_path / "remote").as_uri()
    config = _config(tmp_path, run={"output": uri})
    record = _run_shard(config, Shard(0, 0, 3))
    assert (tmp_path / "remote" / record.files["conv2"]).is_file()
    assert (tmp_path / "remote" / "_actmap" / "shards" / "00000.json").is_file()
    np.testing.assert_array_equal(read_layer(uri, "conv2"), read_layer(str(tmp_path / "remote"), "conv2"))


def test_two_shards_at_once_in_one_worker(tmp_path):
    """What an actor does with two shards in flight: both complete and correct."""
    from concurrent.futures import ThreadPoolExecutor

    config = _config(tmp_path, source={"count": 24})
    with ShardWorker(config.to_dict()) as worker, ThreadPoolExecutor(2) as pool:
        records = list(pool.map(worker.run_shard, [Shard(0, 0, 12), Shard(1, 12, 24)]))
    assert [r.rows["conv2"] for r in records] == [12, 12]
    assert all(r.started <= r.finished for r in records)
    expected = _direct(config, range(24))
    for layer in ("relu1", "conv2"):
        np.testing.assert_allclose(read_layer(config.run.output, layer), expected[layer].numpy(), rtol=1e-3, atol=1e-3)


def test_outputs_changed_in_place_later_are_stored_as_the_layer_gave_them(tmp_path):
    """ResNet's bn1 is followed by ReLU(inplace=True): the dump must hold the batch norm's output."""
    config = _config(tmp_path, model={"name": "resnet18", "layers": ["bn1", "layer1"]},
                     source={"image_size": 32}, dump={"dtype": "float32"})
    _run_shard(config, Shard(0, 0, 2))
    model = build_model(config.model)
    samples = open_source(config.source).read(range(2))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in config.source.preprocess.mean_std())
    x = (torch.stack([pixels(s) for s in samples]).float() / 255 - mean) / std
    with torch.no_grad():
        expected = model.bn1(model.conv1(x))
    got = read_layer(config.run.output, "bn1")
    assert got.min() < 0
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_fixed_shapes_refuse_a_second_size_with_advice(tmp_path, batch_size):
    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(16, 16), (16, 16), (24, 20)]):
        buf = io.BytesIO()
        Image.new("RGB", size, (i * 50, 100, 20)).save(buf, format="PNG")
        (images / f"{i}.png").write_bytes(buf.getvalue())
    config = _config(tmp_path, source={"kind": "folder", "path": str(images)}, dump={"shapes": "fixed"},
                     run={"batch_size": batch_size})
    with pytest.raises(ShapeChangedError, match=r"layer 'relu1' gave outputs of shape \(8, 20, 24\) where "
                                           r"\(8, 16, 16\) was expected.*source.preprocess.crop"):
        _run_shard(config, Shard(0, 0, 3))
    assert not list((tmp_path / "out").rglob("*.parquet"))


@pytest.mark.parametrize("keys", [("index",), ("sample_id",), ("activation",), ("label", "index", "sample_id")])
def test_dataset_items_may_not_replace_output_columns(tmp_path, keys):
    """A dict item's keys pass through as columns; one named like an output column is refused
    before any work starts, rather than silently replacing that column."""
    config = _config(tmp_path, source={"kind": "dataset", "target": "support.datasets:Keyed",
                                       "kwargs": {"keys": list(keys)}, "preprocess": {"normalize": "none"}})
    clash = keys[0] if len(keys) == 1 else "index"
    with ShardWorker(config.to_dict()) as worker:
        with pytest.raises(ReservedColumnError, match=rf"source: the pass-through column '{clash}' clashes"):
            worker.probe()
        with pytest.raises(ReservedColumnError):
            worker.run_shard(Shard(0, 0, 4))
    assert not list((tmp_path / "out").rglob("*.parquet"))


def test_parquet_columns_may_not_replace_output_columns(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    pq.write_table(pa.table({"img": [buf.getvalue()] * 3, "index": [7, 8, 9]}), tmp_path / "clash.parquet")
    source = {"kind": "parquet", "path": str(tmp_path / "clash.parquet"), "image_column": "img"}
    with ShardWorker(_config(tmp_path, source=source).to_dict()) as worker:
        with pytest.raises(ReservedColumnError, match="'index' clashes with an output column.*source.columns"):
            worker.probe()
    with ShardWorker(_config(tmp_path, source={**source, "columns": []}).to_dict()) as worker:
        assert set(worker.probe()) == {"relu1", "conv2"}


def test_a_layer_that_gives_no_tensor(tmp_path):
    config = _config(tmp_path, model={"name": "support.models:pair_net", "layers": ["conv", "pair"]})
    with ShardWorker(config.to_dict()) as worker:
        with pytest.raises(ConfigError, match=r"model: a trial forward of sample '0' failed: layer 'pair' gave "
                                              r"tuple instead of a tensor"):
            worker.probe()
        with pytest.raises(LayerOutputError, match="layer 'pair' gave tuple instead of a tensor; pick one of its tensors"):
            worker.run_shard(Shard(0, 0, 2))


def test_a_layer_that_never_runs_is_told_so_with_the_layers_that_do(tmp_path):
    """A module the model holds but never calls has no output: said so, with the layers that
    ran, not as a None output to pick a tensor from."""
    config = _config(tmp_path, model={"name": "support.models:loose", "layers": ["relu1", "spare"]})
    said = (r"layer 'spare' did not run in the forward of Loose on a 1x3x16x16 input, so it has no output \(the "
            r"model holds the module but does not call it, or not for this input\); dump a layer that runs \(valid: "
            r"'conv1', 'relu1', 'conv2'.*\); `actmap layers MODEL --input-size 3 16 16` lists each layer with how "
            r"often it ran \(0: never\)")
    with ShardWorker(config.to_dict()) as worker:
        with pytest.raises(ConfigError, match=r"model: a trial forward of sample '0' failed: " + said):
            worker.probe()
        with pytest.raises(LayerOutputError, match=said.replace("1x3", "2x3")):
            worker.run_shard(Shard(0, 0, 2))
    assert not list((tmp_path / "out").rglob("*.parquet"))


def test_a_layer_whose_output_holds_no_tensor_gets_no_selector_to_try(tmp_path):
    config = _config(tmp_path, model={"name": "support.models:loose", "layers": ["seven"]})
    with ShardWorker(config.to_dict()) as worker, pytest.raises(
            ConfigError, match=r"failed: layer 'seven' gave int instead of a tensor, and no selector can pick a "
                               r"tensor out of it; dump another layer \(`actmap layers"):
        worker.probe()


def test_a_models_own_assert_on_its_input_is_a_config_error_naming_the_input_size(tmp_path):
    config = _config(tmp_path, model={"name": "support.models:sized", "layers": ["relu1"]})
    with ShardWorker(config.to_dict()) as worker, pytest.raises(
            ConfigError, match=r"model: a trial forward of sample '0' failed: AssertionError: input \(16, 16\) is "
                               r"not 32x32 \(its input was 3x16x16: if the model takes another size, set "
                               r"source.preprocess.crop \(or source.preprocess.resize\) to it, or build the model "
                               r"for this one through model.kwargs\)"):
        worker.probe()
    fixed = _config(tmp_path, model={"name": "support.models:sized", "layers": ["relu1"]},
                    source={"preprocess": {"resize": 32, "crop": 32}})
    with ShardWorker(fixed.to_dict()) as worker:
        assert worker.probe() == {"relu1": LayerSpec((8, 32, 32), "float16", "channels_first")}


def test_a_half_precision_model_is_told_to_set_the_precision_that_runs_it(tmp_path):
    config = _config(tmp_path, model={"name": "support.models:half", "layers": ["relu1"]})
    with ShardWorker(config.to_dict()) as worker, pytest.raises(
            ConfigError, match=r"model: a trial forward of sample '0' failed: .*Half.* \(the model's weights are "
                               r"float16 but its inputs float32: set model.precision: fp16, whose autocast casts the "
                               r"inputs to float16, or convert the model to float32 in its builder\)"):
        worker.probe()
    # and that is what runs it
    fixed = _config(tmp_path, model={"name": "support.models:half", "layers": ["relu1"], "precision": "fp16"})
    with ShardWorker(fixed.to_dict()) as worker:
        assert worker.probe() == {"relu1": LayerSpec((8, 16, 16), "float16", "channels_first")}
        assert worker.run_shard(Shard(0, 0, 4)).rows == {"relu1": 4}


def test_a_selector_that_does_not_fit_the_layers_output_is_a_config_error(tmp_path):
    config = _config(tmp_path, model={"layers": ["conv2[0]"]})
    with ShardWorker(config.to_dict()) as worker, pytest.raises(
            ConfigError, match=r"model.layers: Layer id 'conv2\[0\]': the output of 'conv2' is \(1, 16, 8, 8\), "
                               r"which has no element \[0\]; a Tensor has no elements to select; use 'conv2'"):
        worker.probe()


def _save(path, image, **kwargs):
    buf = io.BytesIO()
    image.save(buf, **kwargs)
    path.write_bytes(buf.getvalue())


def test_odd_images_are_converted_or_recorded_as_bad_with_their_reason(tmp_path):
    import struct
    import zlib

    folder = tmp_path / "images"
    folder.mkdir()
    _save(folder / "a-white8.png", Image.new("RGB", (16, 16), (255, 255, 255)), format="PNG")
    _save(folder / "b-white16.png", Image.fromarray(np.full((16, 16), 65535, np.uint16)), format="PNG")
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 255, 255), (0, 0, 0))]
    _save(folder / "c-anim.gif", frames[0], format="GIF", save_all=True, append_images=frames[1:])
    _save(folder / "d-rgba.png", Image.new("RGBA", (16, 16), (255, 255, 255, 10)), format="PNG")
    _save(folder / "e-grey.png", Image.new("L", (16, 16), 255), format="PNG")
    ihdr = struct.pack(">IIBBBBB", 14_000, 14_000, 8, 2, 0, 0, 0)
    (folder / "f-bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
                                        + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))
    (folder / "g-garbage.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    config = _config(tmp_path, source={"kind": "folder", "path": str(folder),
                                       "preprocess": {"normalize": "none"}},
                     dump={"dtype": "float32"}, run={"batch_size": 8})
    worker = ShardWorker(config.to_dict())
    record = worker.run_shard(Shard(0, 0, 7))
    worker.close()
    bad = {b.sample_id: b.reason for b in record.bad}
    assert set(bad) == {"f-bomb.png", "g-garbage.jpg"}
    assert "14000x14000 = 196,000,000 pixels, over the limit of 89,478,485" in bad["f-bomb.png"]
    assert bad["g-garbage.jpg"].startswith("ImageError: cannot decode the image")
    table = read_table(config.run.output, "relu1")
    assert table.column("sample_id").to_pylist() == ["a-white8.png", "b-white16.png", "c-anim.gif", "d-rgba.png", "e-grey.png"]
    maps = read_layer(config.run.output, "relu1")
    assert np.isfinite(maps).all()
    for i in range(1, 5):  # 16-bit white, the GIF's white first frame, RGBA white, grey white: all white
        np.testing.assert_allclose(maps[i], maps[0], rtol=1e-5, atol=1e-5)


def test_a_sample_the_model_cannot_take_is_isolated_from_its_batch(tmp_path):
    config = _config(tmp_path, model={"name": "support.models:picky", "layers": ["relu1"]},
                     source={"kind": "dataset", "target": "support.datasets:WithWhite",
                             "kwargs": {"n": 8, "white": 2}, "preprocess": {"normalize": "none"}},
                     run={"batch_size": 4})
    worker = ShardWorker(config.to_dict())
    record = worker.run_shard(Shard(0, 0, 8))
    assert [b.to_dict() for b in record.bad] == [{"index": 2, "sample_id": "2", "reason": "the model's forward fails on it: "
                              "ValueError: cannot take an all-white image"}]
    assert read_table(config.run.output, "relu1").column("index").to_pylist() == [0, 1, 3, 4, 5, 6, 7]
    model = build_model(config.model)
    x = torch.stack([pixels(s) for s in open_source(config.source).read([0, 1, 3])])
    with torch.no_grad():
        expected = model.relu1(model.conv1(x)).numpy()
    np.testing.assert_allclose(read_layer(config.run.output, "relu1")[:3], expected, rtol=1e-3, atol=1e-3)
    strict = _config(tmp_path / "s", model=config.to_dict()["model"], source=config.to_dict()["source"],
                     run={"batch_size": 4, "strict": True})
    with pytest.raises(BadSampleError, match="sample '2' \\(index 2\\): the model's forward fails on it"):
        ShardWorker(strict.to_dict()).run_shard(Shard(0, 0, 8))
    worker.close()


def test_a_batch_that_runs_out_of_device_memory_fails_the_shard_and_says_what_to_lower(tmp_path):
    from support.models import Greedy

    config = _config(tmp_path, model={"name": "support.models:greedy", "layers": ["relu1"]}, run={"batch_size": 4})
    worker = ShardWorker(config.to_dict())
    Greedy.calls = 0
    with pytest.raises(DeviceMemoryError, match="the forward of a batch of 4 images ran out of memory on cpu: "
                       "OutOfMemoryError: CUDA out of memory.*; lower run.batch_size \\(now 4\\)") as caught:
        worker.run_shard(Shard(0, 0, 8))
    assert Greedy.calls == 1  # the batch's fault: no sample is tried alone, none recorded as bad
    assert "Lower run.batch_size, then rerun" in caught.value.after  # its own device: nothing shared
    assert not list((tmp_path / "out").rglob("*.parquet"))  # the shard's files are dropped
    small = _config(tmp_path / "small", model=config.to_dict()["model"], run={"batch_size": 2})
    assert ShardWorker(small.to_dict()).run_shard(Shard(0, 0, 8)).rows == {"relu1": 8}
    worker.close()


def test_a_sample_that_breaks_the_device_alone_fails_the_shard_with_that_error(tmp_path):
    # tried sample by sample after the batch failed: the device broke, and no sample after it
    # could run, so none is recorded as bad (with run.strict, one would have been blamed)
    config = _config(tmp_path, model={"name": "support.models:breaks_alone", "layers": ["relu1"]},
                     run={"batch_size": 4})
    with ShardWorker(config.to_dict()) as worker, pytest.raises(torch.AcceleratorError, match="device-side assert"):
        worker.run_shard(Shard(0, 0, 8))


def test_the_device_memory_error_names_a_shared_gpu(tmp_path, monkeypatch):
    """On a GPU the error says how much memory is free, and, where the worker holds part of
    the GPU, that the workers beside it hold models there too (the GPU path, on the CPU)."""
    config = _config(tmp_path, run={"batch_size": 64, "gpus_per_actor": 0.5})
    worker = ShardWorker(config.to_dict())
    worker.device = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1.5 * 2**30, 80 * 2**30))
    error = worker._out_of_memory(64, torch.OutOfMemoryError("CUDA out of memory"))
    assert str(error).startswith("the forward of a batch of 64 images ran out of memory on cuda:0 (1.5 of 80.0 GiB "
                                 "free now); this worker holds 0.5 of the GPU, and the workers that share it")
    assert str(error).endswith("lower run.batch_size (now 64) or set run.gpus_per_actor: 1")
    assert error.shared and "run.gpus_per_actor: 1" in error.after
    whole = ShardWorker(_config(tmp_path / "whole", run={"gpus_per_actor": 1}).to_dict())
    whole.device = torch.device("cuda", 0)
    error = whole._out_of_memory(4, torch.OutOfMemoryError("CUDA out of memory"))
    assert not error.shared and "gpus_per_actor" not in str(error) and "gpus_per_actor" not in error.after
    worker.device = whole.device = torch.device("cpu")
    worker.close(), whole.close()


def test_pixel_limit_and_channels_come_from_the_config(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in enumerate([(16, 16), (40, 40), (16, 16)]):
        _save(folder / f"{i}.png", Image.new("RGB", size, (200, 30, 10)), format="PNG")
    config = _config(tmp_path, model={"name": "support.models:grey", "layers": ["relu1"]},
                     source={"kind": "folder", "path": str(folder),
                             "preprocess": {"normalize": "none", "channels": 1, "max_pixels": 1000}})
    worker = ShardWorker(config.to_dict())
    record = worker.run_shard(Shard(0, 0, 3))
    worker.close()
    assert [(b.sample_id, "40x40 = 1,600 pixels, over the limit of 1,000" in b.reason) for b in record.bad] == [("1.png", True)]
    assert [a.shape for a in read_layer(config.run.output, "relu1")] == [(8, 16, 16)] * 2  # one channel in
    with pytest.raises(ConfigError, match="source.preprocess.channels: 2 is not valid; valid: 3 or 1"):
        _config(tmp_path, source={"preprocess": {"channels": 2}})


def test_a_lone_sample_the_model_cannot_take_is_bad_once_the_model_has_worked(tmp_path):
    """A batch of one sample (batch_size 1 here) fails alone: after a forward that worked, the
    sample is at fault; before any, the model may be, and the shard fails."""
    config = _config(tmp_path, model={"name": "support.models:picky", "layers": ["relu1"]},
                     source={"kind": "dataset", "target": "support.datasets:WithWhite",
                             "kwargs": {"n": 4, "white": 2}, "preprocess": {"normalize": "none"}},
                     run={"batch_size": 1})
    with ShardWorker(config.to_dict()) as worker:
        record = worker.run_shard(Shard(0, 0, 4))
    assert [b.sample_id for b in record.bad] == ["2"] and record.rows == {"relu1": 3}
    first = _config(tmp_path / "first", model=config.to_dict()["model"],
                    source={**config.to_dict()["source"], "kwargs": {"n": 4, "white": 0}}, run={"batch_size": 1})
    with ShardWorker(first.to_dict()) as worker:
        with pytest.raises(ValueError, match="cannot take an all-white image"):
            worker.run_shard(Shard(0, 0, 4))


def test_a_read_error_that_may_pass_fails_the_shard_instead_of_marking_samples_bad(tmp_path):
    from pipeline._decoder import Decoder
    from pipeline._sources import Deferred

    def drops():
        raise ConnectionResetError("the connection dropped")

    def gone():
        raise FileNotFoundError("no such file: x.png")

    decoder = Decoder(threads=2)
    assert isinstance(decoder([Deferred(gone)])[0], FileNotFoundError)  # the file's fault: a bad sample
    with pytest.raises(ConnectionResetError):
        decoder([Deferred(drops), Deferred(gone)])
    decoder.close()


# -- a label value of another type than its column's ----------------------------------------------

_SCORED = {"kind": "dataset", "target": "support.datasets:Scored", "preprocess": {"normalize": "none"}}
_HIGH = "label 'score' holds 'high' (type str); its column holds double"


def test_a_label_of_another_type_makes_its_sample_bad_and_the_rest_of_the_shard_is_written(tmp_path):
    """The column is typed from the first items (an int, then a float: double); item 9's string
    is a bad sample, named with both types, and the others are written."""
    config = _config(tmp_path, source={**_SCORED, "kwargs": {"n": 12, "text_at": 9}})
    record = _run_shard(config, Shard(0, 0, 12))
    assert record.bad == (BadSample(9, "9", _HIGH),)
    table = read_table(config.run.output, "conv2")
    assert table.column("index").to_pylist() == [i for i in range(12) if i != 9]
    assert table.schema.field("score").type == pa.float64()
    assert table.column("score").to_pylist()[-3:] == [8.0, 10.0, 11.5]


def test_a_label_of_another_type_stops_a_strict_run_with_that_reason(tmp_path):
    config = _config(tmp_path, source={**_SCORED, "kwargs": {"n": 12, "text_at": 9}}, run={"strict": True})
    with pytest.raises(BadSampleError, match=rf"sample '9' \(index 9\): {re.escape(_HIGH)} \(run.strict is set"):
        _run_shard(config, Shard(0, 0, 12))
    assert not list((tmp_path / "out").rglob("*.parquet"))


def test_a_bad_first_item_leaves_the_labels_typed_from_the_next_ones(tmp_path):
    config = _config(tmp_path, source={**_SCORED, "kwargs": {"n": 6, "bad": 0}})
    with ShardWorker(config.to_dict()) as worker:
        assert worker.label_fields == [pa.field("score", pa.float64())]
        assert set(worker.probe()) == {"relu1", "conv2"}, "the trial sample is the first readable one"
        record = worker.run_shard(Shard(0, 0, 6))
    assert [b.index for b in record.bad] == [0] and record.rows["conv2"] == 5


def test_parquet_files_that_disagree_on_a_columns_type_are_refused_before_any_work(tmp_path):
    """One file stores a column as integers, another as text: the output column can have one
    type, so the worker refuses the source, naming both files (before, every row of the second
    file was a bad sample: its images were never dumped)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    (tmp_path / "table").mkdir()
    pq.write_table(pa.table({"img": [buf.getvalue()] * 3, "kind": [1, 2, 3]}), tmp_path / "table" / "a.parquet")
    pq.write_table(pa.table({"img": [buf.getvalue()] * 2, "kind": ["4", None]}), tmp_path / "table" / "b.parquet")
    config = _config(tmp_path, source={"kind": "parquet", "path": str(tmp_path / "table"), "image_column": "img"})
    with pytest.raises(ConfigError, match="the column 'kind' is int64 in 'a.parquet' but string in 'b.parquet'"):
        ShardWorker(config.to_dict())
    assert not (tmp_path / "out").exists()


def test_parquet_columns_dictionary_encoded_inside_lists_and_structs_in_some_files(tmp_path):
    """pyarrow writes a dictionary's type into the file: one file's list of categories against
    another's list of text was refused as two types (a dictionary was taken as its values only
    at the top)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    (tmp_path / "table").mkdir()
    words = pa.dictionary(pa.int32(), pa.string())
    pq.write_table(pa.table({"img": [buf.getvalue()] * 2, "tags": pa.array([["a", "b"], ["c"]], pa.list_(words)),
                             "meta": pa.array([{"k": "x"}, {"k": "y"}], pa.struct([("k", words)]))}),
                   tmp_path / "table" / "a.parquet")
    pq.write_table(pa.table({"img": [buf.getvalue()], "tags": [["d"]], "meta": [{"k": "z"}]}),
                   tmp_path / "table" / "b.parquet")
    config = _config(tmp_path, source={"kind": "parquet", "path": str(tmp_path / "table"), "image_column": "img"})
    record = _run_shard(config, Shard(0, 0, 3))
    assert record.rows["conv2"] == 3 and not record.bad
    table = read_table(str(tmp_path / "out"), "conv2")
    assert table.column("tags").to_pylist() == [["a", "b"], ["c"], ["d"]]
    assert table.column("meta").to_pylist() == [{"k": "x"}, {"k": "y"}, {"k": "z"}]


_TARGETS = {"kind": "dataset", "target": "support.datasets:Targets", "preprocess": {"normalize": "none", "crop": 8}}


@pytest.mark.parametrize("later", [{"later_shape": [3]}, {"later_shape": [1, 2]}, {"later_dtype": "float64"}])
def test_an_array_label_that_leaves_the_first_items_shape_or_dtype_makes_its_sample_bad(tmp_path, later):
    """Its values were stored under the first batch's spec and read back as other numbers (a
    (1, 2) array as a (2,) one, float64 bytes as float32), or the shard failed for good."""
    config = _config(tmp_path, source={**_TARGETS, "kwargs": {"n": 12, "change_at": 8, **later}})
    record = _run_shard(config, Shard(0, 0, 12))
    assert [b.index for b in record.bad] == list(range(8, 12)) and record.rows["conv2"] == 8
    what = "dtype" if "later_dtype" in later else "shape"
    assert record.bad[0].reason.startswith(f"label 'target' holds an array of {'float64' if what == 'dtype' else ''}")
    assert record.bad[0].reason.endswith("(the first items')")
    targets = decode_column(read_table(config.run.output, "conv2"), "target")
    assert [t.tolist() for t in targets] == [[i, i] for i in range(8)]


def test_array_labels_that_differ_among_the_first_items_take_one_column_that_holds_them_all(tmp_path):
    # shapes: stored one per row, though the activations have one shape; dtypes: the one that
    # holds them all (int64 and float32 make float64), as for scalar labels
    config = _config(tmp_path, source={**_TARGETS, "kwargs": {"n": 8, "change_at": 3, "dtype": "int64",
                                                              "later_shape": [3], "later_dtype": "float32"}})
    record = _run_shard(config, Shard(0, 0, 8))
    assert not record.bad and record.rows["conv2"] == 8
    targets = decode_column(read_table(config.run.output, "conv2"), "target")
    assert [(t.dtype, t.tolist()) for t in targets] == [(np.dtype("float64"), [i] * (2 if i < 3 else 3)) for i in range(8)]


def test_a_webdataset_json_field_of_another_type_makes_its_sample_bad(tmp_path):
    from support.webdataset import _add, _image

    (tmp_path / "wds").mkdir()
    scores = [0.5, 1, "high", None, 2.5]  # typed from the first: double; an int fits, a null too
    with tarfile.open(tmp_path / "wds" / "a.tar", "w") as tar:
        for i, score in enumerate(scores):
            _add(tar, f"k{i}.png", _image("PNG", i))
            _add(tar, f"k{i}.json", json.dumps({"score": score}).encode())
    config = _config(tmp_path, source={"kind": "webdataset", "path": str(tmp_path / "wds" / "a.tar")})
    record = _run_shard(config, Shard(0, 0, 5))
    assert record.bad == (BadSample(2, "k2", _HIGH),)
    assert read_table(config.run.output, "conv2").column("score").to_pylist() == [0.5, 1.0, None, 2.5]


def test_the_peak_memory_is_the_processs_own_not_its_parents():
    # a process started by a large one: ru_maxrss would report the parent's peak
    ballast = bytearray(1500 << 20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touched: resident
    code = ("import resource; from pipeline._metrics import peak_rss_mb; "
            "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    own, inherited = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                               check=True, cwd=Path(__file__).resolve().parents[2]).stdout.split())
    assert inherited > 1500 and own < inherited - 1000, (own, inherited)  # own: torch, pyarrow
    del ballast


def _collector(worker):
    import gc

    return gc.get_freeze_count(), len(gc.garbage), gc.get_threshold()


def _no_more_counting(worker):
    # gc.get_freeze_count walks every frozen object: once, at start, is all a worker may ask
    import gc

    def refused():
        raise AssertionError("the frozen objects counted again")

    gc.get_freeze_count = refused


def test_a_worker_with_a_process_of_its_own_keeps_what_it_made_at_start_out_of_the_collectors_sight(
        tmp_path, ray_cluster):
    # an actor of the Ray executor: its modules and model live as long as it, full collections skip them
    ray = ray_cluster
    actor = ray.remote(ShardWorker).remote(_config(tmp_path).to_dict(), device="cpu", own_process=True)
    frozen, garbage, threshold = ray.get(actor.__ray_call__.remote(_collector))
    assert frozen > 10_000 and garbage == 0 and threshold[0] == 10_000
    ray.get(actor.__ray_call__.remote(_no_more_counting))
    record = ray.get(actor.run_shard.remote(Shard(0, 0, 10)))
    assert record.rows == {"relu1": 10, "conv2": 10} and record.worker["frozen_objects"] >= frozen  # counted at start
    ray.kill(actor)
    # a worker in a process of someone else's (a user's own actor, the local executor's process):
    # that process's collector is left as it was
    actor = ray.remote(ShardWorker).remote(_config(tmp_path / "b").to_dict(), device="cpu")
    assert ray.get(actor.__ray_call__.remote(_collector)) == (0, 0, (700, 10, 10))
    ray.kill(actor)
    import gc

    before = gc.get_freeze_count(), gc.get_threshold()
    with ShardWorker(_config(tmp_path / "c").to_dict(), device="cpu"):
        assert (gc.get_freeze_count(), gc.get_threshold()) == before


def test_the_inputs_of_a_failed_forward_are_freed_without_the_collector(tmp_path):
    # the batch's error, kept to be raised if every sample fails alone, must not hold the failed
    # forward's frames (and their tensors, on a GPU its memory) until a collection comes
    import gc

    from support.models import Picky

    config = _config(tmp_path, model={"name": "support.models:picky", "layers": ["relu1"]},
                     source={"kind": "dataset", "target": "support.datasets:WithWhite",
                             "kwargs": {"n": 8, "white": 2}, "preprocess": {"normalize": "none"}},
                     run={"batch_size": 4})
    Picky.refused.clear()
    gc.disable()
    try:
        with ShardWorker(config.to_dict()) as worker:
            assert len(worker.run_shard(Shard(0, 0, 8)).bad) == 1
        assert len(Picky.refused) == 2  # the batch, then the sample alone
        assert [ref() for ref in Picky.refused] == [None, None]
    finally:
        gc.enable()
