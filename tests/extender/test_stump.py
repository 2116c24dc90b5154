"""Tests of extender._stump: ModelStump and ExtendedModelStump."""

from __future__ import annotations

import pytest
import torch

from extender import ExtendedModelStump, ModelStump, UnknownLayerError


def test_stump_returns_the_layer_output_and_skips_the_rest(counting_model):
    x = torch.rand(5, 2)
    with ModelStump(counting_model, "1") as stump:
        out = stump(x)
    assert out.shape == (5, 3)
    assert torch.equal(out, torch.relu(counting_model[0](x)))
    assert out.requires_grad
    assert counting_model.count.calls == 0


def test_stump_on_the_whole_model(counting_model):
    with ModelStump(counting_model, "") as stump:
        out = stump(torch.rand(2, 2))
    assert out.shape == (2, 1) and counting_model.count.calls == 1


def test_stump_head_property_and_setter(counting_model, assert_no_hooks):
    stump = ModelStump(counting_model, "0")
    assert stump.stump_head == "0" and stump.registered_submodules == ["0"]
    assert repr(stump).splitlines()[1] == "  stump_head='0'"
    stump.stump_head = "count"
    assert stump.stump_head == "count" and not counting_model[0]._forward_hooks
    assert stump(torch.rand(1, 2)).shape == (1, 3)
    with pytest.raises(UnknownLayerError):
        stump.stump_head = "cnt"
    with pytest.raises(ValueError):
        stump.stump_head = None
    assert stump.stump_head == "count"
    stump.remove()
    assert stump.stump_head is None
    with pytest.raises(RuntimeError, match="has no stump head"):
        stump(torch.rand(1, 2))
    assert_no_hooks(counting_model)


def test_stump_head_that_does_not_run():
    class Skip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Identity(), torch.nn.Identity()

        def forward(self, x):
            return self.used(x)

    with ModelStump(Skip(), "unused") as stump:
        with pytest.raises(RuntimeError) as info:
            stump(torch.rand(1))
    assert str(info.value) == (
        "The stump head 'unused' did not run during the forward of Skip, so there is no output to return "
        "(or it ran in another thread: the hooks record only in the thread that called the wrapper)"
    )


def test_stump_on_reused_module_gives_first_call(resnet18):
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode(), ModelStump(resnet18, "layer1.0.relu") as stump:
        out = stump(x)
        block_input = resnet18.maxpool(resnet18.relu(resnet18.bn1(resnet18.conv1(x))))
        block = resnet18.layer1[0]
        first_call = torch.relu(block.bn1(block.conv1(block_input)))
    assert torch.allclose(out, first_call)


def test_stump_under_inference_mode(resnet18, assert_no_hooks):
    with torch.inference_mode(), ModelStump(resnet18, "layer2") as stump:
        out = stump(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, 128, 4, 4) and out.is_inference()
    assert_no_hooks(resnet18)


def test_bad_stump_heads(counting_model, assert_no_hooks):
    with pytest.raises(UnknownLayerError, match="Unknown layer id 'cnt' in Sequential; did you mean 'count'"):
        ModelStump(counting_model, "cnt")
    with pytest.raises(ValueError, match="got None"):
        ModelStump(counting_model, None)
    with pytest.raises(TypeError, match="got int: 1"):
        ModelStump(counting_model, 1)
    assert_no_hooks(counting_model)


def test_extended_stump_applies_the_modification(counting_model):
    x = torch.rand(4, 2)
    with ExtendedModelStump(counting_model, "1", modification=lambda t: t.sum(dim=1)) as stump:
        out = stump(x)
    assert torch.allclose(out, torch.relu(counting_model[0](x)).sum(dim=1))
    assert counting_model.count.calls == 0


def test_extended_stump_with_a_module_is_trainable(counting_model):
    head = torch.nn.Linear(3, 2)
    with ExtendedModelStump(counting_model, "1", head) as stump:
        assert [name for name, _ in stump.named_children()] == ["wrapped_model", "modification"]
        stump(torch.rand(4, 2)).sum().backward()
    assert head.weight.grad is not None and counting_model[0].weight.grad is not None
    assert counting_model[3].weight.grad is None


@pytest.mark.parametrize("bad", ["mean", None, 3])
def test_non_callable_modification_fails_before_any_hook(counting_model, assert_no_hooks, bad):
    with pytest.raises(ValueError) as info:
        ExtendedModelStump(counting_model, "1", bad)
    assert str(info.value) == (
        "modification must be callable (a function or a torch.nn.Module), "
        f"got {type(bad).__name__}: {bad!r}"
    )
    assert_no_hooks(counting_model)


def test_a_stump_inside_another_stump_of_the_same_layer_says_what_happened(counting_model):
    inner = ModelStump(counting_model, "1")
    outer = ModelStump(inner, "wrapped_model.1")
    with pytest.raises(RuntimeError) as info:
        outer(torch.rand(1, 2))
    assert str(info.value) == (
        "The stump head 'wrapped_model.1' ran, but a ModelStump hooked it before this ModelStump did and "
        "ended the forward there, so there is no output to return; wrap that wrapper's wrapped_model instead"
    )
    assert ModelStump(inner.wrapped_model, "1")(torch.rand(1, 2)).shape == (1, 3)


def test_a_stump_head_run_in_another_thread_is_named_as_a_possible_cause():
    from concurrent.futures import ThreadPoolExecutor

    class Threaded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

        def forward(self, x):
            with ThreadPoolExecutor(1) as pool:
                return pool.submit(self.b, self.a(x)).result()

    with ModelStump(Threaded(), "b") as stump, pytest.raises(RuntimeError, match="or it ran in another thread"):
        stump(torch.rand(1, 2))
