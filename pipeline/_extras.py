"""Optional packages: import one, or say which extra of actmap installs it.

>>> require("json", "viz", "model.name").__name__
'json'
>>> require("no_such_package_xyz", "viz", "actmap show")
Traceback (most recent call last):
...
pipeline.errors.ConfigError: actmap show: needs the package 'no_such_package_xyz', which is not installed; install it with: pip install 'actmap[viz]'
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ConfigError

#: The extras of the ``actmap`` distribution and the packages each brings (pyproject.toml).
EXTRAS = {"timm": ("timm",), "transformers": ("transformers",), "viz": ("matplotlib",),
          "readers": ("duckdb", "datasets", "pandas")}


def require(module: str, extra: str, key: str) -> ModuleType:
    """Import ``module``; a ``ConfigError`` naming ``key`` and the extra that installs it if absent."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and exc.name != module.split(".")[0] and exc.name != module:
            raise  # the package is there but broken: its own error says more
        raise ConfigError(key, f"needs the package {module.split('.')[0]!r}, which is not installed; "
                          f"install it with: pip install 'actmap[{extra}]'") from None
