"""The errors the pipeline raises on purpose.

Each names the bad value and what would be valid; the CLI turns a :class:`ConfigError` into exit
status 2 before any work has started.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A config key or value is invalid; raised before any work starts.

    Args:
        key: the dotted config key at fault, e.g. ``"model.layers"``.
        message: what is wrong and what would be valid.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class OutputConflictError(ConfigError):
    """The output folder holds another run, or files that are not a dump."""


class BadSampleError(RuntimeError):
    """A sample could not be read in strict mode."""


class ShardFailedError(RuntimeError):
    """A shard failed on every attempt; the shards already done are kept."""


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
