import pytest

from pipeline.config import (Config, Mode, Precision, SourceKind, StorageDtype, apply_overrides,
                             identity_diff, load_config)
from pipeline.errors import ConfigError


def test_empty_config_is_the_embedded_default():
    cfg = Config.from_dict({})
    assert cfg.model.name == "resnet18"
    assert cfg.model.layers == ("layer3", "layer4")
    assert cfg.model.mode is Mode.GRAB and cfg.model.precision is Precision.FP32
    assert cfg.source.kind is SourceKind.GENERATED
    assert cfg.dump.dtype is StorageDtype.FLOAT16
    assert cfg.shapes_fixed()


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: resnet50\n  layers: [layer2]\nrun:\n  batch_size: 16\n")
    cfg = load_config(path, ["run.batch_size=64", "source.preprocess.crop=224", "model.precision=bf16"])
    assert cfg.model.name == "resnet50" and cfg.model.layers == ("layer2",)
    assert cfg.run.batch_size == 64
    assert cfg.source.preprocess.crop == (224, 224)
    assert cfg.model.precision is Precision.BF16


@pytest.mark.parametrize("data, message", [
    ({"modle": {}}, "modle: unknown key; did you mean 'model'?"),
    ({"run": {"batch_size": 0}}, "run.batch_size: must be at least 1, got 0"),
    ({"run": {"batch_size": "8"}}, "run.batch_size: expected an integer, got '8'"),
    ({"model": {"precision": "bf61"}}, "model.precision: 'bf61' is not valid; did you mean 'bf16'?"),
    ({"model": {"layers": []}}, "model.layers: expected a non-empty list of layer ids, got []"),
    ({"model": {"layers": ["a", "a"]}}, "model.layers: lists a layer twice: ['a', 'a']"),
    ({"model": {"mode": "stump", "layers": ["a", "b"]}},
     "model.layers: stump mode takes exactly one layer, got ['a', 'b']; use mode: grab for several"),
    ({"source": {"kind": "folder"}},
     "source.path: required for source.kind 'folder' (e.g. '/data/images')"),
    ({"source": {"kind": "dataset", "target": "nocolon"}},
     "source.target: 'nocolon' is not of the form 'package.module:callable'"),
    ({"source": {"preprocess": {"normalize": "imagenette"}}},
     "source.preprocess.normalize: 'imagenette' is not valid; valid: 'imagenet', 'none', 'model' or "
     "{mean: [r, g, b], std: [r, g, b]}"),
    ({"source": {"preprocess": {"crop": [0, 3]}}},
     "source.preprocess.crop: expected a positive int or [height, width], got [0, 3]"),
    ({"dump": {"reduce": "max"}}, "dump.reduce: 'max' is not valid; valid: 'none', 'pool', 'channel_mean', 'cls', 'mean'"),
    ({"run": {"strict": "yes"}}, "run.strict: expected true or false, got 'yes'"),
    ({"run": 3}, "run: expected a mapping, got 3"),
])
def test_bad_values_name_the_key_and_what_is_valid(data, message):
    with pytest.raises(ConfigError) as info:
        Config.from_dict(data)
    assert str(info.value) == message


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def test_override_errors():
    with pytest.raises(ConfigError, match="is not of the form key.path=value"):
        apply_overrides({}, ["batch_size"])
    with pytest.raises(ConfigError, match="run.output: is a value, not a section"):
        apply_overrides({"run": {"output": "x"}}, ["run.output.deep=1"])


def test_normalize_mean_std():
    cfg = Config.from_dict({"source": {"preprocess": {"normalize": {"mean": [0.5] * 3, "std": [0.25] * 3}}}})
    assert cfg.source.preprocess.mean_std() == ((0.5,) * 3, (0.25,) * 3)
    assert Config.from_dict({"source": {"preprocess": {"normalize": "none"}}}).source.preprocess.mean_std() is None


def test_identity_ignores_resources_but_not_content():
    a = Config.from_dict({})
    b = Config.from_dict({"run": {"actors": 7, "batch_size": 3, "output": "elsewhere"}})
    c = Config.from_dict({"run": {"shard_size": 100}})
    assert a.identity() == b.identity()
    assert identity_diff(a.identity(), c.identity()) == ["shard_size: 256 -> 100"]


def test_to_dict_round_trips():
    cfg = Config.from_dict({"model": {"layers": ["layer1"], "kwargs": {"num_classes": 3}},
                            "source": {"preprocess": {"crop": 32}}})
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_variable_shapes_when_images_are_not_cropped():
    assert not Config.from_dict({"source": {"kind": "folder", "path": "/x"}}).shapes_fixed()
    assert Config.from_dict({"source": {"kind": "folder", "path": "/x", "preprocess": {"crop": 8}}}).shapes_fixed()
    assert Config.from_dict({"source": {"kind": "folder", "path": "/x"}, "dump": {"shapes": "fixed"}}).shapes_fixed()
