"""Tiny models the tests name as ``support.models:<builder>``."""

from __future__ import annotations

import os
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


def slow_rebuild(mark: str, seconds: float = 3.0) -> TinyConvNet:
    """``tiny``, whose build takes ``seconds`` once the file ``mark`` exists (a real model's
    rebuild after Ray restarts its actor)."""
    if os.path.exists(mark):
        time.sleep(seconds)
    return tiny()


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


def failing(error: str = "KeyError", message: str = "missing config key 'depth'") -> nn.Module:
    """A builder that raises the built-in error named ``error``, as a user's builder may."""
    import builtins

    raise getattr(builtins, error)(message)


def importing() -> nn.Module:
    """A builder that imports a module that is not installed."""
    import no_such_module_for_actmap_tests  # noqa: F401

    return TinyConvNet()


class LazyNet(nn.Module):
    """lazy conv(->8) -> relu: its weights are made by its first forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.LazyConv2d(8, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


def lazy(initialise: bool = False) -> LazyNet:
    """A LazyNet; with ``initialise``, its weights made by a forward of a dummy input, as the
    pipeline asks of a builder of lazy modules."""
    model = LazyNet()
    if initialise:
        model(torch.zeros(1, 3, 16, 16))
    return model


class Sized(TinyConvNet):
    """A TinyConvNet that asserts its input is ``size`` pixels square, as a ViT built for one size does."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (self.size, self.size), f"input {tuple(x.shape[-2:])} is not {self.size}x{self.size}"
        return super().forward(x)


def sized(size: int = 32) -> Sized:
    return Sized(size)


class Seven(nn.Module):
    """Returns the int 7: a layer whose output holds no tensor at all."""

    def forward(self, x: torch.Tensor) -> int:
        return 7


class Loose(TinyConvNet):
    """A TinyConvNet with a module it never calls (``spare``) and one that gives an int (``seven``)."""

    def __init__(self):
        super().__init__()
        self.spare = nn.Conv2d(16, 16, 1)
        self.seven = Seven()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seven(x)
        return super().forward(x)


def loose() -> Loose:
    return Loose()


def half() -> TinyConvNet:
    """A TinyConvNet in half precision (float16 weights)."""
    return TinyConvNet().half()


class Recurrent(nn.Module):
    """The rows of a 16 px grey image as a sequence through a GRU that is not batch-first: its
    output ``rnn[0]`` is (16, batch, 8) and its state ``rnn[1]`` (1, batch, 8)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(16, 8)

    def forward(self, x):
        return self.rnn(x.mean(dim=1).transpose(0, 1))[0][-1]


def recurrent() -> Recurrent:
    torch.manual_seed(0)
    return Recurrent()


class Twice(nn.Module):
    """One ReLU module called twice in its forward (as a torchvision BasicBlock's is)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.relu = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.ReLU()
        self.out = nn.Flatten()

    def forward(self, x):
        return self.out(self.relu(self.conv2(self.relu(self.conv1(x)))))


def twice() -> Twice:
    torch.manual_seed(0)
    return Twice()


class FixedHead(nn.Module):
    """conv -> relu -> a linear head that takes 16 px inputs only: dumped at ``relu``, any size
    runs, as the forward stops before the head."""

    def __init__(self):
        super().__init__()
        self.conv, self.relu, self.head = nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Linear(2 * 16 * 16, 3)

    def forward(self, x):
        return self.head(self.relu(self.conv(x)).flatten(1))


def fixed_head() -> FixedHead:
    torch.manual_seed(0)
    return FixedHead()


class OneAtATime(nn.Module):
    """A model that takes one input at a time: its head flattens the whole batch into one row."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 2, 3, padding=1), nn.Linear(2 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(self.conv(x).view(1, -1))


def one_at_a_time() -> OneAtATime:
    torch.manual_seed(0)
    return OneAtATime()


def tv_swin() -> nn.Module:
    """torchvision's Swin Transformer, tiny: its stages give (batch, height, width, channels)
    maps (8x8x16 and 4x4x32 for 32 px images), and torchvision says nothing of it."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                              window_size=[4, 4], num_classes=4)


def tv_convnext() -> nn.Module:
    """torchvision's ConvNeXt, tiny: inside a block the maps are permuted to (batch, height,
    width, channels) for its LayerNorm and Linear layers, and back; its stem gives 8x8x8 maps
    for 32 px images, so a block's output has the proportions of both layouts."""
    import torchvision
    from torchvision.models.convnext import CNBlockConfig

    torch.manual_seed(0)
    return torchvision.models.ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=4)


def tv_maxvit() -> nn.Module:
    """torchvision's MaxViT, tiny, for 32 px images: inside its partitions the attention takes
    (batch, windows, tokens, channels) tensors, (16, 4, 16) per image."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16],
                                     block_layers=[1], head_dim=8, stochastic_depth_prob=0.0, num_classes=4)


class SharedActivation(nn.Module):
    """Two stages of (batch, height, width, channels) maps, 8 channels each, at a quarter and
    an eighth of the input's size, and one GELU module called in both: its output as grabbed
    (its last call's) is not its first call's."""

    def __init__(self):
        super().__init__()
        self.stem, self.down = nn.Conv2d(3, 8, 4, stride=4), nn.Conv2d(8, 8, 2, stride=2)
        self.norm1, self.norm2, self.act = nn.LayerNorm(8), nn.LayerNorm(8), nn.GELU()
        self.later, self.head = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = self.act(self.norm1(self.stem(x).permute(0, 2, 3, 1)))
        x = self.down(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.head(self.later(self.act(self.norm2(x))).mean((1, 2)))


def shared_activation() -> nn.Module:
    torch.manual_seed(0)
    return SharedActivation()


class DeviceBreaker(TinyConvNet):
    """A TinyConvNet whose forward, in a process other than ``driver``'s, once the file ``mark``
    exists, takes it away and raises a CUDA error that stays, as CUDA's do: every later forward
    of that process raises it too. The pid of the process it broke goes into ``mark``.pid."""

    broken = False

    def __init__(self, mark: str, driver: int):
        super().__init__()
        self.mark, self.driver = mark, driver

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not DeviceBreaker.broken and os.getpid() != self.driver and os.path.exists(self.mark):
            os.remove(self.mark)
            with open(self.mark + ".pid", "w") as f:
                f.write(str(os.getpid()))
            DeviceBreaker.broken = True
        if DeviceBreaker.broken:
            raise torch.AcceleratorError("CUDA error: device-side assert triggered")
        return super().forward(x)


def device_breaker(mark: str, driver: int) -> DeviceBreaker:
    return DeviceBreaker(mark, driver)


class OneSizeSwin(nn.Module):
    """``tv_swin`` that takes 32x32 inputs only: it asserts their size (as timm's models do),
    or its head flattens its last maps into a Linear (``head: True``)."""

    def __init__(self, head: bool):
        super().__init__()
        self.body = tv_swin()
        self.head = nn.Linear(4 * 4 * 32, 4) if head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            assert x.shape[-2:] == (32, 32), f"Input size {tuple(x.shape[-2:])} doesn't match model (32, 32)"
            return self.body(x)
        return self.head(self.body.norm(self.body.features(x)).flatten(1))


def one_size_swin(head: bool = False) -> OneSizeSwin:
    return OneSizeSwin(head)


class BreaksAlone(TinyConvNet):
    """A TinyConvNet that refuses a batch of several images, and whose forward of one image
    breaks the device (a CUDA error that stays)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > 1:
            raise ValueError("cannot take this batch")
        raise torch.AcceleratorError("CUDA error: device-side assert triggered")


def breaks_alone() -> BreaksAlone:
    return BreaksAlone()
