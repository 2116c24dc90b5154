"""Generated images, deterministic by seed: the embedded default source.

Each image is a smooth random background with at most one shape on it; the shape is the
concept. ``label`` is the shape's class (0: none, 1: circle, 2: square, 3: triangle) and
``mask`` marks its pixels, so a dump can train both a classifier and a segmentation probe.
Sample ``i`` depends only on ``(seed, i)``, never on the shard that reads it.

A sample's image comes unpainted (a :class:`~pipeline._sources.Deferred`): the actor's
decoding threads paint a batch's images side by side.

>>> source = GeneratedSource(count=4, image_size=32, seed=0)
>>> s = source.read([2])[0]
>>> image = s.image.load()
>>> s.sample_id, tuple(image.shape), image.dtype, s.labels["mask"].shape
('2', (3, 32, 32), torch.uint8, (32, 32))
>>> bool((source.read([2])[0].image.load() == image).all()) and bool((s.image.load() == image).all())
True
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from ._base import Deferred, RandomAccessSource, Sample

SHAPES = ("none", "circle", "square", "triangle")


def _shape_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    # a row and a column of coordinates, broadcast: each pixel is computed as on a full grid
    yy = np.arange(size, dtype=np.float32)[:, None]
    xx = np.arange(size, dtype=np.float32)[None, :]
    radius = rng.uniform(size / 8, size / 4)
    cy, cx = rng.uniform(radius, size - radius, 2)
    if kind == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    if kind == "square":
        return (np.abs(yy - cy) <= radius * 0.85) & (np.abs(xx - cx) <= radius * 0.85)
    # an upright triangle: below the apex, between the two sloped edges
    top, bottom = cy - radius, cy + radius
    half_width = (yy - top) / (2 * radius) * radius
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)


@functools.lru_cache(maxsize=8)
def _bilinear(size: int, coarse: int = 4) -> np.ndarray:
    """The ``(size, coarse)`` matrix that upsamples ``coarse`` values linearly (pixel centres)."""
    position = np.clip((np.arange(size) + 0.5) * coarse / size - 0.5, 0, coarse - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, coarse - 1)
    weights = np.zeros((size, coarse), dtype=np.float32)
    np.add.at(weights, (np.arange(size), low), 1 - (position - low))
    np.add.at(weights, (np.arange(size), high), position - low)
    return weights


@dataclasses.dataclass(frozen=True)
class _Sketch:
    """What a generated image will show, drawn first and cheaply: its label and mask are known
    before its pixels are painted (the costly part, left to the actor's decoding threads)."""

    corners: np.ndarray  # (3, 4, 4) background colours
    label: int
    mask: np.ndarray  # (S, S) bool
    colour: np.ndarray | None  # the shape's colour
    noise: dict  # the random generator's state where the pixels' noise starts

    def paint(self) -> torch.Tensor:
        """The ``(3, S, S)`` uint8 image (the same every time)."""
        up = _bilinear(self.mask.shape[0])
        image = up @ self.corners @ up.T  # a smooth background: two small matrix products
        if self.colour is not None:
            image[:, self.mask] = self.colour[:, None]
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = self.noise
        image += rng.standard_normal(image.shape, dtype=np.float32) * 8
        return torch.from_numpy(np.clip(image, 0, 255).astype(np.uint8))


def _sketch(index: int, image_size: int, seed: int) -> _Sketch:
    rng = np.random.default_rng([seed, index])
    corners = rng.uniform(0, 255, (3, 4, 4)).astype(np.float32)
    label = int(rng.integers(0, len(SHAPES)))
    mask, colour = np.zeros((image_size, image_size), dtype=bool), None
    if label:
        mask = _shape_mask(SHAPES[label], image_size, rng)
        colour = rng.uniform(0, 255, 3).astype(np.float32)
    return _Sketch(corners, label, mask, colour, rng.bit_generator.state)


def generate(index: int, image_size: int, seed: int) -> tuple[torch.Tensor, int, np.ndarray]:
    """Image ``index`` as a ``(3, S, S)`` uint8 tensor, its label and its ``(S, S)`` uint8 mask."""
    sketch = _sketch(index, image_size, seed)
    return sketch.paint(), sketch.label, sketch.mask.astype(np.uint8)


class GeneratedSource(RandomAccessSource):
    """``count`` generated images of ``image_size`` px (see the module docstring)."""

    def __init__(self, count: int = 2048, image_size: int = 64, seed: int = 0):
        self.count, self.image_size, self.seed = count, image_size, seed

    def __len__(self) -> int:
        return self.count

    def identity(self) -> dict:
        return {"kind": "generated", "count": self.count, "image_size": self.image_size,
                "seed": self.seed, "version": 2}

    def label_fields(self) -> list[pa.Field]:
        return [pa.field("label", pa.int64())]

    def read(self, indices: Sequence[int]) -> list[Sample]:
        """The samples at ``indices``: labels and masks now, each image painted when it is
        loaded, by the thread that decodes it (so an actor's threads paint a batch together)."""
        samples = []
        for index in indices:
            sketch = _sketch(index, self.image_size, self.seed)
            labels = {"label": sketch.label, "mask": sketch.mask.astype(np.uint8)}
            samples.append(Sample(index, str(index), Deferred(sketch.paint), labels))
        return samples
