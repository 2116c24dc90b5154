"""The run's configuration: frozen dataclasses, validated as they are built.

A config comes from a YAML file (:func:`load_config`), with ``key=value`` overrides from the
command line, and every section has defaults: the empty config is the embedded default job
(two layers of a ResNet-18 over generated images).

>>> cfg = Config.from_dict({"model": {"layers": ["layer2"]}, "run": {"batch_size": 8}})
>>> cfg.model.layers, cfg.run.batch_size, cfg.source.kind
(('layer2',), 8, <SourceKind.GENERATED: 'generated'>)
>>> Config.from_dict({"run": {"batch_sise": 8}})
Traceback (most recent call last):
...
pipeline.errors.ConfigError: run.batch_sise: unknown key; did you mean 'batch_size'?

Each field declares its check once (:mod:`pipeline._checks`); a key is always its section's
prefix and the field's name; the other modules name a key by ``Section.key(field)``. The
``source`` section has one class per kind, holding only the keys that kind uses.

Checks that need the model or the data (do the layers exist? does the source open?) run when
:func:`pipeline.run` starts: the driver builds the model, opens the source and sends one trial
sample through the whole path, still before any work starts.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import re
import reprlib
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import yaml

from . import _checks as check
from .errors import ConfigError, close_matches

log = logging.getLogger(__name__)


class Mode(str, enum.Enum):
    """``grab``: every layer from one forward; ``stump``: the output of one layer only."""

    GRAB = "grab"
    STUMP = "stump"


class Precision(str, enum.Enum):
    """The precision the forward runs in (``bf16``/``fp16`` use autocast)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class StorageDtype(str, enum.Enum):
    """The dtype the activations are stored in; the cast happens on the device."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class Reduction(str, enum.Enum):
    """An optional reduction on the device, before the data leaves it."""

    NONE = "none"
    POOL = "pool"  # adaptive average pooling of the spatial dims to ``pool_size``
    CHANNEL_MEAN = "channel_mean"  # mean over the channel dim (dim 1 of the batch)
    CLS = "cls"  # token 0 of a (tokens, dim) output: a ViT's class token
    MEAN = "mean"  # the mean over the tokens of a (tokens, dim) output


class Shapes(str, enum.Enum):
    """``fixed``: every sample of a layer has one shape; ``variable``: each row stores its own."""

    AUTO = "auto"
    FIXED = "fixed"
    VARIABLE = "variable"


class SourceKind(str, enum.Enum):
    """Where the samples come from; each kind has its section class (see :class:`SourceSpec`)."""

    GENERATED = "generated"
    FOLDER = "folder"
    PARQUET = "parquet"
    DATASET = "dataset"
    WEBDATASET = "webdataset"


class Compression(str, enum.Enum):
    NONE = "none"
    ZSTD = "zstd"
    SNAPPY = "snappy"
    LZ4 = "lz4"


class ExecutorKind(str, enum.Enum):
    """What runs the shards: ``ray`` actors, or ``local`` workers in threads of the driver's
    process (no Ray: for small jobs and tests)."""

    RAY = "ray"
    LOCAL = "local"


# -- sections -----------------------------------------------------------------------------------


def _freeze(obj: Any) -> Any:
    """A JSON-able plain copy (tuples become lists) for identities and manifests."""
    if isinstance(obj, _Section):
        return obj.to_dict()
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {str(k): _freeze(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_freeze(v) for v in obj]
    return obj


def _homes(name: str) -> list[str]:
    """The keys of the config fields named ``name``, in whichever section.

    >>> _homes("crop") == [PreprocessSpec.key("crop")], _homes("batch_size") == [RunSpec.key("batch_size")]
    (True, True)
    >>> _homes("nothing")
    []
    """
    homes, sections = set(), list(_Section.__subclasses__())
    while sections:
        section = sections.pop()
        sections += section.__subclasses__()
        if dataclasses.is_dataclass(section) and name in section._names():
            homes.add(section._key(name))
    return sorted(homes)


def _field(default: Any, value_check: check.Check, **metadata: Any) -> Any:
    """A section field with its default and its check (run on every value it is given)."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return dataclasses.field(**factory, metadata={"check": value_check, **metadata})


def _section(kind: type[_Section], default: Callable[[], _Section] | None = None) -> Any:
    """A nested section: a mapping becomes the section, a section instance stays."""
    return _field(default or kind, kind.coerce)


class _Section:
    """Shared behaviour of the config sections: every field's check runs on construction, and
    unknown keys are errors with close matches."""

    _prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](self._key(f.name), getattr(self, f.name)))
        self._check()

    def _check(self) -> None:
        """Checks that involve several fields."""

    @classmethod
    def _key(cls, name: str) -> str:
        return f"{cls._prefix}.{name}" if cls._prefix else name

    @classmethod
    def key(cls, name: str) -> str:
        """The dotted config key of this section's field ``name``, as messages name it: derived
        from the section, so a field renamed here leaves no stale key in a message elsewhere (a
        name that is no field raises).

        >>> print(RunSpec.key("batch_size"), PreprocessSpec.key("crop"), FolderSpec.key("path"), Config.key("source"))
        run.batch_size source.preprocess.crop source.path source
        >>> RunSpec.key("batch_sise")
        Traceback (most recent call last):
        ...
        AttributeError: RunSpec has no field 'batch_sise'; did you mean 'batch_size'?
        """
        if name not in cls._names():
            raise AttributeError(f"{cls.__name__} has no field {name!r}; {close_matches(name, cls._names())}")
        return cls._key(name)

    @classmethod
    def _names(cls) -> list[str]:
        """The keys this section accepts."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None):
        """The section from its mapping (``None``: all defaults); unknown keys are errors."""
        return cls._parse(check.mapping(cls._prefix, data))

    @classmethod
    def _parse(cls, data: dict[str, Any]):
        names = cls._names()
        for key in data:
            if key not in names:
                homes = [home for home in _homes(str(key)) if home != cls._key(str(key))]
                hint = f"it belongs in {' or '.join(homes)}" if homes else close_matches(str(key), names)
                raise ConfigError(cls._key(str(key)), f"unknown key; {hint}")
        return cls(**data)

    @classmethod
    def coerce(cls, key: str, value: Any):
        """``value`` as this section: itself, or built from a mapping."""
        return value if isinstance(value, cls) else cls.from_dict(value)

    def to_dict(self) -> dict:
        return {f.name: _freeze(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class ModelSpec(_Section):
    """Which model, which layers, and how the forward runs.

    ``name`` is a torchvision builder (``resnet50``, ``maskrcnn_resnet50_fpn``, ...) or
    ``package.module:callable``; ``kwargs`` go to it (torchvision builders get ``weights=None``
    unless given). ``weights`` is a local state-dict file, loaded with ``weights_only=True``;
    without it the weights come from ``seed``, the same on every actor.
    """

    _prefix = "model"
    name: str = _field("resnet18", check.text())
    kwargs: Mapping[str, Any] = _field(dict, check.plain_mapping)
    weights: str | None = _field(None, check.text(optional=True))
    # (torch takes seeds up to 2**64 - 1; its CPU generator uses their low 32 bits: see the driver)
    seed: int = _field(0, check.integer(0, maximum=2**64 - 1))
    layers: tuple[str, ...] = _field(("layer3", "layer4"), check.layer_ids)
    mode: Mode = _field(Mode.GRAB, check.choice(Mode))
    stop_early: bool = _field(True, check.boolean)
    precision: Precision = _field(Precision.FP32, check.choice(Precision))
    channels_last: bool = _field(False, check.boolean)

    def _check(self) -> None:
        if self.mode is Mode.STUMP and len(self.layers) != 1:
            raise ConfigError(self._key("layers"), f"stump mode takes exactly one layer, got "
                              f"{list(self.layers)}; use mode: grab for several")


@dataclasses.dataclass(frozen=True)
class DumpSpec(_Section):
    """How the activations are stored: dtype, reduction on the device, compression, shapes."""

    _prefix = "dump"
    dtype: StorageDtype = _field(StorageDtype.FLOAT16, check.choice(StorageDtype))
    reduce: Reduction = _field(Reduction.NONE, check.choice(Reduction))
    pool_size: tuple[int, int] = _field((1, 1), check.size(optional=False))
    compression: Compression = _field(Compression.ZSTD, check.choice(Compression))
    shapes: Shapes = _field(Shapes.AUTO, check.choice(Shapes))


@dataclasses.dataclass(frozen=True)
class PreprocessSpec(_Section):
    """Per-sample preprocessing: resize the shorter side, centre-crop, normalise on the device.

    ``normalize`` is ``imagenet``, ``none`` (images in [0, 1], as detection models want),
    ``model`` (the model's own mean and std, and its input size where it wants one: see
    :mod:`pipeline._model_inputs`) or ``{mean: [...], std: [...]}``. ``channels`` is what the
    model takes: 3 (grey images are repeated) or 1 (colour images become their luma).
    ``max_pixels`` refuses larger images from their header, before decoding (``null``: no limit).
    """

    _prefix = "source.preprocess"
    # (at least 2: torch's antialiased resize of uint8 pixels fails on a side of 1)
    resize: int | None = _field(None, check.integer(2, optional=True))
    crop: tuple[int, int] | None = _field(None, check.size())
    normalize: Any = _field("imagenet", check.normalization)
    channels: int = _field(3, check.one_of(3, 1))
    max_pixels: int | None = _field(89_478_485, check.integer(1, optional=True))

    def _check(self) -> None:
        sizes = {"resize": (self.resize, self.resize) if self.resize else None, "crop": self.crop}
        for name, size in sizes.items():
            if size is not None:
                self.check_pixels(self._key(name), *size)

    def check_pixels(self, key: str, width: int, height: int) -> None:
        """Refuse the size ``width`` x ``height`` that ``key`` asks for when it is over ``max_pixels``:
        an image made larger than the limit would be the bomb the limit keeps out."""
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise ConfigError(key, f"{width}x{height} = {width * height:,} pixels, over {self.key('max_pixels')} "
                              f"({self.max_pixels:,}); ask for less, or raise that limit")

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """The normalisation constants, or ``None`` to keep images in [0, 1].

        Raises ``ValueError`` for ``model``: those come with the model
        (:func:`pipeline._model_inputs.resolve_input`).
        """
        if self.normalize == "model":
            raise ValueError("normalize 'model' takes its constants from the model: use "
                             "pipeline._model_inputs.resolve_input(preprocess, model)")
        if isinstance(self.normalize, str):
            return check.NORMALIZE_PRESETS[self.normalize]
        return tuple(self.normalize["mean"]), tuple(self.normalize["std"])

    @property
    def fixed_size(self) -> bool:
        """Whether every preprocessed image has the same size (a crop is set)."""
        return self.crop is not None


@dataclasses.dataclass(frozen=True)
class SourceSpec(_Section):
    """Where the samples come from: the base of one section class per :class:`SourceKind`.

    A kind's class declares only the keys that kind uses (and so only those make up the
    source's part of the run's identity); it registers itself with its class statement,
    ``class FolderSpec(SourceSpec, kind=SourceKind.FOLDER)``. A field whose metadata holds an
    ``example`` is required. In a config, ``source.kind`` picks the class; keys that only other
    kinds use are ignored with a warning, unknown keys are errors.
    """

    _prefix = "source"
    _kinds: ClassVar[dict[SourceKind, type[SourceSpec]]] = {}
    kind: ClassVar[SourceKind]
    #: whether every image of the kind has one size before preprocessing
    uniform_images: ClassVar[bool] = False
    preprocess: PreprocessSpec = _section(PreprocessSpec)

    def __init_subclass__(cls, kind: SourceKind | None = None, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if kind is not None:
            cls.kind = kind
            SourceSpec._kinds[kind] = cls

    def _check(self) -> None:
        if type(self) not in SourceSpec._kinds.values():
            raise TypeError(f"{type(self).__name__} is not a source kind; use one of "
                            f"{', '.join(c.__name__ for c in SourceSpec._kinds.values())}")
        for f in dataclasses.fields(self):
            if "example" in f.metadata and getattr(self, f.name) is None:
                raise ConfigError(self._key(f.name), f"required for {self._key('kind')} {self.kind.value!r} "
                                  f"(e.g. {f.metadata['example']!r})")

    @classmethod
    def _names(cls) -> list[str]:
        return ["kind", *super()._names()]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SourceSpec:
        """The section of the kind ``data["kind"]`` names (``generated`` by default)."""
        data = check.mapping(cls._prefix, data)
        default = getattr(cls, "kind", SourceKind.GENERATED)
        kind = check.choice(SourceKind)(cls._key("kind"), data.pop("kind", default))
        section = SourceSpec._kinds[kind]
        own = set(section._names())
        for key in [k for k in data if k not in own]:
            if any(key in other._names() for other in SourceSpec._kinds.values()):
                log.warning("%s is not used by %s %r; it is ignored", cls._key(key), cls._key("kind"), kind.value)
                del data[key]
        return section._parse(data)

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, **super().to_dict()}


@dataclasses.dataclass(frozen=True)
class GeneratedSpec(SourceSpec, kind=SourceKind.GENERATED):
    """``count`` images of ``image_size`` px, deterministic by ``seed``, each with a shape (the
    concept) of class ``label`` and its ``mask``."""

    uniform_images = True
    count: int = _field(3000, check.integer(1, maximum=2**63 - 1))  # (indices are int64)
    image_size: int = _field(64, check.integer(8))
    seed: int = _field(0, check.integer(0))

    def _check(self) -> None:
        super()._check()
        self.preprocess.check_pixels(self._key("image_size"), self.image_size, self.image_size)


@dataclasses.dataclass(frozen=True)
class FolderSpec(SourceSpec, kind=SourceKind.FOLDER):
    """Image files under ``path``; class sub-folders become ``label``."""

    path: str | None = _field(None, check.text(optional=True), example="/data/images")


@dataclasses.dataclass(frozen=True)
class ParquetSpec(SourceSpec, kind=SourceKind.PARQUET):
    """A table at ``path`` with an encoded-image column ``image_column``; the other columns (or
    those in ``columns``) pass through; ``id_column`` gives the sample ids."""

    path: str | None = _field(None, check.text(optional=True), example="/data/images")
    image_column: str = _field("image", check.text())
    id_column: str | None = _field(None, check.text(optional=True))
    columns: tuple[str, ...] | None = _field(None, check.names())


@dataclasses.dataclass(frozen=True)
class DatasetSpec(SourceSpec, kind=SourceKind.DATASET):
    """``target`` names a ``package.module:callable`` that returns a map-style
    ``torch.utils.data.Dataset`` (called with ``kwargs``)."""

    target: str | None = _field(None, check.target, example="package.module:callable")
    kwargs: Mapping[str, Any] = _field(dict, check.plain_mapping)


@dataclasses.dataclass(frozen=True)
class WebDatasetSpec(SourceSpec, kind=SourceKind.WEBDATASET):
    """WebDataset tar shards at ``path``: a path, glob or brace pattern
    (``train-{0000..0099}.tar``), or a list of them; local or URIs. A sample's image is its
    member with the first of ``image_extensions`` it holds (default: every image suffix, ``jpg``
    first)."""

    path: str | tuple[str, ...] | None = _field(None, check.paths, example="/data/train-{0000..0099}.tar")
    image_extensions: tuple[str, ...] | None = _field(None, check.extensions)


#: The longest wait a config may ask for, in seconds.
_YEAR = 365 * 24 * 3600.0


@dataclasses.dataclass(frozen=True)
class RunSpec(_Section):
    """How the work is spread: executor, actors, resources, batches, shards, retries, and where
    the output goes.

    ``actors``, ``gpus_per_actor`` and ``cpus_per_actor`` may be ``auto``: one actor per GPU of
    the cluster with its share of the node's CPUs (two actors per GPU, each with half, where a
    GPU comes with 16 CPUs or more, neither ``actors`` nor ``cpus_per_actor`` is set, and the
    shards fill the shares), or, on a cluster without GPUs, one actor per CPU. A shard is tried
    at most ``max_attempts`` times in all, on whatever worker; one that failed waits
    ``retry_delay`` seconds before its next try, twice as long after each further failure (at
    most 5 minutes; one that lost its worker, or whose error would only come back, is retried at
    once). A Ray run whose actors none comes
    up within ``start_timeout`` seconds (a busy cluster, one that does not scale up) stops. A
    run that stops (a strict bad sample, a shard out of tries, Ctrl-C, SIGTERM) gives its Ray
    actors ``stop_grace`` seconds to end their shards at their next batch, then kills them.
    """

    _prefix = "run"
    output: str = _field("actmap-out", check.text())
    executor: ExecutorKind = _field(ExecutorKind.RAY, check.choice(ExecutorKind))
    actors: int | str = _field("auto", check.auto_or(check.integer(1)))
    gpus_per_actor: float | str = _field("auto", check.auto_or(check.number()))
    # (more than 0: a share of a CPU close to 0 would give no bound on the actors, each a model copy)
    cpus_per_actor: float | str = _field("auto", check.auto_or(check.number(
        0.0, above=True, valid="give the CPUs each actor reserves (1, or a fraction such as 0.5), or auto")))
    batch_size: int = _field(32, check.integer(1))
    shard_size: int = _field(256, check.integer(1))
    strict: bool = _field(False, check.boolean)
    max_attempts: int = _field(3, check.integer(1))
    retry_delay: float = _field(10.0, check.number(0.0))
    # (Ray's waits take at most about 2**63 ms; a year is more than any run waits)
    start_timeout: float = _field(600.0, check.number(0.0, above=True, maximum=_YEAR))
    stop_grace: float = _field(30.0, check.number(0.0, maximum=_YEAR))


@dataclasses.dataclass(frozen=True)
class Config(_Section):
    """The whole run: ``model``, ``source``, ``dump`` and ``run`` sections."""

    model: ModelSpec = _section(ModelSpec)
    source: SourceSpec = _section(SourceSpec, default=GeneratedSpec)
    dump: DumpSpec = _section(DumpSpec)
    run: RunSpec = _section(RunSpec)

    def identity(self) -> dict:
        """What decides the output's content: a run on the same folder must match it to resume.

        The resources and batch size may change between runs; the shard size may not, since
        file names are a function of the shard.
        """
        return {"model": self.model.to_dict(), "source": self.source.to_dict(), "dump": self.dump.to_dict(),
                "shard_size": self.run.shard_size}

    def shapes_fixed(self) -> bool:
        """Whether each layer's activations all have one shape (so a fixed-width column)."""
        if self.dump.shapes is Shapes.AUTO:
            return self.source.preprocess.fixed_size or self.source.uniform_images
        return self.dump.shapes is Shapes.FIXED


def comparable_location(location: str) -> str:
    """One spelling of a source location, so that a folder named two ways is one source: a local
    path (or a ``file://`` URI of one, percent-decoded as pyarrow reads it) becomes absolute, with
    ``~`` expanded and no doubled or trailing slash; another URI (``s3://``, ``gs://``) only loses a
    trailing slash of its path (its query stays).

    >>> import os
    >>> comparable_location("/data//images/") == comparable_location("file:///data/images") == "/data/images"
    True
    >>> comparable_location("images") == os.path.join(os.getcwd(), "images")
    True
    >>> comparable_location("~/x") == os.path.join(os.path.expanduser("~"), "x")
    True
    >>> comparable_location("s3://bucket/prefix/?endpoint_override=h:9000"), comparable_location("s3://b/x-0?.tar")
    ('s3://bucket/prefix?endpoint_override=h:9000', 's3://b/x-0?.tar')
    """
    if location.startswith("file://"):
        parts = urllib.parse.urlsplit(location)
        if parts.netloc not in ("", "localhost"):
            return location
        location = urllib.parse.unquote(parts.path)
    elif "://" in location:
        base, mark, query = location.rpartition("?")
        if not mark or "=" not in query or "/" in query:  # no query: a `?` of a glob
            base, mark, query = location, "", ""
        scheme, _, rest = base.partition("://")
        return f"{scheme}://{rest.rstrip('/') or rest}{mark}{query}"
    path = os.path.abspath(os.path.expanduser(location))
    return re.sub("^/+", "/", path)  # (POSIX keeps a leading "//" as it is)


def comparable_identity(identity: Mapping[str, Any]) -> dict:
    """A stored identity as this version compares it: the source section of an older manifest
    (which held every kind's keys) keeps only the keys of its kind, and its ``path`` is spelled
    one way (:func:`comparable_location`), the stored one as the new one, since manifests hold
    the path as the config gave it.

    >>> old = {"source": {"kind": "folder", "path": "/x/", "count": 3000, "seed": 0}, "shard_size": 8}
    >>> comparable_identity(old)
    {'source': {'kind': 'folder', 'path': '/x'}, 'shard_size': 8}
    """
    source = identity.get("source")
    section = SourceSpec._kinds.get(source.get("kind")) if isinstance(source, Mapping) else None
    if section is None:
        return dict(identity)
    keep = set(section._names())
    source = {k: v for k, v in source.items() if k in keep}
    if isinstance(source.get("path"), str):
        source["path"] = comparable_location(source["path"])
    elif isinstance(source.get("path"), (list, tuple)):
        source["path"] = [comparable_location(p) if isinstance(p, str) else p for p in source["path"]]
    identity = {**identity, "source": source}
    if not {"model", "dump", "shard_size"} <= set(identity):
        return identity
    # read as this version reads a config: keys added since it was written take their defaults
    try:
        sections = {k: identity[k] for k in ("model", "source", "dump")}
        return Config.from_dict({**sections, "run": {"shard_size": identity["shard_size"]}}).identity()
    except (ConfigError, TypeError):
        return identity


def identity_diff(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """The keys where two config identities differ, as ``key: old -> new`` lines.

    >>> identity_diff({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}})
    ['a.c: 2 -> 3']
    """
    lines = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            lines += identity_diff(a, b, name + ".")
        elif a != b:
            lines.append(f"{name}: {json.dumps(a)} -> {json.dumps(b)}")
    return lines


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A YAML mapping gives one key twice (plain YAML loaders keep the last, silently)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    r"""``yaml.SafeLoader`` that refuses a mapping with a repeated key: a config with a section
    given twice would otherwise lose the first without a word. Keys that a merge (``<<: *base``)
    brings in may still be overridden.

    >>> yaml.load("a: 1\nb: {c: 2}", Loader=_UniqueKeyLoader)
    {'a': 1, 'b': {'c': 2}}
    >>> try:
    ...     yaml.load("run:\n  strict: true\nrun: {}", Loader=_UniqueKeyLoader)
    ... except DuplicateKeyError as exc:
    ...     print(exc.problem)
    the key 'run' is given twice (lines 1 and 3)
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the constructor says so
                continue
            if first is not None:
                again = key_node.start_mark.line
                lines = f"line {first + 1}" if again == first else f"lines {first + 1} and {again + 1}"
                raise DuplicateKeyError(problem=f"the key {key!r} is given twice ({lines})",
                                        problem_mark=key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


# a date in a config is the text it reads as (an output folder named 2024-01-01), not a date
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def _read_yaml(text: str) -> Any:
    """``text`` as YAML data (safe types only, a date as its text; a key repeated in a mapping
    is an error).

    >>> _read_yaml("output: 2024-01-01")
    {'output': '2024-01-01'}
    """
    return yaml.load(text, Loader=_UniqueKeyLoader)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split a ``key.path=value`` override; the value is read as YAML.

    >>> parse_override("run.batch_size=64")
    (['run', 'batch_size'], 64)
    >>> parse_override("model.layers=[layer2, layer3]")
    (['model', 'layers'], ['layer2', 'layer3'])
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", f"{text!r} is not of the form key.path=value "
                          f"(e.g. {RunSpec.key('batch_size')}=64)")
    try:
        parsed = _read_yaml(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"value {value!r} is not valid YAML: {exc}") from None
    check.plain_data(key.strip(), parsed, nan=True)  # (NaN: the key's own check says what it wants)
    return key.strip().split("."), parsed


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """A copy of ``data`` with each ``key.path=value`` override set (a section left empty, as
    ``run:`` with nothing under it, takes overrides as a missing one does)."""
    check.plain_data("", data, nan=True)
    data = json.loads(json.dumps(data))  # a deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(path[:i + 1]), f"is a value, not a section: {child!r}")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or start from the defaults), apply overrides, and validate it."""
    data: Any = {}
    if path is not None:
        if not str(path).strip():
            raise ConfigError("", "the config file's name is empty; give the path of a YAML file, or none for the "
                              "defaults")
        path = Path(path)
        try:
            data = _read_yaml(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("", f"config file {str(path)!r} does not exist") from None
        except IsADirectoryError:
            raise ConfigError("", f"config file {str(path)!r} is a folder; give a YAML file") from None
        except UnicodeDecodeError as exc:
            raise ConfigError("", f"config file {str(path)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                              f"at offset {exc.start}); save it as UTF-8") from None
        except OSError as exc:
            raise ConfigError("", f"config file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
        except DuplicateKeyError as exc:
            raise ConfigError("", f"config file {str(path)!r}: {exc.problem}; give each key once (YAML "
                              "would keep only the last)") from None
        except yaml.YAMLError as exc:
            raise ConfigError("", f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if data is None:  # empty, or comments only: the defaults
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError("", f"config file {str(path)!r} must hold a mapping with the "
                              f"sections model, source, dump, run; it holds {reprlib.repr(data)}")
    return Config.from_dict(apply_overrides(data, overrides))
