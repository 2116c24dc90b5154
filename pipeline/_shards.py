"""The shard plan: a pure function of the source's length and the shard size.

A plan holds two numbers, not a list: a shard is computed when it is asked for, so a plan of
any size costs the same memory.

>>> plan = plan_shards(10, 4)
>>> list(plan)
[Shard(id=0, start=0, stop=4), Shard(id=1, start=4, stop=8), Shard(id=2, start=8, stop=10)]
>>> len(plan), plan[-1], plan[2].file_name("layer4")
(3, Shard(id=2, start=8, stop=10), 'layer=layer4/part-00002.parquet')
>>> len(plan_shards(10**12, 1000)), plan_shards(10**12, 1000)[123_456]
(1000000000, Shard(id=123456, start=123456000, stop=123457000))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

from ._layout import layer_file

#: The most shards a run may plan: each is a file per layer, a record and a round trip to the
#: driver, and the driver keeps each finished shard's record.
MAX_SHARDS = 1_000_000


@dataclasses.dataclass(frozen=True, order=True)
class Shard:
    """Samples ``[start, stop)`` of the source, numbered ``id`` in the plan."""

    id: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def file_name(self, layer: str) -> str:
        """Where this shard's rows of ``layer`` live, relative to the output root.

        A pure function of (layer, shard): a retried shard overwrites its own file.
        """
        return layer_file(layer, self.id)


@dataclasses.dataclass(frozen=True)
class ShardPlan(Sequence[Shard]):
    """``samples`` cut into consecutive shards of ``shard_size`` (the last may be shorter)."""

    samples: int
    shard_size: int

    def __post_init__(self):
        if self.samples < 0 or self.shard_size < 1:
            raise ValueError(f"need num_samples >= 0 and shard_size >= 1, got {self.samples}, {self.shard_size}")

    def __len__(self) -> int:
        return -(-self.samples // self.shard_size)

    def __getitem__(self, i: int) -> Shard:  # type: ignore[override]
        if isinstance(i, slice):
            raise TypeError("a shard plan is indexed by shard id, not sliced")
        count = len(self)
        if i < 0:
            i += count
        if not 0 <= i < count:
            raise IndexError(f"shard {i} is not in a plan of {count} shards")
        start = i * self.shard_size
        return Shard(i, start, min(start + self.shard_size, self.samples))

    def __iter__(self) -> Iterator[Shard]:
        return (self[i] for i in range(len(self)))


def plan_shards(num_samples: int, shard_size: int) -> ShardPlan:
    """Cut ``num_samples`` into consecutive shards of ``shard_size`` (the last may be shorter)."""
    return ShardPlan(num_samples, shard_size)
