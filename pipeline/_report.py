"""What a run did (:class:`Summary`), and the text of a dump's description that the summary and
``actmap inspect`` share.

>>> print("\\n".join(layer_lines({"conv2": LayerSpec((16, 8, 8), "float16")}, {"conv2": 30},
...                              {"conv2": 2_500_000}, indent="  ")))
  conv2: 30 rows of 16x8x8 float16, 2.5 MB
>>> print("\\n".join(bad_sample_lines([BadSample(3, "3.png", "OSError: truncated")] * 3, limit=2,
...                                   indent="  ", more="... and {rest} more")))
  3.png (index 3): OSError: truncated
  3.png (index 3): OSError: truncated
  ... and 1 more
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Iterable, Mapping, Sequence

from ._progress import duration_text
from ._records import BadSample, LayerSpec, ShardRecord


def megabytes(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


def layer_lines(layers: Mapping[str, LayerSpec], rows: Mapping[str, int], nbytes: Mapping[str, int], *,
                indent: str, label: str = "", extra: Mapping[str, str] | None = None) -> list[str]:
    """One line per layer: its rows, stored type and size, then ``extra[layer]`` if given."""
    lines = []
    for layer, spec in layers.items():
        tail = f", {extra[layer]}" if extra and layer in extra else ""
        lines.append(f"{indent}{label}{layer}: {rows.get(layer, 0):,} rows of {spec.describe()}, "
                     f"{megabytes(nbytes.get(layer, 0))}{tail}")
    return lines


def bad_sample_lines(bad: Sequence[BadSample], *, limit: int, indent: str, more: str) -> list[str]:
    """The first ``limit`` bad samples, one a line, then ``more`` (with ``{rest}`` and ``{all}``
    filled in) when there are others."""
    if limit < 0:  # (a slice would count from the end)
        raise ValueError(f"the number of bad samples to list must be at least 0, got {limit}")
    lines = [f"{indent}{b.sample_id} (index {b.index}): {b.reason}" for b in bad[:limit]]
    if len(bad) > limit:
        lines.append(indent + more.format(rest=len(bad) - limit, all=len(bad)))
    return lines


def sorted_bad(groups: Iterable[Iterable[BadSample]]) -> list[BadSample]:
    """The bad samples of several records, in source order."""
    return sorted((b for group in groups for b in group), key=lambda b: b.index)


def _braces(text: str) -> str:
    """``text`` as it reads after ``str.format``."""
    return text.replace("{", "{{").replace("}", "}}")


@dataclasses.dataclass
class Summary:
    """What a run did: rows and bytes per layer, bad samples, time.

    ``layers`` holds each layer's stored ``{"shape", "dtype"}`` (``shape`` is ``None`` when
    every row has its own), ``bad`` one dict per bad sample (its index, id and reason, as
    ``BadSample.to_dict`` gives them); ``rows`` and ``bytes`` are the whole dump's,
    ``new_samples`` and ``written`` (bytes) this run's.
    """

    output: str
    layers: dict[str, dict]
    samples: int
    rows: dict[str, int]
    bytes: dict[str, int]
    bad: list[dict]
    shards: int
    resumed: int
    actors: int
    seconds: float
    new_samples: int
    written: int = 0

    @classmethod
    def from_records(cls, records: Mapping[int, ShardRecord], *, output: str, layers: Mapping[str, LayerSpec],
                     samples: int, resumed: int, actors: int, seconds: float, new_samples: int,
                     written: int = 0) -> Summary:
        rows = {layer: sum(r.rows.get(layer, 0) for r in records.values()) for layer in layers}
        nbytes = {layer: sum(r.bytes.get(layer, 0) for r in records.values()) for layer in layers}
        bad = [b.to_dict() for b in sorted_bad(r.bad for r in records.values())]
        return cls(output, {k: v.to_dict() for k, v in layers.items()}, samples, rows, nbytes, bad,
                   len(records), resumed, actors, seconds, new_samples, written)

    def format(self) -> str:
        lines = [f"actmap: {self.samples:,} samples, {len(self.layers)} layer(s) in {self.output}"]
        layers = {layer: LayerSpec.from_dict(info) for layer, info in self.layers.items()}
        lines += layer_lines(layers, self.rows, self.bytes, indent="  ")
        if self.new_samples:
            rate = self.new_samples / max(self.seconds, 1e-9)
            lines.append(f"  {self.shards} shards ({self.resumed} already done) on {self.actors} actor(s); "
                         f"{duration_text(self.seconds)} wall, {rate:,.1f} samples/s, "
                         f"{self.written / max(self.seconds, 1e-9) / 1e6:,.1f} MB/s written")
        else:
            lines.append(f"  {self.shards} shards, all already done: nothing to do "
                         f"({duration_text(self.seconds)} wall)")
        lines.append(f"  bad samples: {len(self.bad)}")
        lines += bad_sample_lines([BadSample.from_dict(b) for b in self.bad], limit=10, indent="    ",
                                  more=f"... `actmap inspect {_braces(shlex.quote(self.output))}` lists all {{all}}")
        first = next(iter(self.layers))
        what = "numpy array" if layers[first].shape is not None else "list of arrays, one shape per row"
        lines.append(f"Read it back: pipeline.read_layer({self.output!r}, {first!r}) -> {what}; "
                     f"`actmap inspect {shlex.quote(self.output)}` describes the dump")
        return "\n".join(lines)
