"""Tests of extender._hooks: hook lifetime, per-forward state, the caller's model untouched."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from extender import (
    ActivationMapGrabber,
    ExtendedModelStump,
    HooksHandle,
    ModelExtender,
    ModelStump,
    UnknownLayerError,
)
from extender._hooks import _active_states


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        ActivationMapGrabber(lambda x: x, [])


def test_bare_base_class_leaves_recording_to_subclasses(counting_model):
    handle = HooksHandle(counting_model)
    assert list(handle.children()) == [counting_model]
    assert handle.registered_submodules == []
    with pytest.raises(NotImplementedError):
        handle(torch.rand(1, 2))


def test_registered_submodules_is_a_copy(counting_model):
    grabber = ActivationMapGrabber(counting_model, ["0"])
    grabber.registered_submodules.append("1")
    assert grabber.registered_submodules == ["0"]
    grabber.remove()


def test_remove_is_idempotent_and_leaves_a_working_pass_through(counting_model, assert_no_hooks):
    grabber = ActivationMapGrabber(counting_model, ["0", "count", ""])
    assert grabber.registered_submodules == ["0", "count", ""]
    grabber.remove()
    assert_no_hooks(counting_model)
    grabber.remove()
    assert grabber.registered_submodules == []
    out, maps = grabber(torch.rand(3, 2))
    assert out.shape == (3, 1) and maps == {}
    grabber.register_submodule("1")  # usable again
    assert list(grabber(torch.rand(3, 2))[1]) == ["1"]
    grabber.remove()
    assert_no_hooks(counting_model)


def test_context_manager_removes_hooks_also_on_exception(counting_model, assert_no_hooks):
    with ActivationMapGrabber(counting_model, ["0", "1"]) as grabber:
        assert set(grabber.registered_submodules) == {"0", "1"}
    assert_no_hooks(counting_model)
    with pytest.raises(RuntimeError):
        with ActivationMapGrabber(counting_model, ["0", "1"]) as grabber:
            grabber(torch.rand(3, 7))
    assert_no_hooks(counting_model)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: ActivationMapGrabber(m, ["0", "1", "nope"]),
        lambda m: ActivationMapGrabber(m, ["0", None]),
        lambda m: ModelStump(m, "nope"),
        lambda m: ExtendedModelStump(m, "nope", modification=torch.sum),
        lambda m: ModelExtender(m, {"0": {"a": torch.nn.Identity()}, "nope": {"b": torch.nn.Identity()}}),
        lambda m: ModelExtender(m, {"0": {"a": torch.nn.Identity()}, "1": {"b": "not a module"}}),
    ],
)
def test_failed_construction_leaves_no_hook(counting_model, assert_no_hooks, make):
    with pytest.raises((UnknownLayerError, ValueError, TypeError)):
        make(counting_model)
    assert_no_hooks(counting_model)


def test_garbage_collected_wrapper_takes_its_hooks_along(counting_model, assert_no_hooks):
    grabber = ActivationMapGrabber(counting_model, ["0", "1"])
    stump = ModelStump(counting_model, "count")
    assert counting_model[0]._forward_hooks
    del grabber, stump
    gc.collect()
    assert_no_hooks(counting_model)


def test_hooks_do_nothing_outside_the_wrapper_forward(counting_model):
    with ActivationMapGrabber(counting_model, ["0"], stop_early=True) as grabber:
        # Calling the model itself neither records nor stops it.
        assert counting_model(torch.rand(2, 2)).shape == (2, 1)
        assert counting_model.count.calls == 1
        assert grabber(torch.rand(2, 2))[1].keys() == {"0"}


def test_each_forward_gets_a_fresh_dict(counting_model):
    with ActivationMapGrabber(counting_model, ["0"]) as grabber:
        first = grabber(torch.rand(2, 2))[1]
        second = grabber(torch.rand(2, 2))[1]
    assert first is not second
    assert not torch.equal(first["0"], second["0"])


def test_exception_in_model_leaves_no_stale_state(counting_model):
    with ActivationMapGrabber(counting_model, ["0", "3"]) as grabber:
        with pytest.raises(RuntimeError):
            grabber(torch.rand(2, 5))
        assert _active_states() == []

        # '0' ran before the failure; its output must not surface in a later forward.
        class Boom(torch.nn.Module):
            def forward(self, x):
                raise ValueError("boom")

        real_count = counting_model.count
        counting_model.count = Boom()
        with pytest.raises(ValueError, match="boom"):
            grabber(torch.rand(2, 2))
        assert _active_states() == []
        counting_model.count = real_count
        x = torch.rand(2, 2)
        out, maps = grabber(x)
        assert torch.equal(maps["0"], counting_model[0](x))


def test_threads_see_only_their_own_outputs(counting_model):
    grabber = ActivationMapGrabber(counting_model, ["0"])
    results, errors = {}, []
    barrier = threading.Barrier(4)

    def work(k: int) -> None:
        try:
            barrier.wait()
            for _ in range(20):
                x = torch.full((1, 2), float(k))
                out, maps = grabber(x)
                with torch.no_grad():
                    expected = counting_model[0](x)
                assert torch.equal(maps["0"].detach(), expected)
            results[k] = True
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    grabber.remove()
    assert errors == [] and len(results) == 4


def test_nested_wrappers_stop_at_the_right_level(counting_model, assert_no_hooks):
    inner = ActivationMapGrabber(counting_model, ["3"], stop_early=True)
    outer = ActivationMapGrabber(inner, ["wrapped_model.0"], stop_early=True)
    out, maps = outer(torch.rand(2, 2))
    assert out is None and list(maps) == ["wrapped_model.0"]
    assert counting_model.count.calls == 0
    out, maps = inner(torch.rand(2, 2))
    assert out is None and list(maps) == ["3"] and counting_model.count.calls == 1
    outer.remove(), inner.remove()
    assert_no_hooks(counting_model)


def test_wrapping_does_not_change_the_callers_model():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Dropout(), torch.nn.Linear(3, 1))
    model.eval()
    model[2].weight.requires_grad_(False)
    dtype = model[0].weight.dtype
    wrappers = [
        ActivationMapGrabber(model, ["0"], stop_early=True, detach=True),
        ModelExtender(model, {"1": {"probe": torch.nn.Linear(3, 1)}}),
        ModelStump(model, "1"),
        ExtendedModelStump(model, "1", torch.nn.Linear(3, 2)),
    ]
    for wrapper in wrappers:
        wrapper(torch.rand(4, 2))
        assert not any(m.training for m in model.modules())
        assert [p.requires_grad for p in model.parameters()] == [True, True, False, True]
        assert all(p.device.type == "cpu" and p.dtype == dtype for p in model.parameters())
        wrapper.remove()


def test_eval_train_and_to_on_the_wrapper_reach_the_model(counting_model):
    """Documented: the wrapper is the model's parent module."""
    with ActivationMapGrabber(counting_model, ["0"]) as grabber:
        grabber.eval()
        assert not counting_model.training
        grabber.train()
        assert counting_model[0].training
        grabber.to(torch.float64)
        assert counting_model[0].weight.dtype == torch.float64
        assert grabber(torch.rand(1, 2, dtype=torch.float64))[1]["0"].dtype == torch.float64


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_copies_get_their_own_model_and_hooks(counting_model, assert_no_hooks, copier):
    import copy
    import pickle

    grabber = ActivationMapGrabber(counting_model, ["1"], stop_early=True, detach=True)
    twin = copy.deepcopy(grabber) if copier == "deepcopy" else pickle.loads(pickle.dumps(grabber))
    assert twin.wrapped_model is not counting_model
    assert twin.registered_submodules == ["1"] and twin.stop_early and twin.detach
    x = torch.rand(2, 2)
    out, maps = twin(x)
    assert out is None and torch.equal(maps["1"], grabber(x)[1]["1"])
    twin.remove()
    assert_no_hooks(twin.wrapped_model)
    assert grabber(x)[1].keys() == {"1"}  # the original is unaffected
    grabber.remove()
    assert_no_hooks(counting_model)


def test_copying_a_hooked_model_alone_leaves_the_copy_clean(counting_model, assert_no_hooks):
    import copy

    with ActivationMapGrabber(counting_model, ["0", "1"]):
        clone = copy.deepcopy(counting_model)
        gc.collect()
        assert_no_hooks(clone)
        assert counting_model[0]._forward_hooks


def test_a_wrapper_that_stops_the_forward_ends_it_after_the_hooks_its_layer_got_first():
    """As documented: hooks put on the stopping layer before the wrapper's run; later ones not."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    seen = []
    first = model[1].register_forward_hook(lambda module, args, output: seen.append("first"))
    stump = ModelStump(model, "1")
    later = model[1].register_forward_hook(lambda module, args, output: seen.append("later"))
    x = torch.ones(4, 2)
    assert torch.equal(stump(x), torch.relu(model[0](x))) and seen == ["first"]
    first.remove(), later.remove()


def test_a_shallow_copy_is_refused_and_the_original_keeps_its_hooks():
    import copy

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    grabber = ActivationMapGrabber(model, ["0"])
    with pytest.raises(TypeError, match="cannot be copied shallowly: the copy would share the model's hooks; use "
                                        "copy.deepcopy"):
        copy.copy(grabber)
    gc.collect()
    assert list(grabber(torch.ones(1, 2))[1]) == ["0"] and grabber.registered_submodules == ["0"]
    assert list(copy.deepcopy(grabber)(torch.ones(1, 2))[1]) == ["0"]


def test_a_torchscript_part_is_named_as_no_place_for_a_hook(scripted_part_model, assert_no_hooks):
    model = scripted_part_model
    with pytest.raises(TypeError, match=r"Layer 'inner.0' is a TorchScript module \(RecursiveScriptModule\), which "
                                        "takes no hooks; choose a layer outside the scripted part"):
        ActivationMapGrabber(model, ["a", "inner.0"])
    assert_no_hooks(model.a)
    stump = ModelStump(model, "a")
    with pytest.raises(TypeError, match="TorchScript"):
        stump.stump_head = "inner"
    assert stump.stump_head == "a" and torch.equal(stump(torch.ones(2, 4)), model.a(torch.ones(2, 4)))


def test_extensions_on_a_layer_that_activation_checkpointing_computes_again_backpropagate():
    """Non-reentrant checkpointing (Hugging Face's gradient checkpointing) computes the
    checkpointed part again in the backward and checks that it saves the same tensors: the
    extensions on a layer in it keep theirs out of its count, and the gradients equal those
    without checkpointing."""
    import torch.utils.checkpoint as checkpoint

    class Checkpointed(torch.nn.Module):
        def __init__(self, use_checkpoint):
            super().__init__()
            self.use_checkpoint = use_checkpoint
            self.block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
            self.out = torch.nn.Linear(4, 1)

        def forward(self, x):
            if self.use_checkpoint:
                return self.out(checkpoint.checkpoint(self.block, x, use_reentrant=False))
            return self.out(self.block(x))

    x, grads = torch.randn(3, 4), []
    for use_checkpoint in (True, False):
        torch.manual_seed(0)
        extended = ModelExtender(Checkpointed(use_checkpoint), {"block.1": {"h": torch.nn.Linear(4, 2)}})
        out, ext = extended(x)
        (out.sum() + ext["h"].square().sum()).backward()
        grads.append([p.grad for p in extended.parameters()])
    assert all(torch.allclose(a, b) for a, b in zip(*grads))
    # the bare model, called with the extender still on it, backpropagates as it would without
    bare = []
    for extend in (True, False):
        torch.manual_seed(0)
        model = Checkpointed(True)
        extended = ModelExtender(model, {"block.1": {"h": torch.nn.Linear(4, 2)}}) if extend else None
        model(x).sum().backward()
        bare.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*bare)) and extended is None


def test_a_compiled_model_is_refused_and_a_compiled_wrapper_works(counting_model, assert_no_hooks):
    """A compiled model's cached code ignores hooks placed after its first call (the wrapper
    would find nothing); compiling the wrapper instead records as usual."""
    compiled = torch.compile(counting_model, backend="eager")
    compiled(torch.rand(1, 2))
    with pytest.raises(TypeError) as info:
        ActivationMapGrabber(compiled, ["_orig_mod.0"])
    assert str(info.value) == (
        "model is a torch.compile'd Sequential, whose compiled code ignores hooks placed after its first "
        "call; wrap the model itself (model._orig_mod) and compile the wrapper if you like: "
        "torch.compile(ActivationMapGrabber(model._orig_mod, ...))"
    )
    holder = torch.nn.Sequential(compiled, torch.nn.Identity())
    with pytest.raises(TypeError, match=r"Layer '0._orig_mod.0' lies inside '0', a torch.compile'd module"):
        ModelStump(holder, "0._orig_mod.0")
    assert_no_hooks(holder)
    with ModelStump(holder, "0") as stump:  # the compiled part itself takes a hook
        assert stump(torch.rand(1, 2)).shape == (1, 1)
    x = torch.rand(4, 2)
    grabber = ActivationMapGrabber(counting_model, ["1"])
    for _ in range(2):
        out, maps = torch.compile(grabber, backend="eager")(x)
        assert torch.equal(maps["1"], counting_model[1](counting_model[0](x))) and out.shape == (4, 1)


class SwitchesGradOff(torch.nn.Module):
    """Turns gradients off (and CPU autocast on) for its stem, and back only after it."""

    def __init__(self):
        super().__init__()
        self.stem, self.head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)

    def forward(self, x):
        torch.set_grad_enabled(False)
        torch.set_autocast_enabled("cpu", True)
        features = self.stem(x)
        torch.set_autocast_enabled("cpu", False)
        torch.set_grad_enabled(True)
        return self.head(features)


@pytest.mark.parametrize("make", [lambda m: ModelStump(m, "stem"),
                                  lambda m: ActivationMapGrabber(m, ["stem"], stop_early=True)])
def test_a_forward_that_stops_early_puts_grad_mode_and_autocast_back(make):
    wrapper = make(SwitchesGradOff())
    try:
        wrapper(torch.rand(1, 2))
        assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
        with torch.no_grad():
            wrapper(torch.rand(1, 2))
            assert not torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)
        torch.set_autocast_enabled("cpu", False)


def test_a_model_compiled_in_place_is_refused(counting_model, assert_no_hooks):
    counting_model.compile(backend="eager")
    counting_model(torch.rand(1, 2))
    with pytest.raises(TypeError, match=r"model is a Sequential compiled in place \(model.compile\(\)\), whose "
                                        r"compiled code ignores hooks placed after its first call"):
        ActivationMapGrabber(counting_model, ["0"])


def test_a_mistyped_layer_under_a_torchscript_part_is_an_unknown_layer():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.jit.script(torch.nn.Sequential(torch.nn.ReLU())))
    with pytest.raises(UnknownLayerError, match="Unknown layer id '1.3'"):
        ActivationMapGrabber(model, ["1.3"])
