"""Output selectors in layer ids: parsing, selection, errors, listing, and every wrapper."""

from __future__ import annotations

import collections
import copy
import dataclasses

import pytest
import torch

from extender import (ActivationMapGrabber, ExtendedModelStump, ModelExtender, ModelStump, OutputSelectionError,
                      UnknownLayerError, list_layers)
from extender._selectors import Selection, element_ids, split_layer_id

Pair = collections.namedtuple("Pair", ["first", "second"])


@dataclasses.dataclass
class Boxed:
    values: torch.Tensor
    extra: int = 0


class Outputs(torch.nn.Module):
    """Sub-modules returning a tuple, a dict, a named tuple, a dataclass and nested containers."""

    class Tuple(torch.nn.Module):
        def forward(self, x):
            return x + 1, x * 2, None

    class Dict(torch.nn.Module):
        def forward(self, x):
            return {"sum": x.sum(1), "max": x.amax(1)}

    class Named(torch.nn.Module):
        def forward(self, x):
            return Pair(x - 1, x - 2)

    class Data(torch.nn.Module):
        def forward(self, x):
            return Boxed(x * 3)

    class Nested(torch.nn.Module):
        def forward(self, x):
            return [(x, {"deep": x + 5})]

    def __init__(self):
        super().__init__()
        self.tup, self.dct, self.named, self.data, self.nested = (
            self.Tuple(), self.Dict(), self.Named(), self.Data(), self.Nested())
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x):
        a, b, _ = self.tup(x)
        d = self.dct(a)
        n = self.named(b)
        box = self.data(n.second)
        nested = self.nested(box.values)
        return self.lin(nested[0][1]["deep"]) + d["sum"][:, None]


X = torch.arange(6.0).reshape(2, 3)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Outputs().eval()


def test_split_layer_id():
    assert split_layer_id("a.b[0]") == ("a.b", (0,))
    assert split_layer_id("a[x][-2]") == ("a", ("x", -2))
    assert split_layer_id("[last_hidden_state]") == ("", ("last_hidden_state",))
    for plain in ("a.b", "", "a[", "a[]", "a]b", "a[0]b"):
        assert split_layer_id(plain) is None


@pytest.mark.parametrize("layer_id, expected", [
    ("tup[0]", X + 1), ("tup[1]", X * 2), ("tup[-2]", X * 2),
    ("dct[sum]", (X + 1).sum(1)), ("dct[1]", (X + 1).amax(1)),
    ("named[second]", X * 2 - 2), ("named[0]", X * 2 - 1),
    ("data[values]", (X * 2 - 2) * 3),
    ("nested[0][1][deep]", (X * 2 - 2) * 3 + 5), ("nested[0][0]", (X * 2 - 2) * 3),
])
def test_grabber_returns_the_selected_element(model, assert_no_hooks, layer_id, expected):
    with torch.no_grad(), ActivationMapGrabber(model, [layer_id]) as grabber:
        out, maps = grabber(X)
    assert list(maps) == [layer_id]
    assert torch.equal(maps[layer_id], expected)
    assert torch.equal(out, model(X))
    assert_no_hooks(model)


def test_several_selectors_on_one_module_and_the_module_itself(model):
    ids = ["tup[0]", "tup", "tup[1]"]
    with torch.no_grad(), ActivationMapGrabber(model, ids, stop_early=True) as grabber:
        out, maps = grabber(X)
    assert out is None and list(maps) == ids
    assert isinstance(maps["tup"], tuple) and torch.equal(maps["tup"][0], maps["tup[0]"])
    assert torch.equal(maps["tup[1]"], X * 2)


def test_dict_key_that_looks_like_an_integer_is_taken_as_the_key():
    class Keys(torch.nn.Module):
        def forward(self, x):
            return {"5": x, "0": x + 1}

    with ActivationMapGrabber(Keys(), ["[0]", "[5]"]) as grabber:
        maps = grabber(X)[1]
    assert torch.equal(maps["[0]"], X + 1) and torch.equal(maps["[5]"], X)


def test_stump_extender_and_extended_stump_take_selectors(model, assert_no_hooks):
    with torch.no_grad():
        stump = ModelStump(model, "dct[max]")
        assert torch.equal(stump(X), (X + 1).amax(1))
        stump.stump_head = "named[first]"
        assert torch.equal(stump(X), X * 2 - 1)
        stump.remove()
        ext = ModelExtender(model, {"tup[1]": {"probe": torch.nn.Identity()}})
        out, found = ext(X)
        assert torch.equal(found["probe"], X * 2)
        ext.remove()
        summed = ExtendedModelStump(model, "tup[0]", modification=lambda t: t.sum())
        assert summed(X).item() == (X + 1).sum().item()
        summed.remove()
    assert_no_hooks(model)


def test_a_module_named_like_a_selector_keeps_its_meaning():
    model = torch.nn.Sequential()
    model.add_module("a[0]", torch.nn.Identity())
    with ActivationMapGrabber(model, ["a[0]"]) as grabber:
        assert torch.equal(grabber(X)[1]["a[0]"], X)


def test_unknown_module_part_suggests_ids_with_the_same_selectors(model):
    with pytest.raises(UnknownLayerError) as info:
        ActivationMapGrabber(model, ["dict[sum]"])
    assert info.value.layer_id == "dict[sum]"
    assert "did you mean 'dct[sum]'" in str(info.value)
    with pytest.raises(UnknownLayerError, match="Unknown layer id 'tup\\[0' in Outputs; did you mean 'tup'"):
        ActivationMapGrabber(model, ["tup[0"])


@pytest.mark.parametrize("layer_id, message", [
    ("tup[3]", "Layer id 'tup[3]': the output of 'tup' is tuple[(2, 3), (2, 3), None], which has no "
               "element [3]; valid: [0], [1], [2]"),
    ("dct[min]", "which has no element [min]; valid: [sum], [max], [0], [1]"),
    ("named[third]", "valid: [first], [second], [0], [1]"),
    ("lin[0]", "the output of 'lin' is (2, 3), which has no element [0]; a Tensor has no elements to "
               "select; use 'lin' itself"),
    ("tup[2][0]", "the output of 'tup'[2] is None, which has no element [0]"),
    ("data[extra][0]", "the output of 'data'[extra] is int"),
])
def test_selector_that_does_not_fit_names_what_would(model, assert_no_hooks, layer_id, message):
    grabber = ActivationMapGrabber(model, [layer_id])
    with pytest.raises(OutputSelectionError) as info, grabber:
        grabber(X)
    assert isinstance(info.value, LookupError)
    assert message in str(info.value)
    assert_no_hooks(model)


def test_selectors_do_not_run_outside_the_wrappers_forward(model):
    with ActivationMapGrabber(model, ["lin[0]"]):
        model(X)  # a direct call records nothing, so the bad selector is not applied


def test_copies_keep_their_selectors(model):
    grabber = ActivationMapGrabber(model, ["dct[sum]"])
    clone = copy.deepcopy(grabber)
    with torch.no_grad():
        assert torch.equal(clone(X)[1]["dct[sum]"], grabber(X)[1]["dct[sum]"])
    grabber.remove()
    clone.remove()


def test_list_layers_lists_selectable_elements(model, assert_no_hooks):
    infos = list_layers(model, X)
    ids = [i.id for i in infos]
    assert ids[ids.index("tup"):ids.index("dct") + 3] == ["tup", "tup[0]", "tup[1]", "dct", "dct[sum]", "dct[max]"]
    by_id = {i.id: i for i in infos}
    assert by_id["nested[0][1][deep]"].output_shape == (2, 3)
    assert by_id["data[values]"].type_name == "Tensor" and by_id["data[values]"].calls == 1
    assert "tup[2]" not in by_id and "lin[0]" not in by_id
    # without an example input only modules are listed
    assert [i.id for i in list_layers(model)] == [n for n, _ in model.named_modules()]
    # every listed element id works in a grabber
    selectors = [i for i in ids if "[" in i]
    with torch.no_grad(), ActivationMapGrabber(model, selectors) as grabber:
        maps = grabber(X)[1]
    assert {k: tuple(v.shape) for k, v in maps.items()} == {i: by_id[i].output_shape for i in selectors}
    assert_no_hooks(model)


def test_element_ids_are_bounded():
    many = tuple(torch.zeros(1) for _ in range(20))
    assert [s for s, _ in element_ids(many)] == [f"[{i}]" for i in range(8)]
    deep = [[[[[torch.zeros(1)]]]]]
    assert list(element_ids(deep)) == []
    assert list(element_ids({"a[b]": torch.zeros(1)})) == []


def test_selection_of_plain_id_has_no_keys():
    assert Selection.of("layer3") == Selection("layer3", "layer3", ())
