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

Checks that need the model or the data (do the layers exist? does the source open?) run in
:func:`pipeline.validate.validate`, still before any work starts.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, close_matches


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


# -- value checks ---------------------------------------------------------------------------


def _enum(key: str, value: Any, kind: type[enum.Enum]) -> Any:
    if isinstance(value, kind):
        return value
    valid = [m.value for m in kind]
    if isinstance(value, str) and value.lower() in valid:
        return kind(value.lower())
    raise ConfigError(key, f"{value!r} is not valid; {close_matches(str(value), valid)}"
                      if isinstance(value, str) else f"{value!r} is not valid; valid: {valid}")


def _int(key: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(key, f"must be at least {minimum}, got {value}")
    return value


def _number(key: str, value: Any, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"expected a number, got {value!r}")
    if value < minimum:
        raise ConfigError(key, f"must be at least {minimum}, got {value}")
    return float(value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}")
    return value


def _str(key: str, value: Any, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"expected a non-empty string, got {value!r}")
    return value


def _size(key: str, value: Any, optional: bool = True) -> tuple[int, int] | None:
    """An image size: one int (square) or ``[height, width]``."""
    if value is None and optional:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ConfigError(key, f"expected a positive int or [height, width], got {value!r}")
    return (int(value[0]), int(value[1]))


def _mapping(key: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"expected a mapping, got {value!r}")
    return dict(value)


def _freeze(obj: Any) -> Any:
    """A JSON-able plain copy (tuples become lists) for identities and manifests."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _freeze(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {str(k): _freeze(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_freeze(v) for v in obj]
    return obj


class _Section:
    """Shared parsing for the config sections: unknown keys are errors with close matches."""

    _prefix = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, prefix: str | None = None):
        prefix = cls._prefix if prefix is None else prefix
        data = _mapping(prefix, data)
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(f"{prefix}.{key}" if prefix else str(key),
                                  f"unknown key; {close_matches(str(key), names)}")
        nested = {f.name: f.metadata["section"] for f in dataclasses.fields(cls)
                  if "section" in f.metadata}
        kwargs = {}
        for key, value in data.items():
            if key in nested:
                value = nested[key].from_dict(value, f"{prefix}.{key}" if prefix else key)
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return _freeze(self)


def _section(kind: type) -> Any:
    return dataclasses.field(default_factory=kind, metadata={"section": kind})


@dataclasses.dataclass(frozen=True)
class ModelSpec(_Section):
    """Which model, which layers, and how the forward runs.

    ``name`` is a torchvision builder (``resnet50``, ``maskrcnn_resnet50_fpn``, ...) or
    ``package.module:callable``; ``kwargs`` go to it (torchvision builders get ``weights=None``
    unless given). ``weights`` is a local state-dict file, loaded with ``weights_only=True``;
    without it the weights come from ``seed``, the same on every actor.
    """

    _prefix = "model"
    name: str = "resnet18"
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    weights: str | None = None
    seed: int = 0
    layers: tuple[str, ...] = ("layer3", "layer4")
    mode: Mode = Mode.GRAB
    stop_early: bool = True
    precision: Precision = Precision.FP32
    channels_last: bool = False

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "name", _str("model.name", self.name))
        set_(self, "kwargs", _mapping("model.kwargs", self.kwargs))
        set_(self, "weights", _str("model.weights", self.weights, optional=True))
        set_(self, "seed", _int("model.seed", self.seed, 0))
        layers = self.layers
        if isinstance(layers, str):
            layers = [layers]
        if not isinstance(layers, Sequence) or not layers:
            raise ConfigError("model.layers", f"expected a non-empty list of layer ids, got {layers!r}")
        for layer in layers:
            if not isinstance(layer, str) or not layer:
                raise ConfigError("model.layers", f"{layer!r} is not a layer id; layer ids are "
                                  "named_modules() names such as 'layer3' (see `actmap layers MODEL`); "
                                  "quote ids with selectors in YAML lists: [\"encoder.layer.3[0]\"]")
        if len(set(layers)) != len(layers):
            raise ConfigError("model.layers", f"lists a layer twice: {list(layers)}")
        set_(self, "layers", tuple(layers))
        set_(self, "mode", _enum("model.mode", self.mode, Mode))
        if self.mode is Mode.STUMP and len(self.layers) != 1:
            raise ConfigError("model.layers", f"stump mode takes exactly one layer, got "
                              f"{list(self.layers)}; use mode: grab for several")
        set_(self, "stop_early", _bool("model.stop_early", self.stop_early))
        set_(self, "precision", _enum("model.precision", self.precision, Precision))
        set_(self, "channels_last", _bool("model.channels_last", self.channels_last))


@dataclasses.dataclass(frozen=True)
class DumpSpec(_Section):
    """How the activations are stored: dtype, reduction on the device, compression, shapes."""

    _prefix = "dump"
    dtype: StorageDtype = StorageDtype.FLOAT16
    reduce: Reduction = Reduction.NONE
    pool_size: tuple[int, int] = (1, 1)
    compression: Compression = Compression.ZSTD
    shapes: Shapes = Shapes.AUTO

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "dtype", _enum("dump.dtype", self.dtype, StorageDtype))
        set_(self, "reduce", _enum("dump.reduce", self.reduce, Reduction))
        set_(self, "pool_size", _size("dump.pool_size", self.pool_size, optional=False))
        set_(self, "compression", _enum("dump.compression", self.compression, Compression))
        set_(self, "shapes", _enum("dump.shapes", self.shapes, Shapes))


_NORMALIZE_PRESETS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": None,
}


@dataclasses.dataclass(frozen=True)
class PreprocessSpec(_Section):
    """Per-sample preprocessing: resize the shorter side, centre-crop, normalise on the device.

    ``normalize`` is ``imagenet``, ``none`` (images in [0, 1], as detection models want),
    ``model`` (the model's own mean and std, and its input size where it wants one: see
    :mod:`pipeline.model_inputs`) or ``{mean: [...], std: [...]}``. ``channels`` is what the
    model takes: 3 (grey images are repeated) or 1 (colour images become their luma).
    ``max_pixels`` refuses larger images from their header, before decoding (``null``: no limit).
    """

    _prefix = "source.preprocess"
    resize: int | None = None
    crop: tuple[int, int] | None = None
    normalize: Any = "imagenet"
    channels: int = 3
    max_pixels: int | None = 89_478_485

    def __post_init__(self):
        set_ = object.__setattr__
        if self.resize is not None:
            set_(self, "resize", _int("source.preprocess.resize", self.resize, 1))
        set_(self, "crop", _size("source.preprocess.crop", self.crop))
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ConfigError("source.preprocess.channels", f"{self.channels!r} is not valid; valid: 3 "
                              "(RGB) or 1 (grey)")
        if self.max_pixels is not None:
            set_(self, "max_pixels", _int("source.preprocess.max_pixels", self.max_pixels, 1))
        norm = self.normalize
        if isinstance(norm, str):
            if norm.lower() not in _NORMALIZE_PRESETS and norm.lower() != "model":
                raise ConfigError("source.preprocess.normalize", f"{norm!r} is not valid; valid: "
                                  "'imagenet', 'none', 'model' or {mean: [r, g, b], std: [r, g, b]}")
            norm = norm.lower()
        elif isinstance(norm, Mapping):
            if set(norm) != {"mean", "std"} or not all(
                    isinstance(norm[k], Sequence) and len(norm[k]) == 3 for k in ("mean", "std")):
                raise ConfigError("source.preprocess.normalize",
                                  f"expected {{mean: [r, g, b], std: [r, g, b]}}, got {dict(norm)!r}")
            if any(s <= 0 for s in norm["std"]):
                raise ConfigError("source.preprocess.normalize", f"std must be positive, got {norm['std']}")
            norm = {"mean": [float(v) for v in norm["mean"]], "std": [float(v) for v in norm["std"]]}
        else:
            raise ConfigError("source.preprocess.normalize", f"{norm!r} is not valid; valid: "
                              "'imagenet', 'none', 'model' or {mean: [r, g, b], std: [r, g, b]}")
        set_(self, "normalize", norm)

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """The normalisation constants, or ``None`` to keep images in [0, 1].

        Raises ``ValueError`` for ``model``: those come with the model
        (:func:`pipeline.model_inputs.resolve_input`).
        """
        if self.normalize == "model":
            raise ValueError("normalize 'model' takes its constants from the model: use "
                             "pipeline.model_inputs.resolve_input(preprocess, model)")
        if isinstance(self.normalize, str):
            return _NORMALIZE_PRESETS[self.normalize]
        return tuple(self.normalize["mean"]), tuple(self.normalize["std"])

    @property
    def fixed_size(self) -> bool:
        """Whether every preprocessed image has the same size (a crop is set)."""
        return self.crop is not None


@dataclasses.dataclass(frozen=True)
class SourceSpec(_Section):
    """Where the samples come from.

    - ``generated``: ``count`` images of ``image_size`` px, deterministic by ``seed``, each with
      a shape (the concept) of class ``label`` and its ``mask``;
    - ``folder``: image files under ``path``; class sub-folders become ``label``;
    - ``parquet``: a table at ``path`` with an encoded-image column ``image_column``; the other
      columns (or those in ``columns``) pass through; ``id_column`` gives the sample ids;
    - ``dataset``: ``target`` names a ``package.module:callable`` that returns a map-style
      ``torch.utils.data.Dataset`` (called with ``kwargs``);
    - ``webdataset``: WebDataset tar shards at ``path`` (a path, glob or brace pattern, or a
      list of them).
    """

    _prefix = "source"
    kind: SourceKind = SourceKind.GENERATED
    path: str | tuple[str, ...] | None = None
    count: int = 3000
    image_size: int = 64
    seed: int = 0
    image_column: str = "image"
    id_column: str | None = None
    columns: tuple[str, ...] | None = None
    target: str | None = None
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    preprocess: PreprocessSpec = _section(PreprocessSpec)

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "kind", _enum("source.kind", self.kind, SourceKind))
        set_(self, "count", _int("source.count", self.count, 1))
        set_(self, "image_size", _int("source.image_size", self.image_size, 8))
        set_(self, "seed", _int("source.seed", self.seed, 0))
        set_(self, "image_column", _str("source.image_column", self.image_column))
        set_(self, "id_column", _str("source.id_column", self.id_column, optional=True))
        set_(self, "kwargs", _mapping("source.kwargs", self.kwargs))
        if self.columns is not None:
            if isinstance(self.columns, str) or not all(isinstance(c, str) for c in self.columns):
                raise ConfigError("source.columns", f"expected a list of column names, got {self.columns!r}")
            set_(self, "columns", tuple(self.columns))
        if isinstance(self.preprocess, Mapping):
            set_(self, "preprocess", PreprocessSpec.from_dict(self.preprocess))
        if self.path is not None:
            if self.kind is SourceKind.WEBDATASET and not isinstance(self.path, str):
                if (not isinstance(self.path, Sequence) or not self.path
                        or not all(isinstance(p, str) and p for p in self.path)):
                    raise ConfigError("source.path", f"expected a tar path, glob or brace pattern, or a "
                                      f"list of them, got {self.path!r}")
                set_(self, "path", tuple(self.path))
            else:
                _str("source.path", self.path)
        needs = {SourceKind.FOLDER: "path", SourceKind.PARQUET: "path", SourceKind.DATASET: "target",
                 SourceKind.WEBDATASET: "path"}
        need = needs.get(self.kind)
        if need and not getattr(self, need):
            example = "package.module:callable" if need == "target" else "/data/images"
            raise ConfigError(f"source.{need}", f"required for source.kind {self.kind.value!r} "
                              f"(e.g. {example!r})")
        if self.target is not None:
            _str("source.target", self.target)
            if ":" not in self.target:
                raise ConfigError("source.target", f"{self.target!r} is not of the form "
                                  "'package.module:callable'")


@dataclasses.dataclass(frozen=True)
class RunSpec(_Section):
    """How the work is spread: actors, resources, batches, shards, and where the output goes.

    ``actors``, ``gpus_per_actor`` and ``cpus_per_actor`` may be ``auto``: one actor per GPU of
    the cluster with its share of the node's CPUs, or, on a cluster without GPUs, one actor per
    CPU.
    """

    _prefix = "run"
    output: str = "actmap-out"
    actors: int | str = "auto"
    gpus_per_actor: float | str = "auto"
    cpus_per_actor: float | str = "auto"
    batch_size: int = 32
    shard_size: int = 256
    strict: bool = False
    max_attempts: int = 3

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "output", _str("run.output", self.output))
        if self.actors != "auto":
            set_(self, "actors", _int("run.actors", self.actors, 1))
        if self.gpus_per_actor != "auto":
            set_(self, "gpus_per_actor", _number("run.gpus_per_actor", self.gpus_per_actor))
        if self.cpus_per_actor != "auto":
            set_(self, "cpus_per_actor", _number("run.cpus_per_actor", self.cpus_per_actor))
        set_(self, "batch_size", _int("run.batch_size", self.batch_size, 1))
        set_(self, "shard_size", _int("run.shard_size", self.shard_size, 1))
        set_(self, "strict", _bool("run.strict", self.strict))
        set_(self, "max_attempts", _int("run.max_attempts", self.max_attempts, 1))


@dataclasses.dataclass(frozen=True)
class Config(_Section):
    """The whole run: ``model``, ``source``, ``dump`` and ``run`` sections."""

    model: ModelSpec = _section(ModelSpec)
    source: SourceSpec = _section(SourceSpec)
    dump: DumpSpec = _section(DumpSpec)
    run: RunSpec = _section(RunSpec)

    def identity(self) -> dict:
        """What decides the output's content: a run on the same folder must match it to resume.

        The resources and batch size may change between runs; the shard size may not, since
        file names are a function of the shard.
        """
        whole = self.to_dict()
        return {"model": whole["model"], "source": whole["source"], "dump": whole["dump"],
                "shard_size": self.run.shard_size}

    def shapes_fixed(self) -> bool:
        """Whether each layer's activations all have one shape (so a fixed-width column)."""
        if self.dump.shapes is Shapes.AUTO:
            return self.source.preprocess.fixed_size or self.source.kind is SourceKind.GENERATED
        return self.dump.shapes is Shapes.FIXED


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
                          "(e.g. run.batch_size=64)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"value {value!r} is not valid YAML: {exc}") from None
    return key.strip().split("."), parsed


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """A copy of ``data`` with each ``key.path=value`` override set."""
    data = json.loads(json.dumps(data))  # a deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(path[:i + 1]), f"is a value, not a section: {child!r}")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or start from the defaults), apply overrides, and validate it."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError("", f"config file {str(path)!r} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError("", f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(data, Mapping):
            raise ConfigError("", f"config file {str(path)!r} must hold a mapping with the "
                              "sections model, source, dump, run")
    return Config.from_dict(apply_overrides(data, overrides))
