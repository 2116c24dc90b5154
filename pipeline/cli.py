"""The command line: ``actmap run``, ``actmap layers``, ``actmap inspect``, ``actmap show``.

Exit status: 0 done, 1 the run failed (what was done is kept; what to do next is printed), 2 a
bad config or argument, or an output folder that cannot be used (nothing was started), 3 a
dump that ``inspect`` finds incomplete or damaged.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import NoReturn

from .config import RunSpec
from .errors import ConfigError, DamagedDumpError

log = logging.getLogger("actmap")

#: What to do after a run failed, unless its error says otherwise (``PipelineError.after``).
RESUME = "The shards finished so far are kept; rerun the same command to resume."


def _log_level(text: str) -> int:
    """A logging level by name (any case) or number."""
    if text.strip().lstrip("-").isdigit():
        return int(text)
    level = logging.getLevelName(text.strip().upper())
    if not isinstance(level, int):
        raise argparse.ArgumentTypeError(f"{text!r} is no logging level; give DEBUG, INFO, WARNING, ERROR, CRITICAL "
                                         "or a number")
    return level


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actmap", description="Dump the intermediate-layer outputs of "
                                     "PyTorch models over whole datasets into partitioned Parquet.")
    level_help = "logging level: DEBUG, INFO, WARNING, ERROR, CRITICAL or a number (default: WARNING)"
    parser.add_argument("--log-level", default="WARNING", type=_log_level, help=level_help)
    # also after the command (actmap run x.yaml --log-level INFO); given there, it wins
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, type=_log_level, help=level_help)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    run = command("run", help="dump layer outputs (with no config: the embedded default job)")
    run.add_argument("config", nargs="?", help="YAML config; every key has a default")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help=f"override a config key, e.g. --set {RunSpec.key('batch_size')}=64 (repeatable)")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, the Ray job's "
                     f"cluster, or a local Ray started for this run; not used by {RunSpec.key('executor')} local)")
    run.add_argument("--overwrite", action="store_true", help="replace the dump in the output folder")
    run.add_argument("--quiet", action="store_true", help="no progress line")

    layers = command("layers", help="list a model's layer ids (with output shapes given an input size)")
    layers.add_argument("model", help="torchvision builder name or package.module:callable")
    layers.add_argument("--input-size", type=int, nargs="+", metavar="N",
                        help="example input size without batch dim, e.g. 3 224 224 (or one int: 3xNxN)")
    layers.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="model builder kwargs, e.g. --set num_classes=10")

    inspect = command("inspect", help="describe a dump: layers, shapes, rows, completeness, bad samples")
    inspect.add_argument("output", help="the dump's folder or URI")
    inspect.add_argument("--bad", type=int, default=20, metavar="N", help="list at most N bad samples")
    inspect.add_argument("--verify", action="store_true", help="also read every page of every file and check "
                         "its checksum (reads the whole dump)")

    show = command("show", help="draw activation maps over their images, or value histograms (--stats), "
                          "into a PNG file")
    show.add_argument("output", help="the dump's folder or URI")
    show.add_argument("--layer", help="the layer to draw (required without --stats)")
    show.add_argument("--samples", type=int, default=None, metavar="N",
                      help="rows to draw, spread over the dump (default 4; with --stats 256 per layer)")
    show.add_argument("--channels", type=int, nargs="+", metavar="C",
                      help="draw these channels (token dims) one by one instead of their mean")
    show.add_argument("--prefix-tokens", type=int, metavar="N", help="leading (class, register) tokens "
                      "of a (tokens, dim) output, left out of the patch grid (default: found by itself)")
    show.add_argument("--stats", action="store_true", help="one histogram of values per layer (or --layer), "
                      "with the fraction of zeros and NaN/inf counts")
    show.add_argument("-o", "--out", dest="png", help="the PNG file to write (default: maps.png, stats.png)")
    return parser


def _check_location(output: str) -> None:
    """Refuse a dump location that no filesystem opens (an unknown scheme, a URI that does not
    parse), as a bad argument."""
    from ._secrets import cannot_use
    from ._store import OutputStore

    try:
        OutputStore(output)
    except ValueError as exc:  # (not a storage that does not answer now: that is an OSError, exit 1)
        raise ConfigError("output", cannot_use(output, exc)) from None


def _damaged(exc: DamagedDumpError) -> int:
    print(f"actmap: damaged: {exc}", file=sys.stderr)
    return 3


def _show(args: argparse.Namespace) -> int:
    from ._maps import NoMapError
    from ._viz import picture_path, show_maps, show_stats

    if args.samples is not None and args.samples < 1:
        raise ConfigError("--samples", f"must be at least 1, got {args.samples}")
    if args.channels and min(args.channels) < 0:
        raise ConfigError("--channels", f"channels are numbered from 0, got {min(args.channels)}")
    if args.prefix_tokens is not None and args.prefix_tokens < 0:
        raise ConfigError("--prefix-tokens", f"must be at least 0 (how many leading tokens to leave out), got "
                          f"{args.prefix_tokens}")
    if args.png is not None and not args.png.strip():
        raise ConfigError("-o/--out", "is empty; give the PNG file to write, or leave -o out for the default")
    if not args.stats and not args.layer:
        raise ConfigError("--layer", "name the layer to draw (`actmap inspect OUT` lists them), or pass --stats")
    try:
        png = picture_path(args.png or ("stats.png" if args.stats else "maps.png"))
    except ConfigError:  # (matplotlib is not installed)
        raise
    except ValueError as exc:
        raise ConfigError("-o/--out", str(exc)) from None
    _check_location(args.output)
    try:
        if args.stats:
            path = show_stats(args.output, png, args.samples or 256, [args.layer] if args.layer else None)
        else:
            path = show_maps(args.output, args.layer, png, args.samples or 4, args.channels, args.prefix_tokens)
    except (FileNotFoundError, NotADirectoryError) as exc:  # no dump there, or a file
        raise ConfigError("output", str(exc)) from None
    except DamagedDumpError as exc:
        return _damaged(exc)
    except NoMapError as exc:
        raise ConfigError(exc.option, str(exc)) from None
    except KeyError as exc:  # an unknown layer: the reader names the layers there are
        raise ConfigError("--layer", str(exc)) from None
    print(path)
    return 0


#: Set when SIGTERM stopped the run: the interrupt it raises may come back as a plain
#: ``KeyboardInterrupt`` (Ray's waits turn any interrupt into one of their own)
_TERMINATED = threading.Event()


@contextlib.contextmanager
def _terminated_as_interrupted() -> Iterator[None]:
    """While a run is at work, SIGTERM (``ray job stop``, a scheduler's preemption, ``kill``)
    stops it as Ctrl-C does: the workers give up their shards at their next batch, the temporary
    files go, and the output's lock is let go, so that the rerun, wherever it runs, resumes at
    once (a run killed outright leaves its lock, which another host takes over only when its
    lease ends)."""
    def stop(signum, frame):
        _TERMINATED.set()
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except SystemExit as exc:  # Ray's own handler, while ray.init runs, exits with the signal's number
        if exc.code != signal.SIGTERM:
            raise
        _TERMINATED.set()
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGTERM, before)


def _run(args: argparse.Namespace) -> int:
    from .config import load_config

    config = load_config(args.config, args.overrides)  # a bad config is told before torch is imported
    from ._driver import run

    with _terminated_as_interrupted():
        summary = run(config, address=args.address, overwrite=args.overwrite,
                      stream=None if args.quiet else sys.stderr)
    print(summary.format(), file=sys.stderr)
    return 0


#: The most values an example input of ``actmap layers --input-size`` may have (2 GiB of float32).
MAX_EXAMPLE_VALUES = 2**29


def _layers(args: argparse.Namespace) -> int:
    import torch

    from extender import format_layers, list_layers

    from .config import ModelSpec, apply_overrides
    from ._models import build_model, describe_failure, is_config_fault

    size = args.input_size
    if size and min(size) < 1:
        raise ConfigError("--input-size", f"every size must be at least 1, got {' '.join(map(str, size))}; give "
                          "the input's size without the batch dim (e.g. 3 224 224), or one int N for 3xNxN")
    kwargs = apply_overrides({}, args.overrides)
    model = build_model(ModelSpec(name=args.model, kwargs=kwargs))
    example = None
    if size:
        if len(size) == 1:
            size = [3, size[0], size[0]]
        values = math.prod(size)
        if values > MAX_EXAMPLE_VALUES:
            raise ConfigError("--input-size", f"an input of {'x'.join(map(str, size))} is {values:,} values, "
                              f"{values * 4 / 2**30:,.0f} GiB of float32: more than this command tries "
                              f"({MAX_EXAMPLE_VALUES:,} values); give the size the model takes (e.g. 3 224 224)")
    try:
        example = None if not size else torch.rand(1, *size)
        layers = list_layers(model, example)
    except Exception as exc:  # the model cannot take an input of that size (a RuntimeError, its own assert, ...)
        if not size or not is_config_fault(exc):
            raise
        raise ConfigError("--input-size", f"the model's forward fails on an input of size "
                          f"{'x'.join(map(str, size))}: {describe_failure(exc)}; give a size it takes "
                          "(e.g. 3 224 224)") from None
    print(format_layers(layers))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from ._reader import inspect_dump

    if args.bad < 0:
        raise ConfigError("--bad", f"must be at least 0 (how many bad samples to list; 0 lists none), got {args.bad}")
    _check_location(args.output)
    try:
        info = inspect_dump(args.output, verify=args.verify)
    except (FileNotFoundError, NotADirectoryError) as exc:  # nothing there, or a file
        raise ConfigError("output", str(exc)) from None
    except DamagedDumpError as exc:
        return _damaged(exc)
    print(info.format(bad_limit=args.bad))
    return 0 if info.complete else 3


def main(argv: Sequence[str] | None = None) -> int:
    _TERMINATED.clear()
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    handler = {"run": _run, "layers": _layers, "inspect": _inspect, "show": _show}[args.command]
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"actmap: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _TERMINATED.is_set():
            print("actmap: terminated (SIGTERM); rerun the same command to resume", file=sys.stderr)
            return 128 + signal.SIGTERM
        print("actmap: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        log.debug("failure", exc_info=True)
        print(f"actmap: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if args.command == "run":
            print(getattr(exc, "after", None) or RESUME, file=sys.stderr)
        return 1


def command() -> NoReturn:
    """The ``actmap`` command (and ``python -m pipeline``): :func:`main`, then the exit.

    What is left is frozen first (:func:`gc.freeze`): the interpreter's last collection would
    otherwise walk every object torch and torchvision made, a second or more after the work is
    done (1.5 s of a 20 s run here, 0.4 s frozen). The modules are still torn down as usual.
    The working folder is put on the module path (last: its files hide no module). Once
    :func:`main` has returned, Ctrl-C and SIGTERM are ignored.
    """
    if "" not in sys.path and os.getcwd() not in sys.path:
        # the working folder's modules import (a config's model.name, a dataset's target), as
        # under `python -m pipeline`; a console script has its own folder on the path instead.
        # Last: a file of the folder named as a module (numbers.py, datasets.py) hides none.
        sys.path.append(os.getcwd())
    code = main()
    # the run is over (its summary printed): a Ctrl-C or SIGTERM now would only turn its exit
    # status into the signal's, with a traceback
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_IGN)
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    command()
