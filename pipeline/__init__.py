"""actmap's distributed dump: Ray actors (or, for small jobs, workers in this process) run a
model over a dataset and write the outputs of chosen layers to partitioned Parquet, which the
readers here load back for concept training.

Run it with ``actmap run CONFIG.yaml`` or from Python::

    from pipeline import load_config, run
    summary = run(load_config("dump.yaml"))

Read it back with :func:`read_layer`, :class:`ActivationDataset` or :func:`to_ray_dataset`.
The public names are these, :mod:`pipeline.config` (the config sections) and
:mod:`pipeline.errors`; the modules whose names start with ``_`` are internal.
"""

import importlib
from typing import TYPE_CHECKING

from .config import Config, load_config
from .errors import (BadSampleError, ConfigError, DamagedDumpError, DeviceMemoryError, LayerOutputError,
                     OutputConflictError, PipelineError, RecordError, ReservedColumnError, ShapeChangedError,
                     ShardFailedError, UnknownDumpLayerError, WeightsMismatchError)

#: The public names that need torch (seconds to import), and their modules: imported when first
#: used, so that ``actmap --help``, a config error or a Ctrl-C during that import answer at once
_LAZY = {"run": "._driver", "Summary": "._report",
         **dict.fromkeys(["ActivationDataset", "DumpInfo", "decode_column", "inspect_dump", "read_layer",
                          "read_table", "to_ray_dataset"], "._reader")}

if TYPE_CHECKING:
    from ._driver import run
    from ._reader import (ActivationDataset, DumpInfo, decode_column, inspect_dump, read_layer, read_table,
                          to_ray_dataset)
    from ._report import Summary
else:  # (a type checker sees the imports above, and no __getattr__ that would hide a misspelt name)
    def __getattr__(name: str):
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ActivationDataset",
    "BadSampleError",
    "Config",
    "ConfigError",
    "DamagedDumpError",
    "DeviceMemoryError",
    "DumpInfo",
    "LayerOutputError",
    "OutputConflictError",
    "PipelineError",
    "RecordError",
    "ReservedColumnError",
    "ShapeChangedError",
    "ShardFailedError",
    "Summary",
    "UnknownDumpLayerError",
    "WeightsMismatchError",
    "decode_column",
    "inspect_dump",
    "load_config",
    "read_layer",
    "read_table",
    "run",
    "to_ray_dataset",
]
