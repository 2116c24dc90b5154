"""Tests of extender._extender: ModelExtender."""

from __future__ import annotations

import pytest
import torch

from extender import ActivationMapGrabber, ModelExtender, UnknownLayerError


def probe(n_in: int = 3, n_out: int = 1) -> torch.nn.Module:
    return torch.nn.Linear(n_in, n_out)


@pytest.fixture
def extended(counting_model):
    ext = ModelExtender(counting_model, {"1": {"a": probe(), "b": probe(3, 2)}, "0": {"c": probe()}})
    yield ext
    ext.remove()


def test_structure_and_registrations(extended, counting_model):
    assert [name for name, _ in extended.named_children()] == ["wrapped_model", "extension_models"]
    assert isinstance(extended.extension_models, torch.nn.ModuleDict)
    assert list(extended.extension_models) == ["a", "b", "c"]
    assert extended.name_registrations == {"1": ["a", "b"], "0": ["c"]}
    exts = extended.extensions
    assert list(exts) == ["1", "0"] and exts["1"]["b"] is extended.extension_models["b"]
    assert extended.registered_submodules == ["1", "0"]
    assert repr(extended).startswith("ModelExtender(\n  (wrapped_model): Sequential(")
    # the views are copies
    extended.name_registrations["1"].append("x")
    assert extended.name_registrations["1"] == ["a", "b"]


def test_output_pairs_and_order(extended):
    x = torch.rand(4, 2)
    out, ext_out = extended(x)
    assert out.shape == (4, 1)
    assert list(ext_out) == ["a", "b", "c"]
    hidden = extended.wrapped_model[1](extended.wrapped_model[0](x))
    assert torch.allclose(ext_out["b"], extended.extension_models["b"](hidden))
    assert ext_out["b"].shape == (4, 2)


def test_return_main_output_option(counting_model):
    with ModelExtender(counting_model, {"1": {"a": probe()}}, return_main_output=False) as ext:
        result = ext(torch.rand(2, 2))
        assert isinstance(result, dict) and list(result) == ["a"]
        ext.return_main_output = True
        out, result = ext(torch.rand(2, 2))
        assert out.shape == (2, 1)


def test_backprop_reaches_extensions_and_model(extended, counting_model):
    _, ext_out = extended(torch.rand(4, 2))
    ext_out["a"].sum().backward()
    assert extended.extension_models["a"].weight.grad is not None
    assert counting_model[0].weight.grad is not None  # below the hooked layer
    assert counting_model[3].weight.grad is None  # above it
    assert extended.extension_models["b"].weight.grad is None


def test_training_step_changes_extension_and_model(counting_model):
    with ModelExtender(counting_model, {"1": {"a": probe()}}, return_main_output=False) as ext:
        before = {name: p.detach().clone() for name, p in ext.named_parameters()}
        opt = torch.optim.SGD(ext.parameters(), lr=0.1)
        ext(torch.rand(8, 2))["a"].pow(2).mean().backward()
        opt.step()
        changed = {name: not torch.equal(before[name], p) for name, p in ext.named_parameters()}
    assert changed == {
        "wrapped_model.0.weight": True,
        "wrapped_model.0.bias": True,
        "wrapped_model.3.weight": False,
        "wrapped_model.3.bias": False,
        "extension_models.a.weight": True,
        "extension_models.a.bias": True,
    }


def test_overwrite_existing_name(extended):
    with pytest.raises(ValueError) as info:
        extended.register_extensions({"0": {"a": probe()}})
    assert str(info.value) == "Tried to overwrite module under existing name: a"
    assert extended.name_registrations == {"1": ["a", "b"], "0": ["c"]}


def test_duplicate_name_within_one_call(counting_model, assert_no_hooks):
    with pytest.raises(ValueError) as info:
        ModelExtender(counting_model, {"0": {"x": probe(2)}, "1": {"x": probe()}})
    assert str(info.value) == (
        "Extension name 'x' is given for layers '0' and '1'; "
        "extension names must be unique across all layers"
    )
    assert_no_hooks(counting_model)


@pytest.mark.parametrize(
    "name, error, message",
    [
        ("", ValueError, "Extension names must not be empty (for layer '1')"),
        ("a.b", ValueError, "Extension name 'a.b' must not contain '.'"),
        (
            "keys",
            ValueError,
            "Extension name 'keys' clashes with an attribute of torch.nn.ModuleDict; choose another name",
        ),
        (
            "training",
            ValueError,
            "Extension name 'training' clashes with an attribute of torch.nn.ModuleDict; choose another name",
        ),
        (3, TypeError, "Extension names must be str, got int: 3 (for layer '1')"),
    ],
)
def test_invalid_names(extended, name, error, message):
    with pytest.raises(error) as info:
        extended.register_extensions({"1": {name: probe()}})
    assert str(info.value) == message
    assert extended.name_registrations == {"1": ["a", "b"], "0": ["c"]}


def test_non_module_extension(extended):
    with pytest.raises(ValueError) as info:
        extended.register_extensions({"1": {"f": torch.relu}})
    assert str(info.value) == "Extension 'f' must be a torch.nn.Module, got builtin_function_or_method"


def test_bad_argument_shapes(extended):
    with pytest.raises(TypeError, match=r"extensions must be a mapping \{layer_id: \{name: module\}\}, got list"):
        extended.register_extensions([("1", probe())])
    with pytest.raises(TypeError, match=r"The extensions of layer '1' must be a mapping \{name: module\}, got Linear"):
        extended.register_extensions({"1": probe()})
    with pytest.raises(UnknownLayerError, match="Unknown layer id 'l1'"):
        extended.register_extensions({"l1": {"d": probe()}})
    with pytest.raises(ValueError, match="got None"):
        extended.register_extensions({None: {"d": probe()}})


def test_failed_registration_changes_nothing(extended, counting_model):
    hooks = {name: len(m._forward_hooks) for name, m in counting_model.named_modules()}
    with pytest.raises(ValueError):
        extended.register_extensions({"3": {"d": probe(1)}, "1": {"a": probe()}})
    assert extended.name_registrations == {"1": ["a", "b"], "0": ["c"]}
    assert list(extended.extension_models) == ["a", "b", "c"]
    assert {name: len(m._forward_hooks) for name, m in counting_model.named_modules()} == hooks


def test_register_and_unregister(extended, counting_model):
    extended.register_extensions({"3": {"d": probe(1)}, "1": {"e": probe()}})
    assert extended.name_registrations == {"1": ["a", "b", "e"], "0": ["c"], "3": ["d"]}
    assert list(extended(torch.rand(2, 2))[1]) == ["a", "b", "e", "c", "d"]
    extended.unregister_extension("a")
    assert "a" not in extended.extension_models
    with pytest.raises(KeyError) as info:
        extended.unregister_extension("a")
    assert str(info.value) == "'Tried to unregister extension of unknown name a'"


def test_unregister_last_extension_removes_the_layer_hook(extended, counting_model):
    extended.unregister_extension("c")
    assert not counting_model[0]._forward_hooks
    assert extended.name_registrations == {"1": ["a", "b"]}
    assert extended.registered_submodules == ["1"]
    out, ext_out = extended(torch.rand(2, 2))
    assert out.shape == (2, 1) and list(ext_out) == ["a", "b"]
    extended.unregister_extension("a")
    extended.unregister_extension("b")
    assert extended(torch.rand(2, 2))[1] == {}
    # re-registering on the layer brings a hook back
    extended.register_extensions({"0": {"c": probe()}})
    assert list(extended(torch.rand(2, 2))[1]) == ["c"]


def test_remove_unregisters_everything(counting_model, assert_no_hooks):
    ext = ModelExtender(counting_model, {"1": {"a": probe()}, "0": {"c": probe()}})
    kept = ext.extension_models["a"]
    ext.remove()
    ext.remove()
    assert ext.name_registrations == {} and len(ext.extension_models) == 0
    assert isinstance(kept, torch.nn.Linear)
    assert_no_hooks(counting_model)
    assert ext(torch.rand(1, 2))[1] == {}


def test_eval_reaches_extensions(extended, counting_model):
    extended.register_extensions({"1": {"drop": torch.nn.Dropout()}})
    extended.eval()
    assert not extended.extension_models["drop"].training and not counting_model.training
    x = torch.rand(2, 2)
    _, ext_out = extended(x)
    assert torch.equal(ext_out["drop"], counting_model[1](counting_model[0](x)))


def test_extensions_on_non_tensor_outputs_and_whole_model():
    class Pairwise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x, *, shift=0.0):
            return {"y": self.lin(x) + shift, "z": x}

    class PickY(torch.nn.Module):
        def forward(self, out):
            return out["y"].sum(dim=1)

    with ModelExtender(Pairwise(), {"": {"sum_y": PickY()}}) as ext:
        out, ext_out = ext(torch.ones(3, 2), shift=1.0)
    assert torch.allclose(ext_out["sum_y"], out["y"].sum(dim=1))


def test_an_extension_that_fails_is_named_with_its_layer():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    extended = ModelExtender(model, {"2": {"bad_head": torch.nn.Linear(8, 1)}})
    with pytest.raises(RuntimeError) as info:
        extended(torch.ones(3, 2))
    assert info.value.__notes__ == ["in the extension 'bad_head' on layer '2'"]


def test_an_extension_on_a_layer_changed_in_place_later_still_backpropagates():
    """torchvision's ResNet changes a batch norm's output in place (ReLU(inplace=True)): the
    extension gets a copy, so its backward finds the values it saw."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    resnet18 = resnet18(weights=None).eval()  # (its own: the backward below fills its gradients)
    head = torch.nn.Sequential(torch.nn.Conv2d(64, 1, 1), torch.nn.Flatten(), torch.nn.LazyLinear(1))
    extended = ModelExtender(resnet18, {"layer1.0.bn1": {"p": head}})
    x = torch.randn(2, 3, 32, 32)
    _, ext = extended(x)
    ext["p"].sum().backward()
    assert head[0].weight.grad is not None and resnet18.conv1.weight.grad is not None
    with torch.no_grad():
        bn1 = ActivationMapGrabber(resnet18, ["layer1.0.bn1"], clone=True)(x)[1]["layer1.0.bn1"]
        assert torch.allclose(extended(x)[1]["p"], head(bn1))


GRAD_MODES = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_an_extension_that_changes_its_input_in_place_leaves_the_model_output_alone(mode):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    x = torch.randn(8, 4)
    with torch.no_grad():
        expected = model(x)
    head = torch.nn.Sequential(torch.nn.ReLU(inplace=True), torch.nn.Linear(4, 2))
    with ModelExtender(model, {"0": {"probe": head}}) as extended, GRAD_MODES[mode]():
        out, ext = extended(x)
        assert torch.equal(out, expected)
        assert torch.allclose(ext["probe"], head(model[0](x)))


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_an_extension_output_that_views_its_input_keeps_the_values_it_computed(mode):
    """The model changes the layer output in place after the hook (ReLU(inplace=True)); an
    extension whose output is its input (Identity, Flatten, a slice) must not follow."""
    model = torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.ReLU(inplace=True))
    model[0].weight.data.fill_(1.0)
    model[0].bias.data.fill_(0.0)
    with ModelExtender(model, {"0": {"same": torch.nn.Identity(), "flat": torch.nn.Flatten(0)}}) as extended:
        with GRAD_MODES[mode]():
            out, ext = extended(-torch.ones(1, 1))
    assert out.tolist() == [[0.0, 0.0]]
    assert ext["same"].tolist() == [[-1.0, -1.0]] and ext["flat"].tolist() == [-1.0, -1.0]


class FrozenBackbone(torch.nn.Module):
    """A backbone computed under the model's own torch.no_grad() block, then a head."""

    def __init__(self):
        super().__init__()
        self.backbone, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)

    def forward(self, x):
        with torch.no_grad():
            features = self.backbone(x)
        return self.head(features)


def test_extensions_on_a_layer_the_model_runs_without_gradients_still_train():
    torch.manual_seed(0)
    model, head = FrozenBackbone(), torch.nn.Linear(4, 2)
    with ModelExtender(model, {"backbone": {"probe": head}}) as extended:
        out, ext = extended(torch.randn(8, 4))
        assert ext["probe"].requires_grad
        (out.sum() + ext["probe"].sum()).backward()
        assert head.weight.grad is not None and model.head.weight.grad is not None
        assert model.backbone.weight.grad is None  # (the model's own no_grad block holds for it)
        assert torch.is_grad_enabled()
        # a call without gradients runs the extensions without them too
        for mode in (torch.no_grad, torch.inference_mode):
            with mode():
                assert not extended(torch.randn(8, 4))[1]["probe"].requires_grad


def test_a_layer_that_takes_no_hook_leaves_the_registrations_as_they_were(scripted_part_model, assert_no_hooks):
    model = scripted_part_model
    with ModelExtender(model, {"": {"whole": torch.nn.Identity()}}) as extended:
        with pytest.raises(TypeError, match="Layer 'inner' is a TorchScript module"):
            extended.register_extensions({"a": {"fine": torch.nn.Identity()}, "inner": {"bad": torch.nn.Identity()}})
        assert extended.name_registrations == {"": ["whole"]}
        assert list(extended.extension_models) == ["whole"]
        assert extended.registered_submodules == [""] and len(model.a._forward_hooks) == 0
        extended.register_extensions({"a": {"bad": torch.nn.Identity()}})  # the names are free
        assert list(extended(torch.rand(1, 4))[1]) == ["whole", "bad"]
    assert_no_hooks(model)
