"""timm and transformers models dumped end to end and compared value by value with a direct
forward of the same model: a timm ResNet, a timm ViT (tokens), a transformers ViT from a tiny
config (layers that return tuples and ModelOutputs, picked with selectors), and token reductions.

The dumps run on the local executor with two workers, each building its own model from the
config as an actor would (and refusing to start unless its weights match the driver's); what
Ray adds, actors in processes of their own, is tested with the tiny models in test_driver.py."""

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from pipeline import read_layer, read_table, run
from pipeline.config import Config
from pipeline._manifest import read_manifest
from pipeline._store import OutputStore
from pipeline._models import build_model
from pipeline._shards import plan_shards
from pipeline._sources import open_source
from pipeline._worker import ShardWorker
from support.samples import pixels

VIT = {"name": "timm:vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}}


def _config(out, model, layers, normalize="model", reduce="none", count=12):
    return Config.from_dict({"model": {**model, "layers": layers},
                             "source": {"count": count, "image_size": 32, "preprocess": {"normalize": normalize}},
                             "dump": {"dtype": "float32", "reduce": reduce},
                             "run": {"output": str(out), "batch_size": 4, "shard_size": 4, "actors": 2,
                                     "executor": "local"}})


def _images(config, resize=None, crop=None):
    """The source's images as a float batch in [0, 1], resized and cropped independently of actmap."""
    source = open_source(config.source)
    images = []
    for sample in source.read(range(len(source))):
        image = pixels(sample)
        if resize:
            image = TF.resize(image, [resize], antialias=True)
        if crop:
            image = TF.center_crop(image, [crop, crop])
        images.append(image)
    return torch.stack(images).float() / 255


def _direct(model, x, mean, std, picks):
    """Each wanted output of a plain forward: ``picks`` maps a layer id to (module id, picker)."""
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    seen = {}
    modules = dict(model.named_modules())
    hooks = [modules[module].register_forward_hook(
        lambda m, a, out, layer=layer, pick=pick: seen.__setitem__(layer, pick(out).clone()))
        for layer, (module, pick) in picks.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _assert_dump_equals(config, expected):
    for layer, values in expected.items():
        table = read_table(config.run.output, layer, columns=["index"])
        assert table.column("index").to_pylist() == list(range(len(values)))
        got = read_layer(config.run.output, layer)
        assert got.dtype == np.float32 and got.shape == tuple(values.shape), layer
        np.testing.assert_allclose(got, values.numpy(), rtol=1e-5, atol=1e-5, err_msg=layer)


def _identity(out):
    return out


def test_timm_resnet_dump_equals_a_direct_forward(tmp_path):
    import timm

    config = _config(tmp_path / "out", {"name": "timm:resnet18"}, ["layer3", "layer4"])
    summary = run(config, stream=None)
    assert summary.rows == {"layer3": 12, "layer4": 12} and summary.actors == 2
    model = build_model(config.model)
    data = timm.data.resolve_model_data_config(model)
    expected = _direct(model, _images(config), data["mean"], data["std"],
                       {"layer3": ("layer3", _identity), "layer4": ("layer4", _identity)})
    _assert_dump_equals(config, expected)


def test_timm_vit_token_dump_equals_a_direct_forward(tmp_path):
    import timm

    config = _config(tmp_path / "out", VIT, ["blocks.0", "norm"])
    run(config, stream=None)
    model = build_model(config.model)
    data = timm.data.resolve_model_data_config(model)
    resize = math.floor(32 / data["crop_pct"])  # timm's evaluation transform at the model's 32 px grid
    expected = _direct(model, _images(config, resize, 32), data["mean"], data["std"],
                       {"blocks.0": ("blocks.0", _identity), "norm": ("norm", _identity)})
    assert expected["norm"].shape == (12, 17, 192)  # 16 patches and the class token
    _assert_dump_equals(config, expected)


def test_transformers_vit_dump_equals_a_direct_forward(tmp_path):
    from transformers import ViTImageProcessor

    from support.hf_models import tiny_vit

    folder = tmp_path / "vit"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        tiny_vit().save_pretrained(folder)
    ViTImageProcessor(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    layers = ["layers.0.attention[0]", "layers.1", "[last_hidden_state]", "[pooler_output]"]
    config = _config(tmp_path / "out", {"name": "support.hf_models:vit_from_folder", "kwargs": {"path": str(folder)}},
                     layers)
    run(config, stream=None)
    model = build_model(config.model)
    expected = _direct(model, _images(config, 32, 32), [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], {
        "layers.0.attention[0]": ("layers.0.attention", lambda out: out[0]),
        "layers.1": ("layers.1", _identity),
        "[last_hidden_state]": ("", lambda out: out.last_hidden_state),
        "[pooler_output]": ("", lambda out: out.pooler_output)})
    _assert_dump_equals(config, expected)


@pytest.mark.parametrize("builder, layer, module", [
    ("tiny_clip_vision", "[last_hidden_state]", ""),
    ("tiny_dinov2", "encoder[last_hidden_state]", "encoder"),
])
@pytest.mark.parametrize("reduce", ["cls", "mean", "none"])
def test_token_reductions_of_transformers_models(tmp_path, builder, layer, module, reduce):
    """CLIP and DINOv2 through the actor's code path (no Ray): cls, mean and none against a direct forward."""
    config = _config(tmp_path / "out", {"name": f"support.hf_models:{builder}"}, [layer], normalize="imagenet",
                     reduce=reduce, count=6)
    worker = ShardWorker(config.to_dict())
    for shard in plan_shards(6, 4):
        worker.run_shard(shard)
    worker.close()
    model = build_model(config.model)
    key = layer[layer.index("[") + 1:-1]
    full = _direct(model, _images(config), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                   {layer: (module, lambda out: out[key])})[layer]
    assert full.shape == (6, 17, 32)
    _assert_dump_equals(config, {layer: {"cls": full[:, 0], "mean": full.mean(dim=1), "none": full}[reduce]})


SWIN = {"name": "timm:swin_tiny_patch4_window7_224",
        "kwargs": {"img_size": 32, "window_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]}}
MAMBAOUT = {"name": "timm:mambaout_femto", "kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}}


@pytest.mark.parametrize("model, layers, channels_first", [
    (SWIN, ["patch_embed.proj", "layers.0", "layers.1"], {"patch_embed.proj"}),
    # its stem's activation takes a convolution's (batch, channels, ...) maps; the stages give
    # (2, 8, 8, 8) and (2, 4, 4, 16)
    (MAMBAOUT, ["stem.act", "stages.0", "stages.1"], {"stem.act"}),
])
@pytest.mark.parametrize("reduce", ["pool", "channel_mean"])
def test_the_maps_of_timm_models_laid_out_channels_last_are_reduced_over_their_height_and_width(
        tmp_path, model, layers, channels_first, reduce):
    """timm's Swin and MambaOut give (batch, height, width, channels) maps but from their
    convolutions: each is pooled per channel, as a CNN's maps are."""
    import timm

    config = _config(tmp_path / "out", model, layers, reduce=reduce)
    config = Config.from_dict({**config.to_dict(), "dump": {**config.to_dict()["dump"], "pool_size": [2, 2]}})
    run(config, stream=None)
    built = build_model(config.model)
    data = timm.data.resolve_model_data_config(built)
    resize = math.floor(32 / data["crop_pct"])
    full = _direct(built, _images(config, resize, 32), data["mean"], data["std"],
                   {layer: (layer, _identity) for layer in layers})
    maps = {layer: out if layer in channels_first else out.permute(0, 3, 1, 2) for layer, out in full.items()}
    reduced = {layer: torch.nn.functional.adaptive_avg_pool2d(m, 2) if reduce == "pool" else m.mean(dim=1)
               for layer, m in maps.items()}
    assert [m.shape[1] for m in maps.values()] == ([16, 16, 32] if model is SWIN else [4, 8, 16])
    _assert_dump_equals(config, reduced)


@pytest.mark.parametrize("model, layers, channels_last", [
    ("support.models:tv_swin", ["features.0.0", "features.1", "features.3", "permute"], {"features.1", "features.3"}),
    # inside a block, (2, 8, 8, 8) maps of both layouts; the pooled head's (2, 16, 1, 1)
    ("support.models:tv_convnext", ["features.1.0.block.0", "features.1.0.block.2", "features.1.0.block.3",
                                    "features.1.0", "classifier.0"], {"features.1.0.block.2", "features.1.0.block.3"}),
])
@pytest.mark.parametrize("reduce", ["pool", "channel_mean"])
def test_maps_permuted_to_channels_last_by_a_model_that_does_not_say_so_are_reduced_per_channel(
        tmp_path, model, layers, channels_last, reduce):
    """torchvision's Swin and ConvNeXt permute their maps to (batch, height, width, channels)
    with no attribute that says so: the trial tells such a layer by how its maps grow with the
    input's height and width, whatever their proportions, and the manifest records it."""
    config = _config(tmp_path / "out", {"name": model}, layers, normalize="imagenet", reduce=reduce)
    config = Config.from_dict({**config.to_dict(), "dump": {**config.to_dict()["dump"], "pool_size": [2, 2]}})
    run(config, stream=None)
    full = _direct(build_model(config.model), _images(config), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                   {layer: (layer, _identity) for layer in layers})
    maps = {layer: out.permute(0, 3, 1, 2) if layer in channels_last else out for layer, out in full.items()}
    _assert_dump_equals(config, {layer: torch.nn.functional.adaptive_avg_pool2d(m, 2) if reduce == "pool"
                                 else m.mean(dim=1) for layer, m in maps.items()})
    recorded = read_manifest(OutputStore(config.run.output)).layer_info
    assert {layer for layer, spec in recorded.items() if spec.layout == "channels_last"} == channels_last
    assert all(spec.layout == "channels_first" for layer, spec in recorded.items() if layer not in channels_last)


@pytest.mark.parametrize("head", [False, True])
def test_the_layout_of_a_model_that_takes_one_input_size_is_told_by_its_proportions(tmp_path, caplog, head):
    """A model that asserts its input's size cannot be run at twice it: its maps' proportions
    tell (said in a warning). One whose head alone takes one size is run up to the wanted layers."""
    layers = ["body.features.1", "body.features.3"]
    config = _config(tmp_path / "out", {"name": "support.models:one_size_swin", "kwargs": {"head": head}}, layers,
                     normalize="imagenet", reduce="pool")
    run(config, stream=None)
    recorded = read_manifest(OutputStore(config.run.output)).layer_info
    assert [recorded[layer].layout for layer in layers] == ["channels_last", "channels_last"]
    full = _direct(build_model(config.model), _images(config), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                   {layer: (layer, _identity) for layer in layers})
    _assert_dump_equals(config, {layer: out.permute(0, 3, 1, 2).mean(dim=(2, 3), keepdim=True)
                                 for layer, out in full.items()})
    warned = [r.getMessage() for r in caplog.records if "told by their proportions" in r.getMessage()]
    assert warned == ([] if head else [
        "the model takes no input of twice the height or width of 32x32 (AssertionError: Input size (64, 32) doesn't "
        "match model (32, 32)), so the layout of its maps is told by their proportions: body.features.1 (8, 8, 16) "
        "channels_last, body.features.3 (4, 4, 32) channels_last"])


@pytest.mark.parametrize("layers, stop_early", [(["act", "later"], True), (["act", "later"], False),
                                               (["act"], False)])
def test_a_layer_called_twice_in_other_shapes_is_not_told_by_its_first_calls_growth(tmp_path, layers, stop_early):
    """One GELU module called on maps of two sizes: the output stored is its last call's, so
    the growth of its first call (cut short where the forward stops early) is not compared
    with it (that made it look like windows of tokens, and refused); its proportions tell."""
    model = {"name": "support.models:shared_activation", "stop_early": stop_early}
    config = _config(tmp_path / "out", model, layers, normalize="imagenet", reduce="pool")
    run(config, stream=None)
    recorded = read_manifest(OutputStore(config.run.output)).layer_info
    assert {layer: (spec.shape, spec.layout) for layer, spec in recorded.items()} == {
        layer: ((8, 1, 1), "channels_last") for layer in layers}


def test_tensors_of_no_image_grid_whose_growth_does_not_tell_are_pooled_with_a_warning(tmp_path, caplog):
    """MaxViT's grid attention comes after its windows are put back on the grid of the size it
    was built for: at twice the input's size the model fails before it, so growth does not
    tell; its (windows, tokens, channels) tensors have the proportions of no maps of the input,
    which a warning says."""
    grid = "blocks.0.layers.0.layers.grid_attention.mlp_layer"
    config = _config(tmp_path / "out", {"name": "support.models:tv_maxvit"}, [grid], normalize="imagenet",
                     reduce="pool")
    run(config, stream=None)
    warned = [r.getMessage() for r in caplog.records if "image's maps in either layout" in r.getMessage()]
    assert warned == [f"{grid} (16, 4, 16): the proportions of no 32x32 image's maps in either layout per sample, "
                      "and how they grow with the input does not tell: pooled as channels_first, they may be no maps "
                      "at all (windows of tokens, attention) and their pooled values mean little; reduce: none keeps "
                      "them as they are"]


@pytest.mark.parametrize("reduce", ["pool", "channel_mean"])
def test_windows_of_tokens_are_not_pooled_as_maps(tmp_path, reduce):
    """Inside MaxViT's partitions, (batch, windows, tokens, channels) tensors: the trial finds
    that one dim grows with both the input's height and its width, and refuses to pool them as
    an image's maps, naming the layer; the layer that puts the windows back is pooled per
    channel, and the windows are dumped as they are with reduce: none."""
    from pipeline.errors import ConfigError

    window = "blocks.0.layers.0.layers.window_attention"
    config = _config(tmp_path / "out", {"name": "support.models:tv_maxvit"}, [f"{window}.attn_layer", window],
                     normalize="imagenet", reduce=reduce)
    with ShardWorker(config.to_dict()) as worker, pytest.raises(
            ConfigError, match=rf"dump.reduce: '{reduce}' takes .* but layer '{window}.attn_layer' gives windows of "
                               r"tokens, \(16, 4, 16\) per sample: the same dim grows"):
        worker.probe()
    config = _config(tmp_path / "back", {"name": "support.models:tv_maxvit"}, [window], normalize="imagenet",
                     reduce=reduce)
    run(config, stream=None)
    full = _direct(build_model(config.model), _images(config), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                   {window: (window, _identity)})[window]
    assert full.shape[1:] == (16, 8, 8)
    _assert_dump_equals(config, {window: full.mean(dim=(2, 3), keepdim=True) if reduce == "pool" else full.mean(dim=1)})
    config = _config(tmp_path / "none", {"name": "support.models:tv_maxvit"}, [f"{window}.attn_layer"],
                     normalize="imagenet")
    run(config, stream=None)
    full = _direct(build_model(config.model), _images(config), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                   {f"{window}.attn_layer": (f"{window}.attn_layer", _identity)})
    _assert_dump_equals(config, full)


def test_a_layers_layout_is_told_once_for_images_of_every_size(tmp_path):
    """Images of 32 and 48 px, not resized: a ConvNeXt block's (height, width, channels) maps are
    (8, 8, 8) for the first, whose proportions tell nothing, and (12, 12, 8) for the second;
    every row is pooled per channel all the same."""
    from PIL import Image

    rng, images = np.random.default_rng(0), tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([32, 48, 32, 48, 48, 32]):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(images / f"{i}.png")
    config = Config.from_dict({
        "model": {"name": "support.models:tv_convnext", "layers": ["features.1.0.block.2"]},
        "source": {"kind": "folder", "path": str(images), "preprocess": {"normalize": "imagenet"}},
        "dump": {"dtype": "float32", "reduce": "pool"},
        "run": {"output": str(tmp_path / "out"), "batch_size": 4, "shard_size": 4, "actors": 2, "executor": "local"}})
    run(config, stream=None)
    model, layer = build_model(config.model), "features.1.0.block.2"
    ids = read_table(config.run.output, layer, columns=["sample_id"]).column("sample_id").to_pylist()
    expected = []
    for sample_id in ids:
        x = torch.from_numpy(np.array(Image.open(images / sample_id))).permute(2, 0, 1)[None].float() / 255
        out = _direct(model, x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), {layer: (layer, _identity)})[layer]
        expected.append(out.mean(dim=(1, 2)).reshape(8, 1, 1))
    np.testing.assert_allclose(read_layer(config.run.output, layer), torch.stack(expected).numpy(), rtol=1e-5,
                               atol=1e-5)


def test_an_unknown_layer_of_a_model_laid_out_channels_last_is_a_config_error(tmp_path):
    from pipeline.errors import ConfigError

    config = _config(tmp_path / "out", SWIN, ["layer.0"], reduce="pool")
    with pytest.raises(ConfigError, match=r"model.layers: Unknown layer id 'layer.0'.*`actmap layers MODEL`"):
        ShardWorker(config.to_dict())


def test_token_reduction_of_an_output_without_tokens_is_refused_by_the_trial_forward(tmp_path):
    from pipeline.errors import ConfigError

    config = _config(tmp_path / "out", {"name": "support.hf_models:tiny_clip_vision"}, ["[pooler_output]"],
                     normalize="imagenet", reduce="cls")
    worker = ShardWorker(config.to_dict())
    try:
        with pytest.raises(ConfigError, match=r"layer '\[pooler_output\]' gives 2-d outputs \(1, 32\); dump.reduce "
                                              r"'cls' needs tokens \(batch, tokens, dim\)"):
            worker.probe()
    finally:
        worker.close()


def test_a_timm_vit_fed_another_size_than_it_was_built_for_is_refused_by_the_trial_forward(tmp_path, capsys):
    """timm's ViT asserts its input's size: a config mismatch (input size vs model), told with
    the input's size, not a failed run; so is the same mistake in `actmap layers`."""
    from pipeline.cli import main
    from pipeline.errors import ConfigError

    config = _config(tmp_path / "out", VIT, ["patch_embed"], normalize="imagenet")
    config = Config.from_dict({**config.to_dict(), "source": {"count": 4, "image_size": 16}})
    with ShardWorker(config.to_dict()) as worker, pytest.raises(
            ConfigError, match=r"model: a trial forward of sample '0' failed: AssertionError: Input height \(16\) "
                               r"doesn't match model \(32\) \(its input was 3x16x16: if the model takes another size, "
                               r"set source.preprocess.crop"):
        worker.probe()
    assert main(["layers", VIT["name"], "--set", "img_size=32", "--set", "patch_size=8", "--set", "depth=1",
                 "--input-size", "3", "16", "16"]) == 2
    assert ("--input-size: the model's forward fails on an input of size 3x16x16: AssertionError: Input height (16) "
            "doesn't match model (32); give a size it takes") in capsys.readouterr().err
