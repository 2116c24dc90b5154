"""Model building beyond torchvision: timm by name, transformers through a callable, weights files,
missing extras, and the model's own preprocessing (normalize: model)."""

import json
import subprocess
import sys

import pytest
import torch

from pipeline.config import ModelSpec, PreprocessSpec
from pipeline.errors import ConfigError
from pipeline._model_inputs import ModelInput, resolve_input
from pipeline._models import build_model

VIT = {"name": "timm:vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}}


@pytest.mark.parametrize("name", ["timm:resnet18", "timm/resnet18"])
def test_timm_by_name_builds_random_weights_from_the_seed(name):
    import timm

    model = build_model(ModelSpec(name=name, layers=["layer3"]))
    torch.manual_seed(0)
    direct = timm.create_model("resnet18", pretrained=False).eval()
    assert type(model) is type(direct) and not model.training
    assert torch.equal(model.conv1.weight, direct.conv1.weight)
    assert not any(p.requires_grad for p in model.parameters())


def test_timm_kwargs_and_tags_reach_create_model():
    model = build_model(ModelSpec(name="timm:vit_tiny_patch16_224.augreg_in21k", kwargs={"depth": 1, "num_classes": 3}))
    assert len(model.blocks) == 1 and model.head.out_features == 3
    assert model.pretrained_cfg["tag"] == "augreg_in21k"


def test_unknown_timm_name_lists_close_matches():
    with pytest.raises(ConfigError, match=r"model.name: 'vit_smal_patch16_224' is not a timm model; "
                                          r"did you mean 'vit_small_patch16_224'"):
        build_model(ModelSpec(name="timm:vit_smal_patch16_224"))
    with pytest.raises(ConfigError, match=r"model.kwargs: timm:resnet18\(\*\*.*'no_such'.*\) failed"):
        build_model(ModelSpec(name="timm:resnet18", kwargs={"no_such": 1}))


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what an environment without timm gives
    with pytest.raises(ConfigError, match=r"model.name: needs the package 'timm', which is not installed; "
                                          r"install it with: pip install 'actmap\[timm\]'"):
        build_model(ModelSpec(name="timm:resnet18"))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_weights_file_loads_into_a_timm_model(tmp_path, suffix):
    spec = ModelSpec(name="timm:resnet18", seed=3)
    state = {k: torch.full_like(v, 0.25) if v.is_floating_point() else v
             for k, v in build_model(spec).state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    model = build_model(ModelSpec(name="timm:resnet18", weights=str(path)))
    assert torch.equal(model.fc.weight, torch.full_like(model.fc.weight, 0.25))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a tensor file")
    with pytest.raises(ConfigError, match="model.weights: cannot load"):
        build_model(ModelSpec(name="timm:resnet18", weights=str(broken)))


@pytest.mark.parametrize("kwargs, said", [
    ({}, r"model.name: support.models:failing\(\*\*\{\}\) failed: KeyError: \"missing config key 'depth'\""),
    ({"error": "AssertionError", "message": "depth must be even"},
     r"model.kwargs: support.models:failing\(\*\*\{.*\}\) failed: AssertionError: depth must be even"),
    ({"error": "FileNotFoundError", "message": "no file w.pt"}, r"model.kwargs: .* failed: FileNotFoundError: no file w.pt"),
    ({"error": "IndexError", "message": ""}, r"model.kwargs: .* failed: IndexError$"),
])
def test_a_builder_error_a_rerun_meets_again_is_a_config_error(kwargs, said):
    """Whatever the user's builder raises while it builds from the config (a KeyError, an
    assert, a missing file) a rerun meets again: a ConfigError, not a failed run."""
    with pytest.raises(ConfigError, match=said):
        build_model(ModelSpec(name="support.models:failing", kwargs=kwargs))


def test_a_builder_that_imports_a_missing_module_names_the_model():
    with pytest.raises(ConfigError, match=r"model.name: support.models:importing\(\*\*\{\}\) failed: "
                                          r"ModuleNotFoundError: No module named 'no_such_module_for_actmap_tests'; "
                                          r"install what it imports"):
        build_model(ModelSpec(name="support.models:importing"))


@pytest.mark.parametrize("error", ["MemoryError", "ConnectionResetError", "TimeoutError", "KeyboardInterrupt"])
def test_a_builder_error_a_rerun_may_get_past_is_raised_as_it_is(error):
    """Short memory, the network (a builder that downloads its weights) and an interrupt are
    no fault of the config: they stay what they are (a failed run, which a rerun resumes)."""
    import builtins

    with pytest.raises(getattr(builtins, error)):
        build_model(ModelSpec(name="support.models:failing", kwargs={"error": error}))


def test_lazy_modules_without_weights_are_refused_naming_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"model.name: 'support.models:lazy' built a model with lazy modules, "
                                          r"conv \(LazyConv2d\), whose weights are made by their first forward.*"
                                          r"run one forward of a dummy input.*or give a model.weights file"):
        build_model(ModelSpec(name="support.models:lazy"))
    # the two fixes the message names work: a forward in the builder (seeded: every build the same) ...
    spec = ModelSpec(name="support.models:lazy", kwargs={"initialise": True}, layers=["relu"])
    model, again = build_model(spec), build_model(spec)
    assert type(model.conv).__name__ == "Conv2d" and not model.conv.weight.requires_grad
    assert torch.equal(model.conv.weight, again.conv.weight)
    # ... and a weights file
    torch.save(model.state_dict(), tmp_path / "w.pt")
    loaded = build_model(ModelSpec(name="support.models:lazy", weights=str(tmp_path / "w.pt")))
    assert torch.equal(loaded.conv.weight, model.conv.weight)
    assert loaded(torch.zeros(1, 3, 8, 8)).shape == (1, 8, 8, 8)


def test_transformers_model_through_a_callable():
    model = build_model(ModelSpec(name="support.hf_models:tiny_vit", kwargs={"num_hidden_layers": 1}))
    assert type(model).__name__ == "ViTModel" and model.config.num_hidden_layers == 1
    again = build_model(ModelSpec(name="support.hf_models:tiny_vit", kwargs={"num_hidden_layers": 1}))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_layers_cli_lists_timm_ids_and_selectable_elements(capsys):
    from pipeline.cli import main

    assert main(["layers", "timm:vit_small_patch16_224", "--set", "depth=1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert rows["blocks.0.attn.qkv"] == ["Linear"] and rows["patch_embed.proj"] == ["Conv2d"]
    assert main(["layers", "support.hf_models:tiny_vit", "--input-size", "3", "32", "32"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert rows["[last_hidden_state]"] == ["Tensor", "(1,", "17,", "32)", "1"]
    attention = [i for i in rows if i.endswith("attention[0]")]
    assert attention and rows[attention[0]][0] == "Tensor"


def test_layers_cli_bad_timm_name_exits_2(capsys):
    from pipeline.cli import main

    assert main(["layers", "timm:resnet_18"]) == 2
    assert "did you mean 'resnet18'" in capsys.readouterr().err


# -- normalize: model ----------------------------------------------------------------------------


def test_normalize_model_from_timm_pretrained_cfg():
    resnet = build_model(ModelSpec(name="timm:resnet18"))
    got = resolve_input(PreprocessSpec(normalize="model"), resnet)
    cfg = resnet.pretrained_cfg
    assert got.mean_std == (tuple(cfg["mean"]), tuple(cfg["std"])) and got.origin == "timm pretrained_cfg"
    assert (got.resize, got.crop) == (None, None)  # a CNN keeps the config's sizes
    vit = build_model(ModelSpec(**VIT))
    got = resolve_input(PreprocessSpec(normalize="model"), vit)
    assert got.mean_std == ((0.5,) * 3, (0.5,) * 3)
    assert got.crop == (32, 32) and got.resize == int(32 / vit.pretrained_cfg["crop_pct"])  # the model's grid
    # the config's own sizes win
    assert resolve_input(PreprocessSpec(normalize="model", crop=16), vit).crop == (16, 16)
    got = resolve_input(PreprocessSpec(normalize="model", resize=40), vit)
    assert (got.resize, got.crop) == (40, None)


def test_normalize_model_from_a_saved_transformers_folder(tmp_path):
    from transformers import ViTImageProcessor

    from support.hf_models import tiny_vit

    tiny_vit().save_pretrained(tmp_path)
    ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(tmp_path)
    model = build_model(ModelSpec(name="support.hf_models:vit_from_folder", kwargs={"path": str(tmp_path)}))
    got = resolve_input(PreprocessSpec(normalize="model"), model)
    assert got == ModelInput(((0.1, 0.2, 0.3), (0.4, 0.5, 0.6)), 32, (32, 32), str(tmp_path / "preprocessor_config.json"))
    assert ModelInput.from_dict(json.loads(json.dumps(got.to_dict()))) == got


def test_normalize_model_without_numbers_is_a_clear_error():
    model = build_model(ModelSpec(name="support.hf_models:tiny_vit"))
    with pytest.raises(ConfigError, match=r"source.preprocess.normalize: 'model' takes the mean and std from "
                                          r"the model's own config, but ViTModel carries no mean and std: no "
                                          r"preprocessor_config.json \(the model was built from a config.*"
                                          r"set it to 'imagenet', 'none' or"):
        resolve_input(PreprocessSpec(normalize="model"), model)
    with pytest.raises(ConfigError, match="TinyConvNet has no timm pretrained_cfg and no transformers config"):
        resolve_input(PreprocessSpec(normalize="model"), build_model(ModelSpec(name="support.models:tiny")))
    with pytest.raises(ValueError, match="takes its constants from the model"):
        PreprocessSpec(normalize="model").mean_std()


def test_run_with_normalize_model_fails_before_any_work(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "--set", "model.name=support.hf_models:tiny_vit",
                           "--set", "model.layers=[layers.0]", "--set", "source.preprocess.normalize=model",
                           "--set", f"run.output={out}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "source.preprocess.normalize: 'model' takes the mean and std" in done.stderr
    assert not out.exists()
