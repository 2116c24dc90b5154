"""From a stored activation to a 2-D map to draw over its image (pure numpy, no plotting).

- ``(channels, height, width)``: the mean over the channels, or the chosen channels;
- ``(height, width)`` (``dump.reduce: channel_mean``): the map itself;
- ``(tokens, dim)``: the patch tokens laid out on their grid (leading class or register tokens
  left out), then the mean over ``dim`` or the chosen dims.

A vector per sample (pooled, or a ``cls``/``mean`` token reduction) has no map to draw.

>>> import numpy as np
>>> [(m.title, m.values.shape) for m in activation_maps(np.ones((8, 4, 4)), None, aspect=1.0)]
[('mean of 8 channels', (4, 4))]
>>> tokens = np.arange(17 * 3, dtype=np.float32).reshape(17, 3)
>>> (m,) = activation_maps(tokens, [2], aspect=1.0)
>>> m.title, m.values.shape, float(m.values[0, 0])
('dim 2, 4x4 patches (+1 leading token)', (4, 4), 5.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from .config import DumpSpec

#: At most this many leading tokens (class, distillation, register tokens) are looked for.
MAX_PREFIX_TOKENS = 16


class NoMapError(ValueError):
    """An activation that cannot be drawn as a map (a vector per sample, a bad channel);
    ``option``: the command-line option at fault."""

    def __init__(self, message: str, option: str = "--layer"):
        super().__init__(message)
        self.option = option


@dataclasses.dataclass(frozen=True)
class Map:
    """One 2-D map and what it shows."""

    values: np.ndarray
    title: str


def token_grid(tokens: int, aspect: float, prefix: int | None = None) -> tuple[int, int, int]:
    """``(prefix, rows, cols)``: the fewest leading tokens whose removal leaves a patch grid of
    the image's aspect ratio (``height / width``), within 10%; or exactly ``prefix`` of them.

    Small grids can be ambiguous (9 tokens: 3x3, or 2x2 after a class and 4 register tokens);
    give ``prefix`` then (``actmap show --prefix-tokens``).

    >>> token_grid(197, 1.0), token_grid(261, 1.0), token_grid(16, 1.0), token_grid(51, 0.5)
    ((1, 14, 14), (5, 16, 16), (0, 4, 4), (1, 5, 10))
    >>> token_grid(9, 1.0), token_grid(9, 1.0, prefix=5)
    ((0, 3, 3), (5, 2, 2))

    Raises:
        NoMapError: When no such grid exists.
    """
    candidates = range(min(MAX_PREFIX_TOKENS, tokens - 1) + 1) if prefix is None else [prefix]
    for prefix in candidates:
        patches = tokens - prefix
        rows = max(1, round(float(np.sqrt(patches * aspect))))
        for r in (rows - 1, rows, rows + 1):
            if r >= 1 and patches % r == 0:
                cols = patches // r
                if abs((r / cols) / aspect - 1) <= 0.1 and (patches > 1 or tokens == 1):
                    return prefix, r, cols
    leading = f"up to {MAX_PREFIX_TOKENS}" if len(candidates) > 1 else str(candidates[0])
    raise NoMapError(f"{tokens} tokens do not lay out as a patch grid of the image's aspect ratio "
                     f"{aspect:.2f} after {leading} leading tokens")


def _pick(values: np.ndarray, channels: Sequence[int] | None, what: str) -> list[Map]:
    """``values`` is ``(channels, h, w)``: their mean, or each chosen channel."""
    count = values.shape[0]
    if channels is None:
        return [Map(values.mean(axis=0), f"mean of {count} {what}s")]
    maps = []
    for c in channels:
        if not -count <= c < count:
            raise NoMapError(f"{what} {c} is out of range: the layer has {count} {what}s (0 to {count - 1})",
                             "--channels")
        maps.append(Map(values[c], f"{what} {c}"))
    return maps


def activation_maps(activation: np.ndarray, channels: Sequence[int] | None, aspect: float,
                    reduce: str = "none", prefix: int | None = None) -> list[Map]:
    """The maps to draw for one sample's activation (see the module docstring).

    Args:
        activation: the stored tensor of one sample.
        channels: channel (or token dim) numbers to draw one by one; None for their mean.
        aspect: the image's ``height / width``, to lay out tokens.
        reduce: the dump's ``dump.reduce``: with ``channel_mean`` a 2-D activation is the map
            itself, otherwise it is ``(tokens, dim)``.
        prefix: the leading (class, register) tokens of a token output; None finds them.

    Raises:
        NoMapError: When the activation has no spatial layout, or a channel is out of range.
    """
    activation = np.asarray(activation, dtype=np.float32)
    if activation.ndim == 3 and activation.shape[1] * activation.shape[2] > 1:
        return _pick(activation, channels, "channel")
    if activation.ndim == 2 and reduce == "channel_mean":
        if channels is not None:
            raise NoMapError(f"the dump keeps the mean over the channels only ({DumpSpec.key('reduce')}: "
                             "channel_mean); leave out --channels", "--channels")
        return [Map(activation, "mean over the channels")]
    if activation.ndim == 2:
        prefix, rows, cols = token_grid(activation.shape[0], aspect, prefix)
        grid = activation[prefix:].reshape(rows, cols, -1).transpose(2, 0, 1)
        note = f", {rows}x{cols} patches" + (f" (+{prefix} leading token{'s' * (prefix > 1)})" if prefix else "")
        return [Map(m.values, m.title + note) for m in _pick(grid, channels, "dim")]
    raise NoMapError(f"an activation of shape {tuple(activation.shape)} has no spatial layout to draw "
                     "(a vector per sample: pooled, or reduced to one token); `actmap show --stats` "
                     "shows its values")


def spread(indices: Sequence[int], count: int) -> list[int]:
    """``count`` of ``indices`` spread evenly from the first to the last.

    >>> spread(range(100), 4), spread([3, 5], 4)
    ([0, 33, 66, 99], [3, 5])
    """
    indices = list(indices)
    if count >= len(indices):
        return indices
    if count == 1:
        return indices[:1]
    return [indices[round(i * (len(indices) - 1) / (count - 1))] for i in range(count)]
