"""The records that cross processes and land on disk: a layer's stored type, a bad sample, what
one finished shard wrote, and the manifest of a dump.

Each converts to a JSON-able dict and back in one place. ``from_dict`` ignores keys it does not
know and fills fields that are missing with their defaults, so a field added later (with a
default) still loads the records of older versions, and an older version reads newer records.

>>> spec = LayerSpec.from_dict({"shape": [16, 8, 8], "dtype": "float16"})
>>> spec, spec.describe(), LayerSpec(None, "bfloat16").describe()
(LayerSpec(shape=(16, 8, 8), dtype='float16', layout=None), '16x8x8 float16', 'variable bfloat16')
>>> record = ShardRecord(shard=2, start=8, stop=12, rows={"conv2": 3},
...                      bad=(BadSample(9, "9", "ValueError: corrupt"),))
>>> ShardRecord.from_dict(record.to_dict()) == record
True
>>> record.to_dict()["bad"]
[{'index': 9, 'sample_id': '9', 'reason': 'ValueError: corrupt'}]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ._model_inputs import ModelInput
from ._shards import ShardPlan
from .errors import RecordError


def _known_fields(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that are fields of ``cls`` (the others are left for newer readers);
    a required field that is missing is a :class:`RecordError`."""
    if not isinstance(data, Mapping):
        raise RecordError(f"a {cls.__name__} is a mapping, got {type(data).__name__}")
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecordError(f"a {cls.__name__} needs {', '.join(missing)}; got keys {sorted(data)}")
    return {f.name: data[f.name] for f in fields if f.name in data}


def _build(cls: type, data: Mapping[str, Any]) -> Any:
    """``cls`` from the known fields of ``data``; values of the wrong kind are a :class:`RecordError`."""
    known = _known_fields(cls, data)
    try:
        return cls(**known)
    except RecordError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise RecordError(f"a {cls.__name__} with a value of the wrong kind ({type(exc).__name__}: {exc})") from None


#: How a layer's 4-d maps are laid out (``LayerSpec.layout``).
CHANNELS_FIRST, CHANNELS_LAST = "channels_first", "channels_last"


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """How a layer's activations are stored: the per-sample ``shape`` (``None`` when each row
    has its own) and the ``dtype``; for a layer that gives 4-d maps, their ``layout`` as the
    model gave them, ``channels_first`` or ``channels_last`` (``None``: not a 4-d map, or a dump
    begun before layouts were recorded). ``reduce: none`` stores channels-last maps as they
    are, ``(height, width, channels)``; the other reductions give ``(channels, ...)``.

    >>> LayerSpec((96, 1, 1), "float16", "channels_last").describe()
    '96x1x1 float16 (of channels-last maps)'
    """

    shape: tuple[int, ...] | None
    dtype: str
    layout: str | None = None

    def __post_init__(self):
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.layout not in (None, CHANNELS_FIRST, CHANNELS_LAST):
            raise ValueError(f"layout {self.layout!r}: valid are {CHANNELS_FIRST!r}, {CHANNELS_LAST!r} or none")

    def describe(self) -> str:
        """``16x8x8 float16``, or ``variable float16``."""
        shape = "variable" if self.shape is None else "x".join(map(str, self.shape))
        return f"{shape} {self.dtype}" + (" (of channels-last maps)" if self.layout == CHANNELS_LAST else "")

    def to_dict(self) -> dict[str, Any]:
        data = {"shape": None if self.shape is None else list(self.shape), "dtype": self.dtype}
        return data if self.layout is None else {**data, "layout": self.layout}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerSpec:
        return _build(cls, data)


@dataclasses.dataclass(frozen=True)
class BadSample:
    """A sample that could not be read, with the reason; the run records it and goes on."""

    index: int
    sample_id: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BadSample:
        return _build(cls, data)


@dataclasses.dataclass(frozen=True)
class ShardRecord:
    """What one finished shard wrote: written to ``_actmap/shards/`` once its files are committed,
    and returned to the driver.

    Attributes:
        shard, start, stop: the shard's id and its samples ``[start, stop)``.
        rows: rows written per layer.
        files: each layer's file, relative to the output root (no entry: no rows, no file).
        bytes: each file's size.
        index_range: each file's first and last source index; with ``rows`` and ``bytes`` it
            pins what the shard committed, so a file damaged or replaced since is found
            (records of older versions have none: their files are checked against the shard).
        bad: the samples that could not be read.
        seconds: where the shard's time went (``load_wait``, ``forward``, ``write_wait``, ...).
        started, finished: wall-clock times (seconds since the epoch).
        worker: where it ran (host, Ray node, process, device, threads, peak memory).
        stats: each layer's value statistics (``ValueStats.to_dict()``), counted as it was written.
    """

    shard: int
    start: int
    stop: int
    rows: Mapping[str, int] = dataclasses.field(default_factory=dict)
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    bytes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    index_range: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    bad: tuple[BadSample, ...] = ()
    seconds: Mapping[str, float] = dataclasses.field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0
    worker: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    stats: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "bad", tuple(b if isinstance(b, BadSample) else BadSample.from_dict(b)
                                              for b in self.bad))
        object.__setattr__(self, "index_range", {k: (int(v[0]), int(v[1])) for k, v in self.index_range.items()})

    @property
    def total_bytes(self) -> int:
        """The bytes of the shard's files, all layers together."""
        return sum(self.bytes.values())

    def to_dict(self) -> dict[str, Any]:
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        doc["bad"] = [b.to_dict() for b in self.bad]
        doc["index_range"] = {k: list(v) for k, v in self.index_range.items()}
        return {k: dict(v) if isinstance(v, Mapping) else v for k, v in doc.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardRecord:
        return _build(cls, data)


def _mapping(owner: str, name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise RecordError(f"a {owner}'s {name} is a mapping, got {type(value).__name__}")
    return dict(value)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a dump is: written to ``_actmap/manifest.json`` when its first run starts, read by
    every later run (to resume or refuse), by ``actmap inspect`` and ``actmap show``.

    Attributes:
        format: the manifest format of the version that wrote it (``_layout.MANIFEST_FORMAT``).
        identity: ``Config.identity()`` of the run: a run must match it to resume.
        config: ``Config.to_dict()`` of the run, as plain data (a newer version's config may
            hold keys this one does not know).
        model: the model's identity (its spec, class and weights digest).
        source: the source's identity.
        plan: the shard plan (stored as its samples, shard size and number of shards).
        layers: the layers dumped, as ``named_modules()`` spells them.
        created: when (ISO 8601, UTC).
        layer_info: how each layer is stored.
        input: what the model was fed (``None`` in the dumps of 0.1.0, which did not record it).
        labels: how the label columns were typed, where the source types them from its items (a
            ``dataset``'s ``label_types``): a resumed dump's workers take these, so its files
            keep one schema (``None``: the source's index types them, or an earlier version).

    >>> from pipeline._layout import MANIFEST_FORMAT
    >>> m = Manifest(MANIFEST_FORMAT, {}, {}, {"name": "tiny"}, {"kind": "generated"}, ShardPlan(10, 4), ("conv2",))
    >>> doc = m.to_dict()
    >>> doc["plan"], doc["layers"], "input" in doc
    ({'samples': 10, 'shard_size': 4, 'shards': 3}, ['conv2'], False)
    >>> Manifest.from_dict({**doc, "written_by": "a later version"}) == m
    True
    """

    format: str
    identity: Mapping[str, Any]
    config: Mapping[str, Any]
    model: Mapping[str, Any]
    source: Mapping[str, Any]
    plan: ShardPlan
    layers: tuple[str, ...]
    created: str = ""
    layer_info: Mapping[str, LayerSpec] = dataclasses.field(default_factory=dict)
    input: ModelInput | None = None
    labels: Mapping[str, Any] | None = None

    def __post_init__(self):
        if not isinstance(self.format, str):
            raise RecordError(f"a Manifest's format is a string, got {type(self.format).__name__}")
        for name in ("identity", "config", "model", "source"):
            object.__setattr__(self, name, _mapping("Manifest", name, getattr(self, name)))
        if not isinstance(self.plan, ShardPlan):
            plan = _mapping("Manifest", "plan", self.plan)
            object.__setattr__(self, "plan", ShardPlan(int(plan["samples"]), int(plan["shard_size"])))
        if isinstance(self.layers, str) or not all(isinstance(layer, str) for layer in self.layers):
            raise RecordError(f"a Manifest's layers are a list of layer names, got {self.layers!r}")
        object.__setattr__(self, "layers", tuple(self.layers))
        info = _mapping("Manifest", "layer_info", self.layer_info)
        object.__setattr__(self, "layer_info", {k: v if isinstance(v, LayerSpec) else LayerSpec.from_dict(v)
                                                for k, v in info.items()})
        if self.input is not None and not isinstance(self.input, ModelInput):
            object.__setattr__(self, "input", ModelInput.from_dict(_mapping("Manifest", "input", self.input)))

    def to_dict(self) -> dict[str, Any]:
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        doc["plan"] = {"samples": self.plan.samples, "shard_size": self.plan.shard_size, "shards": len(self.plan)}
        doc["layers"] = list(self.layers)
        doc["layer_info"] = {k: v.to_dict() for k, v in self.layer_info.items()}
        if self.input is None:  # as 0.1.0 wrote it: no key
            del doc["input"]
        else:
            doc["input"] = self.input.to_dict()
        if self.labels is None:  # (no key: as the versions before it wrote them)
            del doc["labels"]
        return doc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        return _build(cls, data)
