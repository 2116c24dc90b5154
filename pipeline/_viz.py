"""Pictures of a dump (``actmap show``): activation maps over their images, and value histograms.

The maps: a grid with one row per sampled image, the image as the model saw it (re-read from the
dump's source through the manifest, resized and cropped the same way) with its id, class and mask
outline, then its activation map(s) as heat maps over it. The statistics: one histogram of
activation values per layer, with the fraction of zeros and the NaN and inf counts, so a dead
layer or a dtype overflow shows at once. PNG files through matplotlib's Agg renderer: no display
is needed (``pip install 'actmap[viz]'``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, Reduction, SourceKind
from .errors import ConfigError
from ._encoding import read_metadata
from ._extras import require
from ._maps import NoMapError, activation_maps, spread
from ._model_inputs import ModelInput
from ._images import decode
from ._layout import ACTIVATION, INDEX, MANIFEST_PATH, SAMPLE_ID, SOURCE_INDEX_PATH
from ._manifest import read_manifest
from ._preprocess import resize_crop
from ._reader import decode_column, dump_layers, read_table
from ._records import CHANNELS_LAST, Manifest
from ._secrets import shown
from ._sources import IndexFile, describe_error, open_source
from ._sources.generated import SHAPES
from ._store import OutputStore

log = logging.getLogger(__name__)

#: Values a histogram is drawn from, at most, per layer (a random subset of the sampled rows).
MAX_HISTOGRAM_VALUES = 2_000_000


@dataclasses.dataclass
class _Row:
    """One sample to draw: its image as the model saw it, mask, caption and activation."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray | None  # (H, W) bool
    caption: str
    activation: np.ndarray


def picture_path(output: str) -> str:
    """The file a picture is written to: ``output``, with ``.png`` added where it has no suffix
    (as matplotlib adds it); a ``ValueError`` says what is wrong with it before anything is drawn.

    >>> picture_path("/tmp/maps"), picture_path("/tmp/maps.svg")
    ('/tmp/maps.png', '/tmp/maps.svg')
    """
    output = os.fspath(output)
    path = Path(output)
    if path.is_dir() or output.endswith(("/", os.sep)):
        raise ValueError(f"{output!r} is a folder; name the picture's file, e.g. {str(path / 'maps.png')!r}")
    if not path.parent.is_dir():
        raise ValueError(f"{str(path.parent)!r}, where {output!r} would go, is not a folder; make it first")
    if not path.suffix:
        return output.rstrip(".") + ".png"
    if path.suffix.lower() == ".png":
        return output
    require("matplotlib", "viz", "actmap show")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise ValueError(f"{output!r}: matplotlib writes no {path.suffix!r} files; end the name with .png (or "
                         f"{', '.join('.' + f for f in sorted(formats) if f != 'png')})")
    return output


def _figure(rows: int, cols: int, width: float = 2.6, height: float = 2.4):
    require("matplotlib", "viz", "actmap show")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(cols * width, rows * height + 0.6), layout="constrained")
    return figure, figure.subplots(rows, cols, squeeze=False)


def _manifest(store: OutputStore) -> Manifest:
    manifest = read_manifest(store)
    if manifest is None:
        raise FileNotFoundError(f"{store.location!r} holds no actmap dump (no {MANIFEST_PATH})")
    return manifest


def _model_input(manifest: Manifest, config: Config) -> ModelInput:
    if manifest.input is not None:
        return manifest.input
    prep = config.source.preprocess  # a dump from before the input was recorded
    return ModelInput(None, prep.resize, prep.crop)


def _caption(labels: dict[str, Any], kind: SourceKind) -> str:
    parts = [str(labels[SAMPLE_ID])]
    if labels.get("class_name") is not None:
        parts.append(str(labels["class_name"]))
    elif isinstance(labels.get("label"), int):
        label = labels["label"]
        named = kind is SourceKind.GENERATED and 0 <= label < len(SHAPES)
        parts.append(SHAPES[label] if named else f"label {label}")
    return ": ".join(parts)


def _as_image(pixels: torch.Tensor) -> np.ndarray:
    """(C, H, W) uint8 or float in [0, 1] -> (H, W, 3) uint8."""
    if pixels.dtype != torch.uint8:
        pixels = (pixels.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    return pixels[:3].permute(1, 2, 0).cpu().numpy()


def _rows(location: str, layer: str, count: int) -> tuple[list[_Row], dict, str]:
    """The sampled rows of ``layer``, their images re-read from the source; and the column spec.
    Maps stored as the model laid them out, ``(height, width, channels)``, come channels first."""
    store = OutputStore(location)
    manifest = _manifest(store)
    config = Config.from_dict(manifest.config)
    spec = manifest.layer_info.get(layer)
    across = config.dump.reduce is Reduction.NONE and spec is not None and spec.layout == CHANNELS_LAST
    present = read_table(location, layer, columns=[INDEX]).column(INDEX).to_pylist()
    table = read_table(location, layer, indices=spread(present, count))
    meta = read_metadata(table.schema)
    activations = decode_column(table, ACTIVATION)
    masks = decode_column(table, "mask") if "mask" in meta["columns"] else None
    labels = table.select([c for c in (SAMPLE_ID, INDEX, "label", "class_name")
                           if c in table.column_names]).to_pylist()
    # the samples as the dump numbered them: by the index the run kept, if the source has one
    index = store.path(SOURCE_INDEX_PATH) if store.exists(SOURCE_INDEX_PATH) else None
    source = open_source(config.source, index=None if index is None else IndexFile(store.fs, index))
    inputs = _model_input(manifest, config)
    rows = []
    for i, (found, label) in enumerate(zip(source.read([row[INDEX] for row in labels]), labels)):
        try:
            if not hasattr(found, "image"):
                raise OSError(found.reason)
            image = resize_crop(decode(found.image), inputs.resize, inputs.crop)
        except OSError as exc:  # (a file moved, deleted or changed since the dump)
            path = getattr(config.source, "path", None)
            raise ConfigError(config.source.key("path") if path else Config.key("source"),
                              f"sample {found.sample_id!r} cannot be read from the source the dump names "
                              f"({shown(str(path or config.source.kind.value))!r}) now: {describe_error(exc)}; "
                              "`actmap show` draws the maps over "
                              "the images the model saw, read again from that source: it has to hold them as it did "
                              "when the dump ran") from None
        mask = None
        if masks is not None:
            raw = torch.as_tensor(np.asarray(masks[i], dtype=np.float32))[None]
            mask = resize_crop(raw, inputs.resize, inputs.crop)[0].numpy() > 0.5
        activation = activations[i]
        if across and activation.ndim == 3:
            activation = np.moveaxis(activation, -1, 0)
        rows.append(_Row(_as_image(image), mask, _caption(label, config.source.kind), activation))
    return rows, meta, config.dump.reduce.value


def _upsample(values: np.ndarray, height: int, width: int) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()


def _outline(ax, mask: np.ndarray | None) -> None:
    if mask is not None and mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors="cyan", linewidths=1.2)


def show_maps(location: str, layer: str, output: str, samples: int = 4,
              channels: Sequence[int] | None = None, prefix_tokens: int | None = None) -> str:
    """Draw ``samples`` images of the dump beside their ``layer`` maps into the PNG ``output``.

    ``prefix_tokens``: the leading tokens of a token output (found by itself when None).
    Returns the path written (:func:`picture_path`). Raises ``NoMapError`` for a layer without a
    spatial layout.
    """
    output = picture_path(output)
    rows, meta, reduce = _rows(location, layer, samples)
    maps = [activation_maps(row.activation, channels, row.image.shape[0] / row.image.shape[1], reduce,
                            prefix_tokens) for row in rows]
    shape = "x".join(map(str, meta["columns"][ACTIVATION]["shape"] or ["variable"]))
    figure, axes = _figure(len(rows), 1 + len(maps[0]))
    figure.suptitle(f"{location}  layer {layer}  ({shape} {meta['columns'][ACTIVATION]['dtype']}, "
                    f"model {meta.get('model', '?')})", fontsize=10)
    for row, row_maps, ax_row in zip(rows, maps, axes):
        height, width = row.image.shape[:2]
        ax_row[0].imshow(row.image)
        _outline(ax_row[0], row.mask)
        ax_row[0].set_title(row.caption, fontsize=9)
        for m, ax in zip(row_maps, ax_row[1:]):
            ax.imshow(row.image, alpha=0.55)
            heat = ax.imshow(_upsample(m.values, height, width), cmap="inferno", alpha=0.6,
                             extent=(-0.5, width - 0.5, height - 0.5, -0.5))
            _outline(ax, row.mask)
            figure.colorbar(heat, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
            grid = "x".join(map(str, m.values.shape))
            ax.set_title(f"{m.title}\n({grid} map)", fontsize=8)
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
    figure.savefig(output, dpi=110)
    log.info("wrote %s", output)
    return output


def _values(location: str, layer: str, count: int) -> tuple[np.ndarray, int]:
    """Up to :data:`MAX_HISTOGRAM_VALUES` activation values of ``count`` sampled rows (float32)."""
    present = read_table(location, layer, columns=[INDEX]).column(INDEX).to_pylist()
    chosen = spread(present, count)
    decoded = decode_column(read_table(location, layer, indices=chosen), ACTIVATION)
    flat = np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in decoded]) if len(decoded) else np.empty(0)
    if flat.size > MAX_HISTOGRAM_VALUES:
        flat = np.random.default_rng(0).choice(flat, MAX_HISTOGRAM_VALUES, replace=False)
    return flat, len(chosen)


def layer_summary(values: np.ndarray) -> dict:
    """The numbers a histogram is captioned with: count, fraction of zeros, NaN and inf counts, and
    the min, max and mean of the finite values.

    >>> layer_summary(np.array([0.0, 2.0, np.inf]))["zeros"], layer_summary(np.array([0.0, 2.0, np.inf]))["mean"]
    (0.3333333333333333, 1.0)
    """
    finite = values[np.isfinite(values)]
    described = {"min": float(finite.min()), "max": float(finite.max()), "mean": float(finite.mean(dtype=np.float64))} \
        if finite.size else {"min": None, "max": None, "mean": None}
    return {"values": int(values.size), "zeros": float((values == 0).mean()) if values.size else 0.0,
            "nan": int(np.isnan(values).sum()), "inf": int(np.isinf(values).sum()), **described}


def show_stats(location: str, output: str, samples: int = 256, layers: Sequence[str] | None = None) -> str:
    """Draw one histogram of activation values per layer into the PNG ``output``; returns the
    path written (:func:`picture_path`)."""
    output = picture_path(output)
    layers = list(layers or dump_layers(location))
    if not layers:
        raise FileNotFoundError(f"{location!r} holds no layer yet")
    cols = min(3, len(layers))
    figure, axes = _figure(-(-len(layers) // cols), cols, width=3.6, height=2.8)
    figure.suptitle(f"{location}: activation values", fontsize=10)
    for ax in axes.ravel()[len(layers):]:
        ax.set_visible(False)
    for layer, ax in zip(layers, axes.ravel()):
        values, rows = _values(location, layer, samples)
        s = layer_summary(values)
        finite = values[np.isfinite(values)]
        if finite.size:
            ax.hist(finite, bins=80, color="#3b6ea8", log=True)
            ax.set_xlabel(f"min {s['min']:.3g}, max {s['max']:.3g}, mean {s['mean']:.3g}", fontsize=7)
        warn = s["nan"] or s["inf"] or s["zeros"] > 0.99  # an overflow, or a dead layer
        ax.set_title(f"{layer} ({rows} rows)\nzeros {s['zeros']:.1%}, NaN {s['nan']:,}, inf {s['inf']:,}",
                     fontsize=8, color="#b00020" if warn else "black")
        ax.tick_params(labelsize=7)
    figure.savefig(output, dpi=110)
    log.info("wrote %s", output)
    return output


__all__ = ["NoMapError", "layer_summary", "show_maps", "show_stats"]
