"""What a model is fed: normalisation constants and input size, from the config or the model.

With ``source.preprocess.normalize: model`` the mean and std come from the model's own
configuration, where it has one that is readable offline:

- a timm model: its ``pretrained_cfg`` (``mean``, ``std``, ``input_size``, ``crop_pct``);
- a Hugging Face ``transformers`` model: the ``image_mean`` and ``image_std`` of the image
  processor saved beside it (``preprocessor_config.json`` in the local folder it was loaded
  from, or in the Hugging Face cache), and its config's ``image_size``.

The input size is taken from the model only where it is sensible: for a model that wants one
size (a ViT's patch grid; a transformers config's ``image_size``), and only when the config
sets neither ``resize`` nor ``crop``. Then the shorter side is resized to ``size / crop_pct``
(timm's evaluation transform; ``crop_pct`` 1 for transformers) and the centre cropped to
``size``. CNNs keep the sizes the config gives.

>>> import torch
>>> from pipeline.config import PreprocessSpec
>>> resolve_input(PreprocessSpec(crop=32), torch.nn.Identity())
ModelInput(mean_std=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), resize=None, crop=(32, 32), origin='config')
>>> model = torch.nn.Identity()
>>> model.pretrained_cfg = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "input_size": (3, 32, 32), "crop_pct": 0.9}
>>> resolve_input(PreprocessSpec(normalize="model"), model)
ModelInput(mean_std=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), resize=None, crop=None, origin='timm pretrained_cfg')
>>> model.pretrained_cfg["fixed_input_size"] = True
>>> resolve_input(PreprocessSpec(normalize="model"), model).crop
(32, 32)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import PreprocessSpec
from .errors import ConfigError

log = logging.getLogger(__name__)

MeanStd = tuple[tuple[float, ...], tuple[float, ...]]
_KEY = PreprocessSpec.key("normalize")


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """The resolved preprocessing: ``mean_std`` (None: images in [0, 1]), ``resize`` (shorter
    side), ``crop`` (centre, height and width) and ``origin``, where the numbers came from."""

    mean_std: MeanStd | None
    resize: int | None
    crop: tuple[int, int] | None
    origin: str = "config"

    def to_dict(self) -> dict:
        """A JSON-able copy (kept in the manifest, so a reader sees what the model saw)."""
        mean_std = None if self.mean_std is None else {"mean": list(self.mean_std[0]), "std": list(self.mean_std[1])}
        return {"normalize": mean_std, "resize": self.resize, "crop": None if self.crop is None else list(self.crop),
                "origin": self.origin}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelInput:
        """The inverse of :meth:`to_dict`.

        >>> m = ModelInput(((0.5,) * 3, (0.25,) * 3), 36, (32, 32), "timm pretrained_cfg")
        >>> ModelInput.from_dict(m.to_dict()) == m
        True
        """
        norm = data.get("normalize")
        mean_std = None if norm is None else (tuple(norm["mean"]), tuple(norm["std"]))
        crop = data.get("crop")
        return cls(mean_std, data.get("resize"), None if crop is None else (int(crop[0]), int(crop[1])),
                   data.get("origin", "config"))


@dataclasses.dataclass(frozen=True)
class _Declared:
    """What a model declares about its input."""

    mean_std: MeanStd | None
    size: tuple[int, int] | None
    crop_pct: float
    origin: str


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and value > 0:
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return (int(value[0]), int(value[1]))
    return None


def _timm(model: torch.nn.Module) -> _Declared | None:
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, Mapping) or "mean" not in cfg or "std" not in cfg:
        return None
    size = None
    patches = getattr(model, "patch_embed", None)
    if patches is not None and _pair(getattr(patches, "img_size", None)):
        # the grid the model was built for (an img_size argument changes it, not pretrained_cfg)
        if getattr(patches, "strict_img_size", True) and not getattr(patches, "dynamic_img_size", False):
            size = _pair(patches.img_size)
    elif cfg.get("fixed_input_size") and cfg.get("input_size"):
        size = _pair(tuple(cfg["input_size"])[-2:])
    mean_std = (tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"]))
    return _Declared(mean_std, size, float(cfg.get("crop_pct") or 1.0), "timm pretrained_cfg")


def _processor_file(name_or_path: str) -> Path | None:
    """``preprocessor_config.json`` of a local model folder or of a model in the Hugging Face cache."""
    if not name_or_path:
        return None
    local = Path(name_or_path).expanduser() / "preprocessor_config.json"
    if local.is_file():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        cached = try_to_load_from_cache(name_or_path, "preprocessor_config.json")
    except Exception:  # not a hub id: nothing cached under it
        log.debug("no cached processor for %r", name_or_path, exc_info=True)
        return None
    return Path(cached) if isinstance(cached, str) else None


def _transformers(model: torch.nn.Module) -> tuple[_Declared | None, str]:
    """The declared input of a transformers model, or None with the reason."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None, f"{type(model).__name__} has no timm pretrained_cfg and no transformers config"
    size = _pair(getattr(config, "image_size", None))
    name = str(getattr(config, "_name_or_path", "") or "")
    found = _processor_file(name)
    if found is None:
        where = f"for {name!r}" if name else "(the model was built from a config, not loaded from a folder)"
        return None, (f"{type(model).__name__} carries no mean and std: no preprocessor_config.json {where} "
                      "in a local folder or the Hugging Face cache")
    processor = json.loads(found.read_text())
    if processor.get("do_normalize", True) is False:
        mean_std = None
    elif "image_mean" in processor and "image_std" in processor:
        mean_std = (tuple(float(v) for v in processor["image_mean"]), tuple(float(v) for v in processor["image_std"]))
    else:
        return None, f"{found} holds no image_mean and image_std"
    return _Declared(mean_std, size, float(processor.get("crop_pct") or 1.0), f"{found}"), ""


def resolve_input(spec: PreprocessSpec, model: torch.nn.Module) -> ModelInput:
    """The preprocessing ``spec`` asks for, with ``normalize: model`` filled in from ``model``.

    Raises:
        ConfigError: ``normalize`` is ``model`` and the model declares no mean and std offline.
    """
    if spec.normalize != "model":
        return ModelInput(spec.mean_std(), spec.resize, spec.crop)
    declared = _timm(model)
    reason = ""
    if declared is None:
        declared, reason = _transformers(model)
    if declared is None:
        raise ConfigError(_KEY, f"'model' takes the mean and std from the model's own config, but {reason}; "
                          "set it to 'imagenet', 'none' or {mean: [r, g, b], std: [r, g, b]}")
    resize, crop = spec.resize, spec.crop
    if resize is None and crop is None and declared.size is not None:
        crop = declared.size
        resize = math.floor(min(declared.size) / declared.crop_pct)
    if declared.mean_std is not None and len(declared.mean_std[0]) != 3:
        raise ConfigError(_KEY, f"the model's mean {list(declared.mean_std[0])} ({declared.origin}) is not "
                          "one value per RGB channel; give {mean: [r, g, b], std: [r, g, b]}")
    log.info("normalize: model -> %s (from %s), resize %s, crop %s", declared.mean_std, declared.origin, resize, crop)
    return ModelInput(declared.mean_std, resize, crop, declared.origin)
