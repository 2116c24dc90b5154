"""Value statistics of a layer: min, max, mean, zeros, NaN and inf counts, kept while writing.

The actors update one :class:`ValueStats` per (shard, layer) with each batch on its way out
(no second pass over the data): on the device, right after the cast to the storage dtype, so
the numbers describe the stored values (a float16 overflow shows as inf) and the writer
threads do no extra work. On a GPU the batch's numbers stay on the device until the shard ends
(no synchronisation per batch). The shard's record keeps them under ``stats``, and ``actmap
inspect`` merges the records into one line per layer. Min, max and mean are over the finite
values; NaN and inf are counted apart.

>>> import numpy as np, torch
>>> s = ValueStats()
>>> s.add(torch.tensor([[0, 1], [2, np.inf]], dtype=torch.float16))
>>> t = ValueStats.from_dict(s.to_dict())
>>> t.add(torch.tensor([-1, 0], dtype=torch.float16))
>>> s.merge(t).to_dict()
{'count': 10, 'finite': 8, 'sum': 5.0, 'min': -1.0, 'max': 2.0, 'zeros': 3, 'nan': 0, 'inf': 2}
>>> print(s.merge(t).format())
min -1, max 2, mean 0.625, zeros 30.0%, NaN 0, inf 2
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch


@dataclasses.dataclass
class ValueStats:
    """Running statistics of the values of one layer (see the module docstring)."""

    count: int = 0
    finite: int = 0
    sum: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    zeros: int = 0
    nan: int = 0
    inf: int = 0

    _pending: list[tuple[torch.Tensor, ...]] = dataclasses.field(default_factory=list, repr=False, compare=False)

    def add(self, values: torch.Tensor) -> None:
        """Count the values of a batch (any shape, on any device; bfloat16 included).

        On the CPU the numbers are taken at once; on other devices they are kept there as
        tensors and fetched by :meth:`to_dict`, :meth:`merge` or :meth:`resolve`.
        """
        flat = values.detach().reshape(-1)
        if not flat.numel():
            return
        if flat.device.type == "cpu":
            self._add_cpu(flat)
        else:
            self.count += flat.numel()
            self._pending.append(_device_numbers(flat))

    def _add_cpu(self, t: torch.Tensor) -> None:
        low, high = (float(v) for v in torch.aminmax(t))  # NaN propagates; inf shows as a bound
        if not (math.isfinite(low) and math.isfinite(high)):
            self._add_numbers(t.numel(), *(v.item() for v in _device_numbers(t)))
            return
        total = float(t.sum() if t.dtype == torch.float32 else t.float().sum())
        if not math.isfinite(total):  # finite values whose float32 sum overflows (near 3e38)
            total = float(t.sum(dtype=torch.float64))
        self._add_numbers(t.numel(), t.numel() - _nonzero(t), 0, 0, t.numel(), total, low, high)

    def _add_numbers(self, count: int, zeros: int, nan: int, inf: int, finite: int, total: float,
                     low: float, high: float) -> None:
        self.count += count
        self.zeros += int(zeros)
        self.nan += int(nan)
        self.inf += int(inf)
        self.finite += int(finite)
        self.sum += float(total)
        if finite:
            self.min = min(self.min, float(low))
            self.max = max(self.max, float(high))

    def resolve(self) -> ValueStats:
        """Fetch the numbers still on a device (one synchronisation); returns self."""
        pending, self._pending = self._pending, []
        for numbers in pending:
            self._add_numbers(0, *(v.item() for v in numbers))  # counted in add()
        return self

    def merge(self, other: ValueStats) -> ValueStats:
        """The statistics of both sets of values together (a new object)."""
        self.resolve()
        other.resolve()
        return ValueStats(self.count + other.count, self.finite + other.finite, self.sum + other.sum,
                          min(self.min, other.min), max(self.max, other.max), self.zeros + other.zeros,
                          self.nan + other.nan, self.inf + other.inf)

    @property
    def mean(self) -> float | None:
        """The mean of the finite values (None when there are none)."""
        return self.sum / self.finite if self.finite else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, with None for the min and max of no finite values."""
        self.resolve()
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        out["min"] = None if self.finite == 0 else self.min
        out["max"] = None if self.finite == 0 else self.max
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ValueStats:
        fields = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        values = {k: v for k, v in data.items() if k in fields}
        values["min"] = math.inf if values.get("min") is None else values["min"]
        values["max"] = -math.inf if values.get("max") is None else values["max"]
        return cls(**values)

    def format(self) -> str:
        """One line: min, max, mean of the finite values, the share of zeros, NaN and inf counts."""
        if not self.count:
            return "no values"
        extent = (f"min {self.min:.4g}, max {self.max:.4g}, mean {self.mean:.4g}" if self.finite
                  else "no finite values")
        return f"{extent}, zeros {self.zeros / self.count:.1%}, NaN {self.nan:,}, inf {self.inf:,}"


def _nonzero(t: torch.Tensor) -> int:
    """The values of ``t`` that are not zero (nor -0.0), counted on their bits: a fast pass."""
    bits = {2: (np.uint16, 0x7FFF), 4: (np.uint32, 0x7FFFFFFF), 8: (np.uint64, 0x7FFFFFFFFFFFFFFF)}
    kind, mask = bits[t.element_size()]
    raw = (t.view(torch.int16) if t.element_size() == 2 else t).numpy().view(kind)
    return int(np.count_nonzero(raw & kind(mask)))


def _device_numbers(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(zeros, nan, inf, finite, sum, min, max)`` of ``t`` as 0-d tensors on its device.

    Masked, so a batch with NaN or inf gives the min, max and sum of its finite values
    (min and max are +inf and -inf when there is none: :meth:`ValueStats._add_numbers`
    ignores them then, since ``finite`` is 0).
    """
    finite_mask = torch.isfinite(t)
    nan = torch.isnan(t).sum()
    finite = finite_mask.sum()
    inf = t.numel() - finite - nan
    # Python scalars, not tensors made here: on a GPU a new tensor would be a copy that waits
    low = torch.where(finite_mask, t, math.inf).amin()
    high = torch.where(finite_mask, t, -math.inf).amax()
    total = torch.where(finite_mask, t, 0.0).sum(dtype=torch.float64)  # (float32 overflows near 3e38)
    return (t == 0).sum(), nan, inf, finite, total, low, high


def merge_records(records: Iterable[Any]) -> dict[str, ValueStats]:
    """Each layer's statistics over the shard records that carry them (``ShardRecord`` s or their
    dicts), by layer.

    >>> merge_records([{"stats": {"a": ValueStats(1, 1, 2.0, 2.0, 2.0).to_dict()}}, {}])["a"].mean
    2.0
    """
    merged: dict[str, ValueStats] = {}
    for record in records:
        stats = record.get("stats") if isinstance(record, Mapping) else record.stats
        for layer, data in (stats or {}).items():
            found = ValueStats.from_dict(data)
            merged[layer] = merged[layer].merge(found) if layer in merged else found
    return merged
