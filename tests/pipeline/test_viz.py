"""`actmap show`: maps over their images (conv maps, token grids, masks), value histograms, errors."""

import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.config import Config
from pipeline._manifest import new_manifest, prepare_output
from pipeline._maps import NoMapError, activation_maps, token_grid
from pipeline._shards import plan_shards
from pipeline._sources.generated import generate
from pipeline._store import OutputStore
from pipeline._viz import _rows, layer_summary, show_maps
from pipeline._worker import ShardWorker


def _dump(out, model, layers, count=12, **sections):
    data = {"model": {**model, "layers": layers}, "source": {"count": count, "image_size": 32},
            "run": {"output": str(out), "batch_size": 4, "shard_size": 8}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    config = Config.from_dict(data)
    worker = ShardWorker(config.to_dict())
    manifest = new_manifest(config, worker.identity, worker.source.identity(), count, inputs=worker.inputs)
    prepare_output(OutputStore(str(out)), manifest)
    for shard in plan_shards(count, 8):
        worker.run_shard(shard)
    worker.close()
    return str(out)


@pytest.fixture(scope="module")
def conv_dump(tmp_path_factory):
    return _dump(tmp_path_factory.mktemp("conv") / "out", {"name": "support.models:tiny"}, ["relu1", "conv2"])


@pytest.fixture(scope="module")
def vit_dump(tmp_path_factory):
    model = {"name": "timm:vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}}
    return _dump(tmp_path_factory.mktemp("vit") / "out", model, ["blocks.0"],
                 source={"preprocess": {"normalize": "model"}})


def _png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_token_grid_and_maps():
    assert token_grid(17, 1.0) == (1, 4, 4)
    assert token_grid(1 + 4 + 256, 1.0) == (5, 16, 16)  # class and register tokens
    assert token_grid(13, 1.0) == (4, 3, 3)
    with pytest.raises(NoMapError, match="2 tokens do not lay out as a patch grid"):
        token_grid(2, 1.0)
    tokens = np.random.default_rng(0).normal(size=(17, 6)).astype(np.float32)
    (mean,) = activation_maps(tokens, None, 1.0)
    np.testing.assert_allclose(mean.values, tokens[1:].mean(axis=1).reshape(4, 4), rtol=1e-6)
    maps = activation_maps(np.arange(24.0).reshape(2, 3, 4), [1, -2], 0.75)
    assert [m.title for m in maps] == ["channel 1", "channel -2"] and maps[0].values[0, 0] == 12
    with pytest.raises(NoMapError, match="channel 2 is out of range: the layer has 2 channels"):
        activation_maps(np.zeros((2, 3, 3)), [2], 1.0)
    with pytest.raises(NoMapError, match=r"shape \(8,\) has no spatial layout"):
        activation_maps(np.zeros(8), None, 1.0)
    assert activation_maps(np.ones((4, 4)), None, 1.0, reduce="channel_mean")[0].title == "mean over the channels"


def test_rows_reread_the_images_and_masks_the_model_saw(conv_dump):
    rows, meta, reduce = _rows(conv_dump, "conv2", 3)
    assert [r.caption.split(":")[0] for r in rows] == ["0", "6", "11"]  # spread over the dump
    for row, index in zip(rows, (0, 6, 11)):
        image, label, mask = generate(index, 32, 0)
        assert np.array_equal(row.image, image.permute(1, 2, 0).numpy())
        assert np.array_equal(row.mask, mask.astype(bool))
        assert row.activation.shape == (16, 16, 16) and row.caption.endswith(
            ("none", "circle", "square", "triangle")[label])
    assert meta["layer"] == "conv2" and reduce == "none"


def test_show_maps_writes_a_png_of_the_grid(conv_dump, tmp_path):
    one = show_maps(conv_dump, "relu1", str(tmp_path / "one.png"), samples=2)
    three = show_maps(conv_dump, "relu1", str(tmp_path / "three.png"), samples=3, channels=[0, 5])
    (w1, h1), (w3, h3) = _png(one), _png(three)
    assert w3 > 1.4 * w1 and h3 > 1.3 * h1  # 3 columns instead of 2, 3 rows instead of 2


def test_show_tokens_on_their_patch_grid(vit_dump, tmp_path):
    rows, _, _ = _rows(vit_dump, "blocks.0", 2)
    assert rows[0].image.shape == (32, 32, 3)  # resized and cropped as the ViT wants
    (m,) = activation_maps(rows[0].activation, None, 1.0)
    assert m.values.shape == (4, 4) and m.title == "mean of 192 dims, 4x4 patches (+1 leading token)"
    assert main(["show", vit_dump, "--layer", "blocks.0", "--samples", "2", "--channels", "3",
                 "-o", str(tmp_path / "vit.png")]) == 0
    _png(tmp_path / "vit.png")
    assert main(["show", vit_dump, "--layer", "blocks.0", "--prefix-tokens", "1", "-o", str(tmp_path / "p.png")]) == 0
    assert main(["show", vit_dump, "--layer", "blocks.0", "--prefix-tokens", "2", "-o", str(tmp_path / "q.png")]) == 2
    assert not (tmp_path / "q.png").exists()


def test_show_draws_maps_stored_channels_last_per_channel(tmp_path):
    # torchvision's Swin: its stages' maps are stored as the model gave them, (8, 8, 16)
    from pipeline import read_layer, run

    out = tmp_path / "out"
    config = Config.from_dict({"model": {"name": "support.models:tv_swin", "layers": ["features.1"]},
                               "source": {"count": 4, "image_size": 32},
                               "run": {"output": str(out), "batch_size": 4, "executor": "local"}})
    run(config, stream=None)
    rows, meta, _ = _rows(str(out), "features.1", 2)
    stored = read_layer(str(out), "features.1")
    assert meta["columns"]["activation"]["shape"] == [8, 8, 16] and rows[0].activation.shape == (16, 8, 8)
    np.testing.assert_array_equal(rows[0].activation[3], stored[0][:, :, 3])
    assert main(["show", str(out), "--layer", "features.1", "--channels", "15", "-o", str(tmp_path / "s.png")]) == 0


def test_stats_show_dead_layers_and_overflows(tmp_path):
    dump = _dump(tmp_path / "out", {"name": "support.models:overflowing"}, ["conv1", "relu1"], count=4)
    from pipeline._reader import read_layer

    assert layer_summary(read_layer(dump, "conv1").ravel())["inf"] > 0
    relu = layer_summary(read_layer(dump, "relu1").ravel())
    assert relu["zeros"] > 0.2 and relu["min"] == 0
    summary = layer_summary(np.array([0, 0, 1, np.nan, np.inf, -3], dtype=np.float32))
    assert summary == {"values": 6, "zeros": pytest.approx(2 / 6), "nan": 1, "inf": 1, "min": -3.0, "max": 1.0,
                       "mean": pytest.approx(-0.5)}
    assert main(["show", dump, "--stats", "-o", str(tmp_path / "stats.png")]) == 0
    width, height = _png(tmp_path / "stats.png")
    assert width > height  # two layers side by side


def test_show_errors_exit_2_with_the_reason(conv_dump, tmp_path, capsys, monkeypatch):
    pooled = _dump(tmp_path / "pooled", {"name": "support.models:tiny"}, ["conv2"], count=4, dump={"reduce": "pool"})
    assert main(["show", pooled, "--layer", "conv2", "-o", str(tmp_path / "x.png")]) == 2
    assert "--layer: an activation of shape (16, 1, 1) has no spatial layout" in capsys.readouterr().err
    assert main(["show", conv_dump, "--layer", "conv3", "-o", str(tmp_path / "x.png")]) == 2
    assert "holds no rows of layer 'conv3'; did you mean 'conv2'" in capsys.readouterr().err
    assert main(["show", conv_dump, "-o", str(tmp_path / "x.png")]) == 2
    assert "--layer: name the layer to draw" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "nothing"), "--layer", "a"]) == 2
    assert "holds no actmap dump" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["show", conv_dump, "--layer", "conv2", "-o", str(tmp_path / "x.png")]) == 2
    assert "pip install 'actmap[viz]'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("out, message", [
    ("{tmp}", "-o/--out: '{tmp}' is a folder; name the picture's file, e.g. '{tmp}/maps.png'"),
    ("{tmp}/new/", "-o/--out: '{tmp}/new/' is a folder; name the picture's file, e.g. '{tmp}/new/maps.png'"),
    ("{tmp}/nowhere/x.png", "-o/--out: '{tmp}/nowhere', where '{tmp}/nowhere/x.png' would go, is not a folder"),
    ("{tmp}/x.xyz", "-o/--out: '{tmp}/x.xyz': matplotlib writes no '.xyz' files; end the name with .png"),
])
def test_a_picture_file_that_cannot_be_written_exits_2_before_drawing(conv_dump, tmp_path, capsys, out, message):
    out, message = out.format(tmp=tmp_path), message.format(tmp=tmp_path)
    assert main(["show", conv_dump, "--layer", "conv2", "-o", out]) == 2
    assert message in capsys.readouterr().err


def test_a_picture_file_without_a_suffix_gets_png_and_the_path_printed_is_the_one_written(conv_dump, tmp_path, capsys):
    assert main(["show", conv_dump, "--layer", "conv2", "-o", str(tmp_path / "grid")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "grid.png")
    assert _png(tmp_path / "grid.png")[0] > 0


def test_show_of_a_file_blames_the_output(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for args in (["--layer", "conv2"], ["--stats"]):
        assert main(["show", str(tmp_path / "afile"), *args, "-o", str(tmp_path / "x.png")]) == 2
        assert f"actmap: error: output: '{tmp_path / 'afile'}'" in capsys.readouterr().err


def test_show_refuses_a_negative_channel(conv_dump, tmp_path, capsys):
    assert main(["show", conv_dump, "--layer", "conv2", "--channels", "1", "-1", "-o", str(tmp_path / "x.png")]) == 2
    assert "--channels: channels are numbered from 0, got -1" in capsys.readouterr().err


def test_show_blames_the_channels_for_a_channel_out_of_range(conv_dump, tmp_path, capsys):
    assert main(["show", conv_dump, "--layer", "conv2", "--channels", "99", "-o", str(tmp_path / "x.png")]) == 2
    assert "actmap: error: --channels: channel 99 is out of range: the layer has " in capsys.readouterr().err


def test_show_of_a_dump_whose_source_image_is_gone_names_the_sample_and_the_source(tmp_path, capsys):
    # (it blamed the output, with a bare "No such file or directory")
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(images / f"{i}.png")
    out = str(tmp_path / "out")
    assert main(["run", "--quiet", "--set", "source.kind=folder", "--set", f"source.path={tmp_path / 'images'}",
                 "--set", "model.name=support.models:tiny", "--set", "model.layers=[conv2]",
                 "--set", "run.executor=local", "--set", f"run.output={out}"]) == 0
    (images / "0.png").unlink()
    assert main(["show", out, "--layer", "conv2", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "actmap: error: source.path: sample 'a/0.png' cannot be read from the source the dump names " in err
    assert "FileNotFoundError" in err and "it has to hold them as it did when the dump ran" in err
