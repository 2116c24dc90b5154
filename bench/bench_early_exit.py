"""Time early exit on ResNet-50 (CPU): full forward vs stump vs grabbers with and without stop_early.

Usage:
    python bench/bench_early_exit.py --batch 8 --repeats 3 --size 224

Every variant runs the same untrained ResNet-50 (``weights=None``) in eval mode under
``torch.inference_mode()``. After ``--warmup`` untimed rounds, the variants are timed in
interleaved rounds (so that a change in machine load hits all of them alike) and the median
of ``--repeats`` rounds is reported as ms per batch, images per second and the time
relative to the full forward. The process CPU time is shown as well: on a shared machine
it is less disturbed by other processes than the wall-clock time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torchvision.models import resnet50

from extender import ActivationMapGrabber, ModelStump


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser.parse_args(argv)


def time_once(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> list[dict[str, float | str]]:
    """Run the benchmark, print the table and return its rows (one dict per variant)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = resnet50(weights=None).eval()
    x = torch.rand(args.batch, 3, args.size, args.size)

    stump = ModelStump(model, "layer2")
    early = ActivationMapGrabber(model, ["layer2", "layer3"], stop_early=True)
    full_grab = ActivationMapGrabber(model, ["layer2", "layer3"])
    variants: dict[str, Callable[[], object]] = {
        "full forward": lambda: model(x),
        "ModelStump(layer2)": lambda: stump(x),
        "grabber layer2+3, stop_early": lambda: early(x),
        "grabber layer2+3, full": lambda: full_grab(x),
    }
    # All wrappers stay registered while the plain forward runs too; their hooks record
    # only inside their own wrapper's forward, so there they cost a few microseconds.
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    try:
        with torch.inference_mode():
            for _ in range(args.warmup):
                for fn in variants.values():
                    fn()
            for _ in range(args.repeats):
                for name, fn in variants.items():
                    times[name].append(time_once(fn))
    finally:
        for wrapper in (stump, early, full_grab):
            wrapper.remove()

    print(
        f"ResNet-50, CPU, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"{args.size}x{args.size} px, median of {args.repeats} (after {args.warmup} warm-up), "
        f"torch {torch.__version__}"
    )

    def median_ms(name: str, column: int) -> float:
        return statistics.median(sample[column] for sample in times[name]) * 1e3

    full_ms, full_cpu = median_ms("full forward", 0), median_ms("full forward", 1)
    rows = []
    for name in times:
        ms, cpu = median_ms(name, 0), median_ms(name, 1)
        rows.append(
            {
                "variant": name,
                "ms_per_batch": ms,
                "images_per_s": args.batch / ms * 1e3,
                "vs_full": ms / full_ms,
                "cpu_ms_per_batch": cpu,
                "cpu_vs_full": cpu / full_cpu if full_cpu > 0 else float("nan"),
            }
        )
    print(
        f"{'variant':<30} {'ms/batch':>10} {'images/s':>10} {'time vs full':>13}"
        f" {'CPU ms/batch':>13} {'CPU vs full':>12}"
    )
    for r in rows:
        print(
            f"{r['variant']:<30} {r['ms_per_batch']:>10.1f} {r['images_per_s']:>10.1f}"
            f" {r['vs_full']:>12.2f}x {r['cpu_ms_per_batch']:>13.1f} {r['cpu_vs_full']:>11.2f}x"
        )
    return rows


if __name__ == "__main__":
    main()
