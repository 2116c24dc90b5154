"""Block shuffling: an order of rows that looks random to a model but keeps reads sequential.

The row groups of a dump are put in a random order, and then the rows are shuffled within
windows of ``window`` consecutive rows of that order. A reader that follows the order reads
each row group once, while at most the row groups of one window (plus one) are in memory; the
rows of a batch come from a few row groups spread over the whole dump.

>>> order = block_shuffle([3, 3, 3], window=3, seed=0)
>>> sorted(order.tolist()) == list(range(9))
True
>>> [sorted((order[i:i + 3] // 3).tolist()) for i in (0, 3, 6)]  # each window: one whole row group
[[2, 2, 2], [0, 0, 0], [1, 1, 1]]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def block_shuffle(group_sizes: Sequence[int], window: int, seed: int) -> np.ndarray:
    """A permutation of the rows of row groups of ``group_sizes`` rows each (see the module).

    Args:
        group_sizes: the rows of each row group, in storage order.
        window: rows shuffled together, at least 1; 1 keeps the rows of a group in order.
        seed: the order is a pure function of the sizes, the window and the seed.

    Returns:
        ``order``, an int64 array: position ``i`` of the shuffled order is stored row ``order[i]``.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1 row, got {window}")
    rng = np.random.default_rng(seed)
    starts = np.concatenate([[0], np.cumsum(group_sizes, dtype=np.int64)])
    groups = rng.permutation(len(group_sizes))
    order = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in groups]) if len(groups) else \
        np.empty(0, dtype=np.int64)
    for begin in range(0, len(order), window):
        order[begin:begin + window] = rng.permutation(order[begin:begin + window])
    return order


def groups_per_window(group_sizes: Sequence[int], window: int) -> int:
    """The most row groups the rows of one window can come from (what a reader must hold).

    >>> groups_per_window([32] * 10, 64), groups_per_window([32] * 10, 1)
    (3, 1)
    """
    smallest = max(1, min(group_sizes, default=1))
    return min(len(group_sizes), -(-(window - 1) // smallest) + 1) if group_sizes else 0
