"""Tiny models the tests name as ``support.models:<builder>``."""

from __future__ import annotations

import time
import weakref

import torch
from torch import nn


class TinyConvNet(nn.Module):
    """conv(3->8) -> relu -> conv(8->16, stride 2) -> relu -> pool -> fc(16->num_classes)."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def tiny(num_classes: int = 4) -> TinyConvNet:
    return TinyConvNet(num_classes)


class Picky(TinyConvNet):
    """A TinyConvNet whose forward refuses a batch that holds an all-white image (with
    ``normalize: none``): a model that cannot take one sample of a batch. ``refused`` holds weak
    references to the inputs it refused."""

    refused: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.flatten(1).amin(1) >= 1.0).any()):
            Picky.refused.append(weakref.ref(x))
            raise ValueError("cannot take an all-white image")
        return super().forward(x)


def picky() -> Picky:
    return Picky()


class Greedy(TinyConvNet):
    """A TinyConvNet whose forward runs out of device memory on a batch of more than two
    images; ``calls`` counts its forwards."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        if len(x) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(x)


def greedy() -> Greedy:
    return Greedy()


class Slow(TinyConvNet):
    """A TinyConvNet whose forward takes ``delay`` seconds more: a run long enough to act on."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return super().forward(x)


def slow(delay: float = 0.1) -> Slow:
    return Slow(delay)


def grey() -> TinyConvNet:
    """A TinyConvNet that takes one-channel images."""
    model = TinyConvNet()
    model.conv1 = nn.Conv2d(1, 8, 3, padding=1)
    return model


def overflowing(num_classes: int = 4) -> TinyConvNet:
    """A TinyConvNet whose first convolution gives values beyond float16's range (inf when stored)."""
    model = TinyConvNet(num_classes)
    with torch.no_grad():
        model.conv1.weight.mul_(1e6)
    return model


class Pair(nn.Module):
    """Returns its input twice: a layer whose output is a tuple, not one tensor."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


class PairNet(nn.Module):
    """conv(3->4) -> pair -> sum: ``pair`` gives a tuple."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pair = Pair()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.pair(self.conv(x))
        return a + b


def pair_net() -> PairNet:
    return PairNet()
