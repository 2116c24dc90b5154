"""Objects a config names as ``package.module:attribute`` (a model builder, a dataset).

>>> import_target("collections:OrderedDict", "model.name").__name__
'OrderedDict'
>>> import_target("collections:OrderedDcit", "model.name")
Traceback (most recent call last):
...
pipeline.errors.ConfigError: model.name: 'collections' has no attribute 'OrderedDcit'; did you mean 'OrderedDict'?
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ConfigError, close_matches


def import_target(target: str, key: str) -> Any:
    """The object named by ``package.module:attribute`` (``ConfigError`` naming ``key`` if absent)."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigError(key, f"{target!r} is not of the form 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(key, f"cannot import module {module_name!r} of {target!r}: {exc}") from None
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(key, f"{module_name!r} has no attribute {part!r}; {close_matches(part, public)}")
        obj = getattr(obj, part)
    return obj
