"""Modules imported when first needed, one import at a time.

torchvision takes seconds to import, so it is imported where it is first used: by the decoding
threads (a PNG file's decoder, the resize). Two threads that start importing its parts at once
(``torchvision.io`` in one, ``torchvision.transforms`` in the other) can each find the other's
module half made, and one fails with an ImportError that names a circular import. Every such
import goes through :func:`lazy_import`, under one lock.

>>> lazy_import("json").dumps([1])
'[1]'
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

_LOCK = threading.Lock()


def lazy_import(name: str) -> ModuleType:
    """The module ``name``, imported (once made, this costs a dictionary lookup and the lock)."""
    with _LOCK:
        return importlib.import_module(name)
