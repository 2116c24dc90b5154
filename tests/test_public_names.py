"""Each package's public names are pinned: a name added or dropped is a decision, made here."""

import importlib
from pathlib import Path

import pytest

import extender
import pipeline

PUBLIC = {
    extender: ["ActivationMapGrabber", "ExtendedModelStump", "HooksHandle", "LayerInfo", "ModelExtender",
               "ModelStump", "OutputSelectionError", "UnknownLayerError", "format_layers", "list_layers"],
    pipeline: ["ActivationDataset", "BadSampleError", "Config", "ConfigError", "DamagedDumpError", "DeviceMemoryError", "DumpInfo", "LayerOutputError",
               "OutputConflictError", "PipelineError", "RecordError", "ReservedColumnError", "ShapeChangedError",
               "ShardFailedError", "Summary", "UnknownDumpLayerError", "WeightsMismatchError", "decode_column",
               "inspect_dump", "load_config", "read_layer", "read_table", "run", "to_ray_dataset"],
}
#: The modules that are API besides the package itself (all others start with ``_``).
PUBLIC_MODULES = {extender: set(), pipeline: {"__main__", "cli", "config", "errors"}}


@pytest.mark.parametrize("package", list(PUBLIC), ids=lambda p: p.__name__)
def test_public_names_are_pinned_sorted_and_defined(package):
    assert package.__all__ == PUBLIC[package]
    assert package.__all__ == sorted(package.__all__)
    for name in package.__all__:
        assert getattr(package, name).__module__.startswith(package.__name__), name
    star = {}
    exec(f"from {package.__name__} import *", star)
    assert sorted(k for k in star if not k.startswith("__")) == package.__all__


@pytest.mark.parametrize("package", list(PUBLIC), ids=lambda p: p.__name__)
def test_internal_modules_are_private(package):
    folder = Path(package.__file__).parent
    names = {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
    assert {n for n in names if not n.startswith("_")} | {n for n in names if n == "__main__"} == PUBLIC_MODULES[package]
    for name in PUBLIC_MODULES[package] - {"__main__"}:
        importlib.import_module(f"{package.__name__}.{name}")
