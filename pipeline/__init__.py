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

from ._driver import run
from ._reader import ActivationDataset, DumpInfo, decode_column, inspect_dump, read_layer, read_table, to_ray_dataset
from ._report import Summary
from .config import Config, load_config
from .errors import (BadSampleError, ConfigError, DamagedDumpError, DeviceMemoryError, LayerOutputError,
                     OutputConflictError, PipelineError, RecordError, ReservedColumnError, ShapeChangedError,
                     ShardFailedError, UnknownDumpLayerError, WeightsMismatchError)

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
