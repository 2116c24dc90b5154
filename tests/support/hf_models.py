"""Hugging Face ``transformers`` vision models with random weights from tiny configs, named in
configs as ``support.hf_models:<builder>`` (the pattern the README shows for your own models).

The builders seed nothing themselves: actmap seeds the random initialisation with
``model.seed`` around the call, so every actor builds the same weights.
"""

from __future__ import annotations

from pathlib import Path

#: Shared sizes: 32x32 images in 8x8 patches (16 patches and a class token), 2 layers of width 32.
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}


def tiny_vit(**overrides):
    """A ``ViTModel`` from a tiny ``ViTConfig``; ``overrides`` change config fields."""
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(**{**TINY, "intermediate_size": 64, **overrides}))


def tiny_clip_vision(**overrides):
    """A ``CLIPVisionModel`` from a tiny ``CLIPVisionConfig``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(**{**TINY, "intermediate_size": 64, **overrides}))


def tiny_dinov2(**overrides):
    """A ``Dinov2Model`` from a tiny ``Dinov2Config``."""
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config(**{**TINY, "mlp_ratio": 2, **overrides}))


def vit_from_folder(path: str):
    """A ``ViTModel`` saved with ``save_pretrained`` in a local folder (read offline)."""
    from transformers import ViTModel

    return ViTModel.from_pretrained(Path(path), local_files_only=True)
