"""The errors the pipeline raises on purpose.

All derive from :class:`PipelineError`, and each also from the built-in error it is a kind of
(a :class:`ConfigError` is a ``ValueError``). Each names the bad value and what would be valid;
the CLI turns a :class:`ConfigError` into exit status 2 before any work has started.

>>> err = ConfigError("run.batch_size", "must be at least 1, got 0")
>>> str(err), err.key, isinstance(err, PipelineError), isinstance(err, ValueError)
('run.batch_size: must be at least 1, got 0', 'run.batch_size', True, True)
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class PipelineError(Exception):
    """The base of the errors the pipeline raises on purpose.

    ``after`` is what to do once a run stopped on it (the CLI prints it); ``None``: a rerun of
    the same command resumes.
    """

    after: str | None = None

    def __reduce__(self) -> tuple:
        # rebuilt without calling __init__ (whose arguments differ from ``args``), so these
        # errors cross process boundaries (Ray, DataLoader workers) intact
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type[PipelineError], args: tuple, state: dict[str, Any]) -> PipelineError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class ConfigError(PipelineError, ValueError):
    """A config key or value is invalid; raised before any work starts.

    Args:
        key: the dotted config key at fault, e.g. ``"model.layers"``.
        message: what is wrong and what would be valid.
    """

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}" if key else message)


class OutputConflictError(ConfigError):
    """The output folder holds another run, or files that are not a dump."""


class OutputLockedError(OutputConflictError):
    """Another run is at work on the output folder."""


class DamagedDumpError(PipelineError, ValueError):
    """A dump's files contradict its records (cut short, replaced, missing), or one of its
    records, or its manifest, cannot be read. The message names each file."""


class LockLostError(PipelineError, RuntimeError):
    """Another run took over the output folder's lock while this one ran."""

    after = ("The shards finished so far are kept. Another run works on this output now: let it finish "
             "(`actmap inspect` tells when the dump is complete) rather than rerunning beside it.")


class WorkersUnavailableError(PipelineError, RuntimeError):
    """No worker came up on the cluster in time."""

    after = ("Nothing was lost: the shards finished so far are kept. Rerun the same command once the cluster "
             "has room for an actor, or ask for less per actor.")


class ReservedColumnError(ConfigError):
    """A pass-through column of the source takes the name of an output column."""

    def __init__(self, column: str, taken: Iterable[str]):
        from .config import Config, ParquetSpec  # the config imports this module

        self.column = column
        super().__init__(Config.key("source"), f"the pass-through column {column!r} clashes with an output "
                         f"column ({', '.join(sorted(taken))}); rename it in the data (a dataset's item key, a "
                         f"Parquet column, a WebDataset .json field), or leave it out (a parquet source passes "
                         f"through only the columns listed in {ParquetSpec.key('columns')})")


#: What to do after an error that a rerun of the same config meets again.
_RERUN_FAILS = ("The shards finished so far are kept, but a rerun of the same config fails the same way: "
                "change the config as the error says (a change to the model or the dump needs --overwrite).")


def repeats(error: BaseException | None) -> bool:
    """Whether ``error`` comes back as it was at every try (a layer that gives no tensor, a
    shape that changed, other weights), unlike the storage or network errors that a later try
    may pass."""
    return isinstance(error, ConfigError) or getattr(error, "after", None) == _RERUN_FAILS


class BadSampleError(PipelineError, RuntimeError):
    """A sample could not be read in strict mode."""

    @property
    def after(self) -> str:  # type: ignore[override]
        from .config import RunSpec  # the config imports this module

        return ("The shards finished so far are kept. A rerun reads that sample again: mend or remove it, or "
                f"unset {RunSpec.key('strict')} to record it as bad and go on, then rerun the same command to "
                "resume.")


class ShardFailedError(PipelineError, RuntimeError):
    """A shard failed on every attempt; the shards already done are kept.

    ``cause``: the last attempt's error; its ``after`` is this error's.
    """

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.after = getattr(cause, "after", None)


class DeviceMemoryError(PipelineError, RuntimeError):
    """A batch's forward ran out of the device's memory: the batch's fault, not a sample's.
    ``shared``: the worker had only part of its GPU (other workers held models there too)."""

    def __init__(self, message: str, shared: bool = False):
        super().__init__(message)
        self.shared = shared

    @property
    def after(self) -> str:  # type: ignore[override]
        from .config import RunSpec  # the config imports this module

        own = f", or give each actor a GPU of its own ({RunSpec.key('gpus_per_actor')}: 1)" if self.shared else ""
        return (f"The shards finished so far are kept. Lower {RunSpec.key('batch_size')}{own}, then rerun the same "
                "command to resume.")


class LayerOutputError(PipelineError, RuntimeError):
    """A layer's output is not one tensor (a tuple, a dict, ...): it cannot be stored."""

    after = _RERUN_FAILS


class ShapeChangedError(PipelineError, RuntimeError):
    """Under fixed shapes, a layer gave an output of another shape than before."""

    after = _RERUN_FAILS


class WeightsMismatchError(PipelineError, RuntimeError):
    """A worker built the model with other weights than the driver did."""

    after = _RERUN_FAILS


class RecordError(PipelineError, ValueError):
    """A record of the dump (a shard's, a layer's) lacks a field it needs."""


class UnknownDumpLayerError(PipelineError, KeyError):
    """The dump holds no such layer."""

    def __str__(self) -> str:
        return str(self.args[0])


def close_matches(value: str, valid: Iterable[str], n: int = 3) -> str:
    """A hint listing the valid values closest to ``value``.

    >>> close_matches("layr3", ["layer1", "layer3", "fc"])
    "did you mean 'layer3' or 'layer1'?"
    >>> close_matches("xyz", ["a", "b"])
    "valid: 'a', 'b'"
    """
    valid = list(valid)
    near = difflib.get_close_matches(value, valid, n=n, cutoff=0.6)
    if near:
        return "did you mean " + " or ".join(repr(v) for v in near) + "?"
    shown = ", ".join(repr(v) for v in valid[:12])
    more = f", ... ({len(valid)} in all)" if len(valid) > 12 else ""
    return f"valid: {shown}{more}"
