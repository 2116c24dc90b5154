"""Concept training on an actmap dump: dump a layer, then fit two probes on it.

1. Dump the layers named in ``concept_dump.yaml`` (a ResNet-18 over generated images that each
   hold at most one shape) with :func:`pipeline.run`, on a local Ray or the one already running.
2. Stream one layer back with :class:`pipeline.ActivationDataset` and a ``DataLoader`` (only a
   few Parquet row groups are in memory at a time) and train, on the same pass over the data:

   - a *presence* probe: a 1x1 conv to one score per location, averaged over the map, giving one
     logit per image for "the concept is in the image"; scored by accuracy against the chance
     rate (always answering the majority class);
   - a *mask* probe: a 1x1 conv to one logit per location for "this cell is the concept's",
     trained on the concept's mask average-pooled to the layer's grid; scored by IoU against
     the best constant answer (every cell, or none).

3. Hold out the samples with the highest source indices (the last 20 %), print a report and
   return the numbers.

The concept is "a shape" by default: the image holds a circle, square or triangle (its class is
in the ``label`` column, its pixels in ``mask``). ``--concept circle`` asks for circles alone.
With random weights (the only ones offline) a probe measures what random features already
encode: where a shape is, and whether there is one, can be read off them; whether it is a
circle cannot (that presence probe stays at chance). A real study dumps its own checkpoint:
``--set model.weights=my_resnet.pt``.

Run it::

    python examples/concept_training.py                  # 3,000 images, about 30 s on 2 idle cores
    python examples/concept_training.py --quick          # 400 images, about 17 s (the tests run it)
    python examples/concept_training.py --layer layer2   # the other dumped layer; the dump is reused
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, Subset

import pipeline

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "concept_dump.yaml"

#: ``label`` values of the generated source that count as the concept.
CONCEPTS = {"shape": (1, 2, 3), "circle": (1,), "square": (2,), "triangle": (3,)}

FULL = {"count": 3000, "epochs": 10}
QUICK = {"count": 400, "epochs": 20}
#: Row groups an ActivationDataset keeps decoded: enough for one window of the shuffle below.
CACHED_ROW_GROUPS = 4


# -- streaming order ---------------------------------------------------------------------------


class BlockShuffleSampler(Sampler[int]):
    """A shuffle that a streaming reader can follow.

    A plain shuffle jumps across the whole dump, so every row would load (and decode) its row
    group again. Here the rows are cut into blocks of ``block`` neighbours (about one row group);
    the blocks are shuffled, and the rows are shuffled within each run of ``window`` blocks, so
    only the few row groups under one window are live at a time.

    >>> order = list(BlockShuffleSampler(range(10), block=4, window=1, seed=0))
    >>> sorted(order) == list(range(10))
    True
    """

    def __init__(self, positions: Sequence[int], block: int, window: int = 2, seed: int = 0):
        self.positions = sorted(positions)
        self.block, self.window = block, window
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self) -> Iterator[int]:
        blocks = [self.positions[i:i + self.block] for i in range(0, len(self.positions), self.block)]
        order = torch.randperm(len(blocks), generator=self.generator).tolist()
        for start in range(0, len(order), self.window):
            rows = [p for b in order[start:start + self.window] for p in blocks[b]]
            for i in torch.randperm(len(rows), generator=self.generator).tolist():
                yield rows[i]


# -- the probes -------------------------------------------------------------------------------


class Standardize(nn.Module):
    """Per-channel standardisation with statistics fixed from the training rows."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class PresenceProbe(nn.Module):
    """1x1 conv to one score per location, globally average-pooled: one logit per image."""

    def __init__(self, standardize: Standardize, channels: int):
        super().__init__()
        self.standardize, self.conv = standardize, nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.standardize(x)).mean(dim=(1, 2, 3))


class MaskProbe(nn.Module):
    """1x1 conv to one logit per location: the concept's mask on the layer's grid."""

    def __init__(self, standardize: Standardize, channels: int):
        super().__init__()
        self.standardize, self.conv = standardize, nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.standardize(x))[:, 0]


# -- targets and scores -------------------------------------------------------------------------


def present(labels: dict, concept: str) -> torch.Tensor:
    """1.0 where the image holds the concept, else 0.0 (one value per row)."""
    label = torch.as_tensor(labels["label"])
    return torch.isin(label, torch.tensor(CONCEPTS[concept])).float()


def mask_cover(labels: dict, concept: str, grid: tuple[int, int]) -> torch.Tensor:
    """The share of each cell of the layer's grid that the concept covers, ``(N, h, w)``.

    The source's mask marks any shape; an image without the concept covers nothing.
    """
    mask = labels["mask"].float().unsqueeze(1)  # (N, 1, H, W), 0 or 1
    cover = F.adaptive_avg_pool2d(mask, grid)[:, 0]
    return cover * present(labels, concept)[:, None, None]


def iou(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """Intersection over union of two boolean masks, over all their cells (1.0 when both empty)."""
    union = (pred | truth).sum().item()
    return (pred & truth).sum().item() / union if union else 1.0


# -- the flow ---------------------------------------------------------------------------------


def dump(args: argparse.Namespace, out: str, count: int) -> tuple[pipeline.Config, pipeline.Summary]:
    """Run (or resume) the dump of ``concept_dump.yaml`` into ``out``.

    ``pipeline.run`` starts a local Ray for the dump and stops it after, or uses the Ray that is
    already up (a test's, a Ray job's). A finished dump of the same config is found and kept.
    """
    overrides = [f"run.output={json.dumps(out)}", f"source.count={count}", *args.set]
    config = pipeline.load_config(args.config, overrides)
    if args.layer not in config.model.layers:
        raise pipeline.ConfigError("--layer", f"{args.layer!r} is not dumped; the config dumps "
                                   f"{list(config.model.layers)}")
    summary = pipeline.run(config, overwrite=args.overwrite, stream=None if args.quiet else sys.stderr)
    return config, summary


def scan(dataset: pipeline.ActivationDataset, concept: str, batch_size: int) -> dict:
    """One streamed pass: each row's index, the share of its grid the concept covers, and its
    per-channel first and second moments over the grid."""
    index, cover, first, second = [], [], [], []
    for x, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        index.append(torch.as_tensor(labels["index"]))
        cover.append(mask_cover(labels, concept, x.shape[-2:]).mean(dim=(1, 2)))
        first.append(x.double().mean(dim=(2, 3)))
        second.append(x.double().square().mean(dim=(2, 3)))
    return {"index": torch.cat(index), "cover": torch.cat(cover),
            "first": torch.cat(first), "second": torch.cat(second), "shape": tuple(x.shape[1:])}


def split(index: torch.Tensor, holdout: float) -> tuple[list[int], list[int]]:
    """Row positions of the training and the held-out samples: the held-out ones are the
    ``holdout`` share with the highest source indices."""
    order = torch.argsort(index).tolist()
    cut = len(order) - max(1, round(len(order) * holdout))
    return sorted(order[:cut]), sorted(order[cut:])


def train(dataset: pipeline.ActivationDataset, train_rows: list[int], stats: dict,
          args: argparse.Namespace, log: Callable[[str], None]) -> tuple[nn.Module, nn.Module]:
    """Fit both probes on the same stream of batches."""
    torch.manual_seed(args.seed)
    channels = stats["shape"][0]
    rows = torch.tensor(train_rows)
    # the mask probe sees single cells: standardise with the moments over every cell; the
    # presence probe sees their average: standardise with the spread of the per-image averages
    # (the same linear model, on inputs of unit scale, so one learning rate suits both)
    cell_mean = stats["first"][rows].mean(dim=0)
    cell_std = (stats["second"][rows].mean(dim=0) - cell_mean.square()).clamp_min(1e-12).sqrt()
    image_std = stats["first"][rows].std(dim=0).clamp_min(1e-6)
    presence = PresenceProbe(Standardize(cell_mean.float(), image_std.float()), channels)
    masker = MaskProbe(Standardize(cell_mean.float(), cell_std.float()), channels)
    # few cells are covered: weigh them up by the square root of the odds (full balancing marks
    # too many cells, none too few; both give a lower IoU on this data)
    covered = stats["cover"][rows].mean().item()
    pos_weight = torch.tensor((1 - covered) / max(covered, 1e-6)).sqrt()
    params = list(presence.conv.parameters()) + list(masker.conv.parameters())
    optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=1e-4)
    sampler = BlockShuffleSampler(train_rows, block=args.batch_size, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers)
    for epoch in range(args.epochs):
        started, losses, seen = time.monotonic(), torch.zeros(2), 0
        for x, labels in loader:
            y = present(labels, args.concept)
            cover = mask_cover(labels, args.concept, x.shape[-2:])
            loss_presence = F.binary_cross_entropy_with_logits(presence(x), y)
            loss_mask = F.binary_cross_entropy_with_logits(masker(x), cover, pos_weight=pos_weight)
            optimizer.zero_grad()
            (loss_presence + loss_mask).backward()
            optimizer.step()
            losses += torch.tensor([loss_presence.item(), loss_mask.item()]) * len(y)
            seen += len(y)
        log(f"  epoch {epoch + 1}/{args.epochs}: presence loss {losses[0] / seen:.3f}, "
            f"mask loss {losses[1] / seen:.3f} ({time.monotonic() - started:.1f} s)")
    return presence.eval(), masker.eval()


@torch.no_grad()
def evaluate(dataset: pipeline.ActivationDataset, rows: list[int], presence: nn.Module, masker: nn.Module,
             args: argparse.Namespace) -> dict:
    """Accuracy and IoU on ``rows``, with the constant answers they must beat."""
    correct, positives, total = 0, 0, 0
    predicted, truth = [], []
    for x, labels in DataLoader(Subset(dataset, rows), batch_size=args.batch_size, shuffle=False):
        y = present(labels, args.concept)
        correct += ((presence(x) > 0).float() == y).sum().item()
        positives += int(y.sum().item())
        total += len(y)
        predicted.append(masker(x) > 0)
        truth.append(mask_cover(labels, args.concept, x.shape[-2:]) > 0.5)
    pred, true = torch.cat(predicted), torch.cat(truth)
    all_cells = iou(torch.ones_like(true), true)
    no_cells = iou(torch.zeros_like(true), true)
    return {"accuracy": correct / total, "chance": max(positives, total - positives) / total,
            "positives": positives, "iou": iou(pred, true), "iou_baseline": max(all_cells, no_cells),
            "mask_cells": int(true.sum().item()), "grid": list(true.shape[1:])}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="the dump's folder (default: concept-dump, or "
                        "concept-dump-quick with --quick); a finished dump there is reused")
    parser.add_argument("--count", type=int, help=f"generated images to dump (default {FULL['count']}, "
                        f"{QUICK['count']} with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"a small run for tests: {QUICK['count']} "
                        f"images, {QUICK['epochs']} epochs (about 20 s)")
    parser.add_argument("--layer", default="maxpool", help="the dumped layer to probe (default: maxpool)")
    parser.add_argument("--concept", choices=sorted(CONCEPTS), default="shape",
                        help="what the probes look for (default: shape, i.e. any of the three)")
    parser.add_argument("--epochs", type=int, help="passes over the training rows "
                        f"(default {FULL['epochs']}, {QUICK['epochs']} with --quick)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch (default 64)")
    parser.add_argument("--lr", type=float, default=0.03, help="Adam's learning rate (default 0.03)")
    parser.add_argument("--holdout", type=float, default=0.2,
                        help="share of samples held out, those of the highest indices (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the probes and the shuffle")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    parser.add_argument("--config", default=str(CONFIG),
                        help="the dump's config (default: concept_dump.yaml next to this script)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the dump's config, e.g. --set model.weights=my_resnet.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace a different dump in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Dump, train, report; returns the report's numbers."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0 < args.holdout < 1:
        parser.error(f"--holdout must be between 0 and 1, got {args.holdout}")
    defaults = QUICK if args.quick else FULL
    count = args.count or defaults["count"]
    args.epochs = args.epochs or defaults["epochs"]
    out = str(args.out or ("concept-dump-quick" if args.quick else "concept-dump"))

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    started = time.monotonic()
    config, summary = dump(args, out, count)
    log(summary.format())
    dumped = time.monotonic()

    # a map-style Dataset over the Parquet files: a row loads its row group (run.batch_size rows)
    # and only the last CACHED_ROW_GROUPS of them stay in memory, however large the dump
    dataset = pipeline.ActivationDataset(out, args.layer, cache_row_groups=CACHED_ROW_GROUPS)
    stats = scan(dataset, args.concept, batch_size=256)
    train_rows, test_rows = split(stats["index"], args.holdout)
    log(f"training the probes on {len(train_rows):,} rows of {args.layer} "
        f"({'x'.join(map(str, stats['shape']))}), streamed from {out}")
    presence, masker = train(dataset, train_rows, stats, args, log)
    scores = evaluate(dataset, test_rows, presence, masker, args)
    finished = time.monotonic()

    indices = stats["index"]
    first_test = int(indices[test_rows].min().item())
    layer_info = pipeline.inspect_dump(out).layers[args.layer]
    metrics = {
        "out": str(out), "layer": args.layer, "concept": args.concept, "shape": list(stats["shape"]),
        "samples": len(dataset), "train": len(train_rows), "test": len(test_rows),
        "first_test_index": first_test, "epochs": args.epochs,
        "dump_seconds": round(dumped - started, 1), "train_seconds": round(finished - dumped, 1),
        "layer_megabytes": round(layer_info["bytes"] / 1e6, 1), "row_group_rows": config.run.batch_size,
        "cached_row_groups": CACHED_ROW_GROUPS,
        **scores,
    }
    print(report(metrics))
    return metrics


def report(m: dict) -> str:
    """The numbers of :func:`main` as a few lines of text."""
    grid = "x".join(map(str, m["grid"]))
    gain = m["accuracy"] - m["chance"]
    ratio = m["iou"] / m["iou_baseline"] if m["iou_baseline"] else math.inf
    return "\n".join([
        f"concept probes on {m['layer']} ({'x'.join(map(str, m['shape']))}), concept {m['concept']!r}",
        f"  samples: {m['samples']:,}; train {m['train']:,}, held out {m['test']:,} "
        f"(index >= {m['first_test_index']:,})",
        f"  streamed: {m['layer_megabytes']:,} MB on disk, read in row groups of {m['row_group_rows']} "
        f"rows, at most {m['cached_row_groups']} in memory at once",
        f"  presence (1x1 conv + global average pool): accuracy {m['accuracy']:.3f} vs chance "
        f"{m['chance']:.3f} ({gain:+.3f}; {m['positives']} of {m['test']} held-out images hold it)",
        f"  mask on the {grid} grid (1x1 conv): IoU {m['iou']:.3f} vs {m['iou_baseline']:.3f} for "
        f"the best constant mask ({ratio:.1f}x; {m['mask_cells']:,} of "
        f"{m['test'] * m['grid'][0] * m['grid'][1]:,} held-out cells covered)",
        f"  time: dump {m['dump_seconds']:.1f} s, scan + train + test {m['train_seconds']:.1f} s",
    ])


if __name__ == "__main__":
    try:
        main()
    except pipeline.ConfigError as exc:  # a bad config, layer or output folder: nothing was done
        sys.exit(f"concept_training: error: {exc}")
