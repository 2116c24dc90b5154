"""Shared helpers for the extender tests: tiny models and a check that no hook is left."""

from __future__ import annotations

import pytest
import torch


class CountCalls(torch.nn.Module):
    """Passes its input through and counts how often it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def hooks_left(model: torch.nn.Module) -> dict[str, int]:
    """The number of forward (pre-)hooks on each sub-module that has any."""
    left = {}
    for name, module in model.named_modules():
        count = len(module._forward_hooks) + len(module._forward_pre_hooks)
        if count:
            left[name] = count
    return left


@pytest.fixture
def assert_no_hooks():
    """A function asserting that no sub-module of a model carries a forward (pre-)hook."""

    def check(model: torch.nn.Module) -> None:
        assert hooks_left(model) == {}

    return check


@pytest.fixture
def counting_model() -> torch.nn.Sequential:
    """Linear(2, 3) -> ReLU -> CountCalls -> Linear(3, 1); ids '0', '1', 'count', '3'."""
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("0", torch.nn.Linear(2, 3))
    model.add_module("1", torch.nn.ReLU())
    model.add_module("count", CountCalls())
    model.add_module("3", torch.nn.Linear(3, 1))
    return model


@pytest.fixture(scope="session")
def resnet18() -> torch.nn.Module:
    """An untrained torchvision ResNet-18 in eval mode (shared: tests must not change it)."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    return resnet18(weights=None).eval()


@pytest.fixture
def count_calls() -> type[CountCalls]:
    """The CountCalls module class (a pass-through that counts its calls)."""
    return CountCalls


@pytest.fixture
def scripted_part_model() -> torch.nn.Module:
    """Linear ``a`` (4 -> 4), then ``inner``: a TorchScript Linear(4, 8) -> ReLU, which takes no hooks."""
    import warnings

    class Hosting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (torch.jit.script is deprecated, and still used)
                self.inner = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()))

        def forward(self, x):
            return self.inner(self.a(x))

    return Hosting()
