"""The text of a dump's description, shared by the run's summary and ``actmap inspect``.

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

from collections.abc import Iterable, Mapping, Sequence

from ._records import BadSample, LayerSpec


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
    lines = [f"{indent}{b.sample_id} (index {b.index}): {b.reason}" for b in bad[:limit]]
    if len(bad) > limit:
        lines.append(indent + more.format(rest=len(bad) - limit, all=len(bad)))
    return lines


def sorted_bad(groups: Iterable[Iterable[BadSample]]) -> list[BadSample]:
    """The bad samples of several records, in source order."""
    return sorted((b for group in groups for b in group), key=lambda b: b.index)
