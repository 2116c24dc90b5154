"""The shard plan: a pure function of the source's length and the shard size.

>>> plan_shards(10, 4)
[Shard(id=0, start=0, stop=4), Shard(id=1, start=4, stop=8), Shard(id=2, start=8, stop=10)]
>>> plan_shards(10, 4)[2].file_name("layer4")
'layer=layer4/part-00002.parquet'
"""

from __future__ import annotations

import dataclasses

from ._layout import layer_file


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


def plan_shards(num_samples: int, shard_size: int) -> list[Shard]:
    """Cut ``num_samples`` into consecutive shards of ``shard_size`` (the last may be shorter)."""
    if num_samples < 0 or shard_size < 1:
        raise ValueError(f"need num_samples >= 0 and shard_size >= 1, got {num_samples}, {shard_size}")
    return [Shard(i, start, min(start + shard_size, num_samples))
            for i, start in enumerate(range(0, num_samples, shard_size))]
