"""Tests of extender._layers: layer-id checks, UnknownLayerError, list_layers, format_layers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from extender import ActivationMapGrabber, LayerInfo, ModelStump, UnknownLayerError, format_layers, list_layers
from extender._layers import check_layer_id, resolve_layer, resolve_layers


class TupleDictModel(torch.nn.Module):
    """A model whose sub-modules return a tuple and a dict, and which takes two inputs."""

    class Split(torch.nn.Module):
        def forward(self, x):
            return x[:, :1], x[:, 1:]

    class ToDict(torch.nn.Module):
        def forward(self, a, b):
            return {"a": a, "b": b}

    def __init__(self) -> None:
        super().__init__()
        self.split = self.Split()
        self.to_dict = self.ToDict()
        self.unused = torch.nn.Linear(1, 1)

    def forward(self, x, y):
        a, b = self.split(x + y)
        return self.to_dict(a, b)


# ------------------------------------------------------------------ id checks


def test_check_layer_id_none_is_value_error():
    with pytest.raises(ValueError, match=r"Layer id must be a str .* got None"):
        check_layer_id(None)


@pytest.mark.parametrize("bad", [3, 1.5, ["l1"], b"l1"])
def test_check_layer_id_non_str_is_type_error(bad):
    with pytest.raises(TypeError, match=f"got {type(bad).__name__}"):
        check_layer_id(bad)


def test_resolve_layer_finds_submodules_and_root(counting_model):
    assert resolve_layer(counting_model, "") is counting_model
    assert resolve_layer(counting_model, "count") is counting_model.count
    assert resolve_layers(counting_model, ["3", "0"]) == [counting_model[3], counting_model[0]]


def test_unknown_layer_with_suggestions(resnet18):
    with pytest.raises(UnknownLayerError) as info:
        resolve_layer(resnet18, "layer5")
    err = info.value
    assert isinstance(err, KeyError)
    assert err.layer_id == "layer5"
    assert err.suggestions and set(err.suggestions) <= {"layer1", "layer2", "layer3", "layer4"}
    assert str(err) == (
        f"Unknown layer id 'layer5' in ResNet; did you mean "
        f"{', '.join(repr(s) for s in err.suggestions)}? "
        "(list the valid ids with extender.list_layers(model))"
    )


def test_unknown_layer_without_suggestions(counting_model):
    with pytest.raises(UnknownLayerError) as info:
        resolve_layer(counting_model, "backbone.body.layer4")
    assert info.value.suggestions == []
    assert str(info.value) == (
        "Unknown layer id 'backbone.body.layer4' in Sequential; "
        "list the valid ids with extender.list_layers(model)"
    )


def test_unknown_layer_error_is_shown_as_public_name():
    assert UnknownLayerError.__module__ == "extender"


def test_resolve_layers_checks_types_before_lookup(counting_model):
    with pytest.raises(ValueError):
        resolve_layers(counting_model, ["0", None])
    with pytest.raises(TypeError):
        resolve_layers(counting_model, ["0", 1])


# ---------------------------------------------------------------- list_layers


def test_list_layers_without_input(resnet18):
    infos = list_layers(resnet18)
    assert [i.id for i in infos] == [name for name, _ in resnet18.named_modules()]
    assert infos[0] == LayerInfo("", "ResNet")
    by_id = {i.id: i for i in infos}
    assert by_id["layer1.0.conv1"].type_name == "Conv2d"
    assert all(i.output_shape is None and i.calls is None for i in infos)
    assert str(by_id["fc"]) == "fc  Linear"


def test_list_layers_with_input(resnet18, assert_no_hooks):
    infos = {i.id: i for i in list_layers(resnet18, torch.rand(2, 3, 32, 32))}
    assert infos[""].output_shape == (2, 1000)
    assert infos["conv1"].output_shape == (2, 64, 16, 16)
    assert infos["layer4"].output_shape == (2, 512, 1, 1)
    assert infos["fc"].output_summary == "(2, 1000)"
    # BasicBlock applies its single relu twice.
    assert infos["layer1.0.relu"].calls == 2
    assert infos["layer1.0.conv1"].calls == 1
    assert str(infos["layer1.0.relu"]) == (
        "layer1.0.relu  ReLU  (2, 64, 8, 8)  (called 2 times; last call shown)"
    )
    assert_no_hooks(resnet18)


def test_list_layers_restores_modes_and_leaves_batchnorm_stats():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    model.train()
    model[0].eval()  # a mixed state that must survive
    stats = model[1].running_mean.clone()
    batches = int(model[1].num_batches_tracked)
    list_layers(model, torch.rand(2, 3, 4, 4) * 5)
    assert model.training and not model[0].training and model[1].training
    assert torch.equal(model[1].running_mean, stats)
    assert int(model[1].num_batches_tracked) == batches


def test_list_layers_describes_non_tensor_outputs_and_unpacks_tuples(assert_no_hooks):
    model = TupleDictModel()
    infos = {i.id: i for i in list_layers(model, (torch.rand(2, 3), torch.rand(2, 3)))}
    assert infos["split"].output_shape is None
    assert infos["split"].output_summary == "tuple[(2, 1), (2, 2)]"
    assert infos["to_dict"].output_summary == "dict{'a': (2, 1), 'b': (2, 2)}"
    assert infos[""].output_summary == "dict{'a': (2, 1), 'b': (2, 2)}"
    assert infos["unused"].calls == 0
    assert infos["unused"].output_summary is None
    assert str(infos["unused"]) == "unused  Linear  (not called)"
    assert_no_hooks(model)


def test_list_layers_removes_hooks_and_restores_modes_on_error(assert_no_hooks):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    with pytest.raises(RuntimeError):
        list_layers(model, torch.rand(3, 5))
    assert model.training and model[1].training
    assert_no_hooks(model)


def test_list_layers_long_and_nested_descriptions():
    class Many(torch.nn.Module):
        def forward(self, x):
            return [x] * 6, {str(i): (x, None, 3) for i in range(6)}

    (info,) = [i for i in list_layers(Many(), torch.rand(1)) if i.id == ""]
    assert info.output_summary == (
        "tuple[list[(1,), (1,), (1,), (1,), ... (2 more)], "
        "dict{'0': tuple[(1,), None, int], '1': tuple[(1,), None, int], "
        "'2': tuple[(1,), None, int], '3': tuple[(1,), None, int], ... (2 more)}]"
    )


def test_layer_info_is_frozen():
    info = LayerInfo("a", "Linear")
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.id = "b"
    assert LayerInfo("", "Net").shown_id == "''"


def test_format_layers_with_and_without_outputs():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Identity())
    assert format_layers(list_layers(model)).splitlines() == [
        "layer id  type",
        "''        Sequential",
        "0         Linear",
        "1         Identity",
    ]
    assert format_layers(list_layers(model, torch.rand(4, 2))).splitlines() == [
        "layer id  type        output  calls",
        "''        Sequential  (4, 3)  1",
        "0         Linear      (4, 3)  1",
        "1         Identity    (4, 3)  1",
    ]


def test_a_torchscript_part_is_listed_without_outputs(scripted_part_model):
    rows = {info.id: (info.output_shape, info.calls) for info in list_layers(scripted_part_model, torch.randn(3, 4))}
    assert rows == {"": ((3, 8), 1), "a": ((3, 4), 1), "inner": (None, None), "inner.0": (None, None),
                    "inner.1": (None, None)}


class Shared(torch.nn.Module):
    """One Linear under two names: ``enc`` and its alias ``dec``, which named_modules() leaves out."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(3, 3)
        self.dec = self.enc

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


def test_a_module_under_a_second_name_is_found_by_either():
    model = Shared()
    assert [name for name, _ in model.named_modules()] == ["", "enc"]
    assert resolve_layers(model, ["dec", "enc", "dec[0]"]) == [model.enc] * 3
    x = torch.rand(2, 3)
    with ActivationMapGrabber(model, ["dec"], all_calls=True) as grabber:
        out, maps = grabber(x)
    assert len(maps["dec"]) == 2 and torch.equal(maps["dec"][1], out)  # every call of the module


def test_an_unknown_id_suggests_the_same_id_under_or_without_a_wrapper_prefix(resnet18):
    parallel = torch.nn.DataParallel(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    with pytest.raises(UnknownLayerError) as info:
        ActivationMapGrabber(parallel, ["0"])
    assert str(info.value) == (
        "Unknown layer id '0' in DataParallel; did you mean 'module.0'? "
        "(list the valid ids with extender.list_layers(model))"
    )
    with pytest.raises(UnknownLayerError) as info:
        resolve_layer(resnet18, "module.layer3[0]")
    assert info.value.suggestions[0] == "layer3[0]"


def test_unknown_layer_error_survives_pickle_and_deepcopy():
    import copy
    import pickle

    with pytest.raises(UnknownLayerError) as info:
        resolve_layer(torch.nn.Sequential(torch.nn.Linear(2, 2)), "00")
    err = info.value
    err.add_note("while building the dump")
    for copied in (pickle.loads(pickle.dumps(err)), copy.deepcopy(err)):
        assert type(copied) is UnknownLayerError and str(copied) == str(err)
        assert (copied.layer_id, copied.model_name, copied.suggestions) == ("00", "Sequential", ["0"])
        assert copied.__notes__ == ["while building the dump"]


def test_list_layers_counts_the_head_of_a_stump_it_runs_through(counting_model, assert_no_hooks):
    with ModelStump(counting_model, "1") as stump:
        infos = {info.id: info for info in list_layers(stump, torch.rand(4, 2))}
        assert stump.registered_submodules == ["1"]
    assert (infos["wrapped_model.1"].calls, infos["wrapped_model.1"].output_shape) == (1, (4, 3))
    assert infos["wrapped_model.3"].calls == 0
    assert_no_hooks(counting_model)
