"""Tests of extender._grabber: ActivationMapGrabber."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple

import pytest
import torch

from extender import ActivationMapGrabber, UnknownLayerError, list_layers

Pair = namedtuple("Pair", ["first", "second"])


class ManyOutputs(torch.nn.Module):
    """Sub-modules returning a tensor, a tuple, a list, a dict and a named tuple; several inputs."""

    class Tup(torch.nn.Module):
        def forward(self, x):
            return x + 1, x * 2

    class Lst(torch.nn.Module):
        def forward(self, x):
            return [x, -x]

    class Dct(torch.nn.Module):
        def forward(self, x, *, scale=1.0):
            return OrderedDict(up=x * scale, down=x / scale)

    class Named(torch.nn.Module):
        def forward(self, x):
            return Pair(x, x)

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.tup, self.lst, self.dct, self.named = self.Tup(), self.Lst(), self.Dct(), self.Named()

    def forward(self, x, y, *, scale=1.0, as_list=False):
        h = self.lin(x + y)
        a, b = self.tup(h)
        c, d = self.lst(a)
        e = self.dct(b + c + d, scale=scale)
        p = self.named(e["up"])
        if as_list:
            return [p.first, e["down"]]
        return {"out": p.first, "aux": (e["down"],)}


class Branchy(torch.nn.Module):
    """Runs either branch ``a`` or ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Identity()

    def forward(self, x, use_a=True):
        return self.head(self.a(x) if use_a else self.b(x))


def test_seed_mini_example():
    model = torch.nn.Sequential()
    model.add_module("l1", torch.nn.Linear(1, 1))
    model.add_module("l2", torch.nn.Linear(1, 1))
    with torch.no_grad():
        model.l1.weight.fill_(1), model.l1.bias.fill_(2), model.l2.weight.fill_(3), model.l2.bias.fill_(0)
    out = ActivationMapGrabber(model, ["l1"])(torch.tensor([[1.0]]))
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].item() == 9.0 and list(out[1]) == ["l1"] and out[1]["l1"].item() == 3.0


def test_single_str_module_ids_is_a_type_error(counting_model, assert_no_hooks):
    with pytest.raises(TypeError, match=r"module_ids must be a list of layer ids, not a single str; use \['0'\]"):
        ActivationMapGrabber(counting_model, "0")
    assert_no_hooks(counting_model)


def test_bad_ids(counting_model):
    with pytest.raises(ValueError, match="got None"):
        ActivationMapGrabber(counting_model, [None])
    with pytest.raises(TypeError, match="got int: 0"):
        ActivationMapGrabber(counting_model, [0])
    with pytest.raises(UnknownLayerError, match="Unknown layer id 'cont' in Sequential; did you mean 'count'"):
        ActivationMapGrabber(counting_model, ["cont"])
    with ActivationMapGrabber(counting_model) as grabber:
        with pytest.raises(UnknownLayerError):
            grabber.register_submodule("4")
        with pytest.raises(ValueError):
            grabber.register_submodule(None)
        with pytest.raises(TypeError):
            grabber.unregister_submodule(3)
        assert grabber.registered_submodules == []


def test_registration_order_and_bookkeeping(counting_model, assert_no_hooks):
    grabber = ActivationMapGrabber(counting_model, ["3", "0", "3"])
    assert grabber.registered_submodules == ["3", "0"]
    grabber.register_submodule("0")  # existing: no-op
    assert grabber.registered_submodules == ["3", "0"]
    assert len(counting_model[0]._forward_hooks) == 1
    grabber.unregister_submodule("3")
    assert not counting_model[3]._forward_hooks
    grabber.register_submodule("3")  # re-registering appends
    assert grabber.registered_submodules == ["0", "3"]
    assert list(grabber(torch.rand(2, 2))[1]) == ["0", "3"]
    with pytest.raises(KeyError, match=r"Layer '1' is not registered; registered layers: \['0', '3'\]"):
        grabber.unregister_submodule("1")
    grabber.unregister_submodule("0")
    grabber.unregister_submodule("3")
    assert_no_hooks(counting_model)


def test_dict_holds_exactly_the_registered_layers_that_ran_in_order():
    model = Branchy()
    with ActivationMapGrabber(model, ["head", "b", "a"]) as grabber:
        assert list(grabber(torch.rand(1, 2))[1]) == ["head", "a"]
        assert list(grabber(torch.rand(1, 2), use_a=False)[1]) == ["head", "b"]
        grabber.unregister_submodule("head")
        assert list(grabber(torch.rand(1, 2))[1]) == ["a"]


def test_whole_model_id_gives_the_model_output(counting_model):
    with ActivationMapGrabber(counting_model, [""]) as grabber:
        out, maps = grabber(torch.rand(3, 2))
    assert maps[""] is out


def test_all_output_types_and_several_arguments():
    torch.manual_seed(0)
    model = ManyOutputs()
    x, y = torch.rand(2, 3), torch.rand(2, 3)
    ids = ["lin", "tup", "lst", "dct", "named", ""]
    with ActivationMapGrabber(model, ids) as grabber:
        out, maps = grabber(x, y, scale=2.0)
        expected = model(x, y, scale=2.0)
        listed, list_maps = grabber(x, y, scale=2.0, as_list=True)
    assert list(maps) == ids
    assert torch.allclose(out["out"], expected["out"]) and isinstance(out["aux"], tuple)
    assert isinstance(maps["tup"], tuple) and len(maps["tup"]) == 2
    assert isinstance(maps["lst"], list) and torch.equal(maps["lst"][1], -maps["lst"][0])
    assert isinstance(maps["dct"], OrderedDict) and list(maps["dct"]) == ["up", "down"]
    assert torch.allclose(maps["dct"]["up"], 4 * maps["dct"]["down"])
    assert isinstance(maps["named"], Pair)
    assert maps[""] is out
    assert isinstance(listed, list) and isinstance(list_maps[""], list)


def test_detach_keeps_container_types_and_drops_the_graph():
    model = ManyOutputs()
    with ActivationMapGrabber(model, ["tup", "lst", "dct", "named", ""], detach=True) as grabber:
        out, maps = grabber(torch.rand(2, 3), torch.rand(2, 3))
    assert out["out"].requires_grad  # the model output itself is left alone
    assert isinstance(maps["tup"], tuple) and not any(t.requires_grad for t in maps["tup"])
    assert isinstance(maps["lst"], list) and not maps["lst"][0].requires_grad
    assert isinstance(maps["dct"], OrderedDict) and not maps["dct"]["up"].requires_grad
    assert isinstance(maps["named"], Pair) and not maps["named"].first.requires_grad
    assert not maps[""]["aux"][0].requires_grad


def test_outputs_keep_autograd_graph_by_default(counting_model):
    with ActivationMapGrabber(counting_model, ["1"]) as grabber:
        _, maps = grabber(torch.rand(4, 2))
    assert maps["1"].requires_grad
    maps["1"].sum().backward()
    assert counting_model[0].weight.grad is not None
    assert counting_model[3].weight.grad is None


def test_detach_and_clone():
    model = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.ReLU(inplace=True))
    with torch.no_grad():
        model[0].weight.fill_(1.0), model[0].bias.fill_(0.0)
    x = -torch.ones(1, 1)
    with ActivationMapGrabber(model, ["0"], detach=True) as grabber:
        shared = grabber(x)[1]["0"]
        grabber.clone = True
        copied = grabber(x)[1]["0"]
    assert not shared.requires_grad and not copied.requires_grad
    assert shared.item() == 0.0  # the later in-place ReLU reached the shared tensor
    assert copied.item() == -1.0
    with ActivationMapGrabber(model, ["0"], clone=True) as grabber:
        kept = grabber(x)[1]["0"]
    assert kept.requires_grad and kept.item() == -1.0


def test_stop_early_skips_later_modules(counting_model):
    with ActivationMapGrabber(counting_model, ["1", "0"], stop_early=True) as grabber:
        out, maps = grabber(torch.rand(3, 2))
        assert out is None and list(maps) == ["1", "0"] and maps["1"].shape == (3, 3)
        assert counting_model.count.calls == 0
        grabber.stop_early = False
        out, maps = grabber(torch.rand(3, 2))
        assert out.shape == (3, 1) and counting_model.count.calls == 1


def test_stop_early_when_a_layer_never_runs_still_returns_none():
    model = Branchy()
    with ActivationMapGrabber(model, ["a", "b"], stop_early=True) as grabber:
        out, maps = grabber(torch.rand(1, 2))
    assert out is None and list(maps) == ["a"]


def test_stop_early_without_layers_does_not_call_the_model(counting_model):
    with ActivationMapGrabber(counting_model, [], stop_early=True) as grabber:
        assert grabber(torch.rand(1, 2)) == (None, {})
    assert counting_model.count.calls == 0


def test_repeated_calls_in_resnet_basic_block(resnet18, assert_no_hooks):
    x = torch.rand(1, 3, 32, 32)
    block = resnet18.layer1[0]
    with torch.no_grad():
        with ActivationMapGrabber(resnet18, ["layer1.0.relu", "layer1.0", "layer1.0.bn1"]) as grabber:
            _, last = grabber(x)
        with ActivationMapGrabber(resnet18, ["layer1.0.relu", "layer1.0"], all_calls=True) as grabber:
            _, every = grabber(x)
        with ActivationMapGrabber(
            resnet18, ["layer1.0.relu"], all_calls=True, stop_early=True
        ) as grabber:
            out, first_only = grabber(x)
        block_input = resnet18.maxpool(resnet18.relu(resnet18.bn1(resnet18.conv1(x))))
        first_call = torch.relu(block.bn1(block.conv1(block_input)))
    # Default: the last call, which in a BasicBlock is the block's output.
    assert torch.equal(last["layer1.0.relu"], last["layer1.0"])
    # all_calls: a list for every registered layer, in call order.
    assert len(every["layer1.0.relu"]) == 2 and len(every["layer1.0"]) == 1
    assert torch.allclose(every["layer1.0.relu"][0], first_call)
    assert torch.equal(every["layer1.0.relu"][1], every["layer1.0"][0])
    # stop_early ends the forward after the first call.
    assert out is None and len(first_only["layer1.0.relu"]) == 1
    assert torch.allclose(first_only["layer1.0.relu"][0], first_call)
    assert_no_hooks(resnet18)


def test_pipeline_usage_under_inference_mode(resnet18, assert_no_hooks):
    with torch.inference_mode():
        x = torch.rand(2, 3, 32, 32)
        with ActivationMapGrabber(resnet18, ["layer2", "layer3"], stop_early=True, detach=True) as grabber:
            out, maps = grabber(x)
        expected = resnet18.layer2(resnet18.layer1(resnet18.maxpool(resnet18.relu(resnet18.bn1(resnet18.conv1(x))))))
    assert out is None and list(maps) == ["layer2", "layer3"]
    assert maps["layer2"].shape == (2, 128, 4, 4) and maps["layer3"].shape == (2, 256, 2, 2)
    assert torch.equal(maps["layer2"], expected)
    assert_no_hooks(resnet18)


def test_extra_repr_lists_layers_and_options(counting_model):
    with ActivationMapGrabber(counting_model, ["0"], detach=True) as grabber:
        assert repr(grabber).splitlines()[:2] == [
            "ActivationMapGrabber(",
            "  registered_submodules=['0'], stop_early=False, detach=True, "
            "clone=False, all_calls=False",
        ]
        assert [name for name, _ in grabber.named_children()] == ["wrapped_model"]


def test_mask_rcnn_backbone_dump_skips_rpn_and_roi_heads(assert_no_hooks):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    model = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=64, max_size=64
    ).eval()
    calls = {"fpn": 0, "rpn": 0, "roi_heads": 0}
    spies = [
        model.get_submodule(path).register_forward_pre_hook(
            lambda module, args, key=key: calls.__setitem__(key, calls[key] + 1)
        )
        for key, path in [("fpn", "backbone.fpn"), ("rpn", "rpn"), ("roi_heads", "roi_heads")]
    ]
    try:
        ids = ["backbone.body.layer3", "backbone.body.layer4"]
        with torch.inference_mode(), ActivationMapGrabber(model, ids, stop_early=True, detach=True) as grabber:
            out, maps = grabber([torch.rand(3, 64, 64)])
    finally:
        for spy in spies:
            spy.remove()
    assert out is None
    assert maps["backbone.body.layer3"].shape == (1, 1024, 4, 4)
    assert maps["backbone.body.layer4"].shape == (1, 2048, 2, 2)
    assert calls == {"fpn": 0, "rpn": 0, "roi_heads": 0}
    assert_no_hooks(model)


def test_detach_and_clone_reach_into_a_dataclass_output():
    @dataclasses.dataclass
    class Out:
        a: torch.Tensor
        note: str = "kept"

    class Layer(torch.nn.Module):
        def forward(self, x):
            return Out(x * 1)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.d, self.r = Layer(), torch.nn.ReLU(inplace=True)

        def forward(self, x):
            return self.r(self.d(x).a)

    x = torch.randn(2, 3, requires_grad=True)
    cloned = ActivationMapGrabber(Model(), ["d"], clone=True)(x)[1]["d"]
    assert isinstance(cloned, Out) and cloned.note == "kept" and torch.equal(cloned.a, x)  # not the ReLU's
    assert not ActivationMapGrabber(Model(), ["d"], detach=True)(x)[1]["d"].a.requires_grad


def test_module_ids_that_are_no_list_say_so():
    with pytest.raises(TypeError, match="module_ids must be a list of layer ids, got None"):
        ActivationMapGrabber(torch.nn.Linear(2, 2), None)


def test_clone_keeps_a_dataclass_as_it_was_made():
    """Fields set after ``__init__`` (``init=False``) stay, and ``__post_init__`` does not run again."""
    @dataclasses.dataclass(frozen=True)
    class Out:
        a: torch.Tensor
        scale: dataclasses.InitVar[float] = 1.0
        b: torch.Tensor = dataclasses.field(init=False)

        def __post_init__(self, scale):
            object.__setattr__(self, "b", self.a * scale)

    class Layer(torch.nn.Module):
        def forward(self, x):
            return Out(x + 1, scale=2.0)

    model = torch.nn.Sequential(Layer())
    x = torch.ones(2)
    out = ActivationMapGrabber(model, ["0"], clone=True)(x)[1]["0"]
    assert torch.equal(out.a, x + 1) and torch.equal(out.b, 2 * (x + 1))


def test_a_traced_model_takes_its_hooks_at_the_top():
    model = torch.jit.trace(torch.nn.Linear(2, 3), torch.ones(1, 2))
    out, maps = ActivationMapGrabber(model, [""])(torch.ones(1, 2))
    assert torch.equal(maps[""], out)
    assert [(i.id, i.output_shape, i.calls) for i in list_layers(model, torch.ones(1, 2))][0] == ("", (1, 3), 1)


def test_clone_keeps_a_defaultdict_and_a_list_subclass():
    from collections import defaultdict

    class Tagged(list):
        tag = "class"

    class Layer(torch.nn.Module):
        def forward(self, x):
            tagged = Tagged([x, 2 * x])
            tagged.tag = "instance"
            return {"d": defaultdict(list, a=x), "t": tagged}

    model = torch.nn.Sequential(Layer())
    with ActivationMapGrabber(model, ["0"], detach=True, clone=True) as grabber:
        maps = grabber(torch.ones(2))[1]
    d, t = maps["0"]["d"], maps["0"]["t"]
    assert type(d) is defaultdict and d.default_factory is list and d["missing"] == []
    assert type(t) is Tagged and t.tag == "instance" and torch.equal(t[1], 2 * torch.ones(2))
